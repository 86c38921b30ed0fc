"""The whole model on a GPU: CUDA ≡ CPU in fp32, generation in bf16, a bf16 training run that learns.

Skipped without a GPU (CI has none); run on a CUDA machine with `pytest tests/modeling/test_cuda.py`.
"""

import copy

import pytest
import torch

from .conftest import make_model, random_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to(batch, device):
    return {key: value.to(device) for key, value in batch.items()}


@pytest.mark.parametrize("top_k", [1, 2])
def test_fp32_loss_logits_and_gradients_on_cuda_equal_cpu(top_k):
    cpu_model = make_model(num_experts_per_tok=top_k)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    batch = random_batch()
    cpu_out = cpu_model(**batch)
    cuda_out = cuda_model(**_to(batch, "cuda"))
    torch.testing.assert_close(cuda_out.logits.cpu(), cpu_out.logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cuda_out.loss.cpu(), cpu_out.loss, atol=2e-5, rtol=1e-5)
    cpu_out.loss.backward()
    cuda_out.loss.backward()
    cuda_params = dict(cuda_model.named_parameters())
    for name, param in cpu_model.named_parameters():
        if param.grad is None:
            assert cuda_params[name].grad is None, name
            continue
        torch.testing.assert_close(cuda_params[name].grad.cpu(), param.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bf16_generation_with_cache_equals_without_cache(num_beams):
    model = make_model(num_experts_per_tok=2).cuda().to(torch.bfloat16)
    batch = _to(random_batch(), "cuda")
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=num_beams,
                  max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))


def test_bf16_training_on_cuda_fits_a_batch():
    model = make_model(num_experts_per_tok=2).cuda().to(torch.bfloat16).train()
    batch = _to(random_batch(batch_size=8, seed=3), "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(map(lambda v: v == v, losses)), losses
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
