"""backends/packed_weights: inference GEMMs on oneDNN read weights packed once and kept. Translations equal the
standard model's; every way a weight changes between translations (a training step, an in-place update, a
loaded state dict) is seen by the next one; freed weights and `disable_fast_cpu` free their copies."""

import copy
import gc

import pytest
import torch

from hf_moe_mt.backends import cpu_gemm, disable_fast_cpu, enable_fast_cpu, experts_modules, packed_weights

from ..modeling.conftest import make_model, random_batch

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def every_gemm_on_onednn(monkeypatch):
    """The tiny test shapes are below oneDNN's size threshold: route them all."""
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    packed_weights.forget_all()
    yield
    packed_weights.forget_all()


def packed_model(**overrides):
    model = make_model(num_experts_per_tok=2, **overrides)
    choice = enable_fast_cpu(model, gemm="onednn", packed=True)
    assert choice.linear_packed and choice.experts_packed and "packed for inference" in choice.describe()
    return model


def standard_logits(model, batch):
    """The same model's logits on the model's own kernels (a deep copy without the backend)."""
    standard = copy.deepcopy(model)
    disable_fast_cpu(standard)
    with torch.no_grad():
        return standard(**batch).logits


def test_generate_with_packed_weights_gives_the_standard_beams(monkeypatch):
    packs, real_pack = [], packed_weights._pack
    monkeypatch.setattr(packed_weights, "_pack", lambda weight: packs.append(weight.shape) or real_pack(weight))
    model, batch = make_model(num_experts_per_tok=2), random_batch()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=8,
                  min_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    reference = model.generate(**kwargs)
    enable_fast_cpu(model, gemm="onednn", packed=True)
    fast = model.generate(**kwargs)
    assert torch.equal(fast.sequences, reference.sequences)
    for step_fast, step_reference in zip(fast.scores, reference.scores):
        torch.testing.assert_close(step_fast, step_reference, atol=1e-4, rtol=1e-4)
    # every Linear's weight packed (the LM head's is the shared embedding), and each expert that got rows
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    expert_slices = sum(2 * m.num_experts for m in experts_modules(model))
    assert linears <= len(packs) == packed_weights.packed_count() <= linears + expert_slices
    packs.clear()
    again = model.generate(**kwargs)
    assert packs == [] and torch.equal(again.sequences, fast.sequences)  # the kept copies, reused


def test_a_training_step_drops_the_copies_and_the_next_translation_reads_the_new_weights():
    model, batch = packed_model(), random_batch()
    with torch.no_grad():
        model(**batch)
    assert packed_weights.packed_count() > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    loss = model(**batch).loss
    assert packed_weights.packed_count() == 0  # dropped by the training forward, before the update
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, standard_logits(model, batch), atol=1e-4, rtol=1e-4)


def test_in_place_updates_and_a_loaded_state_dict_are_seen():
    model, batch = packed_model(), random_batch()
    with torch.no_grad():
        before = model(**batch).logits
        for experts in experts_modules(model):
            experts.up_proj.mul_(-1.0)  # in place, no training step: the version counter sees it
        model.model.encoder.layers[0].self_attn.q_proj.weight.add_(0.5)
        changed = model(**batch).logits
    assert not torch.allclose(changed, before, atol=1e-3)
    torch.testing.assert_close(changed, standard_logits(model, batch), atol=1e-4, rtol=1e-4)
    model.load_state_dict(_other_weights(model))
    with torch.no_grad():
        loaded = model(**batch).logits
    torch.testing.assert_close(loaded, standard_logits(model, batch), atol=1e-4, rtol=1e-4)


def _other_weights(model) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(tensor.shape, generator=generator) * 0.05 if tensor.is_floating_point() else tensor
            for name, tensor in model.state_dict().items()}


def test_freed_weights_and_disable_free_their_copies():
    batch = random_batch()
    model = packed_model()
    with torch.no_grad():
        model(**batch)
    assert packed_weights.packed_count() > 0
    del model
    gc.collect()
    assert packed_weights.packed_count() == 0
    model = packed_model()
    with torch.no_grad():
        model(**batch)
    disable_fast_cpu(model)
    assert packed_weights.packed_count() == 0


def test_disable_frees_only_that_models_copies():
    batch = random_batch()
    first, second = packed_model(), packed_model()
    with torch.no_grad():
        first(**batch)
        second(**batch)
    both = packed_weights.packed_count()
    disable_fast_cpu(first)
    assert 0 < packed_weights.packed_count() == both // 2
    packed_weights.forget(second.parameters())
    assert packed_weights.packed_count() == 0


def test_without_packing_nothing_is_kept():
    model = make_model(num_experts_per_tok=2)
    choice = enable_fast_cpu(model, gemm="onednn", packed=False)
    assert not choice.linear_packed and not choice.experts_packed
    with torch.no_grad():
        model(**random_batch())
    assert packed_weights.packed_count() == 0


def test_training_on_torch_with_packed_inference_uses_onednn_only_to_translate(monkeypatch):
    """gemm="torch", packed=True (the probe's choice where MKL wins training and packed oneDNN wins decoding):
    a training step computes no GEMM on oneDNN, a translation computes every large one there, on packed
    copies, and gives the standard model's beams."""
    from hf_moe_mt.backends import cpu_experts

    onednn_calls = []
    for module in (cpu_gemm, cpu_experts):
        real = module.onednn_linear
        monkeypatch.setattr(module, "onednn_linear", lambda *a, real=real, **k: onednn_calls.append(k.get("packed"))
                            or real(*a, **k))
    model, batch = make_model(num_experts_per_tok=2), random_batch()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3, max_new_tokens=6,
                  min_new_tokens=6)
    reference = model.generate(**kwargs)
    choice = enable_fast_cpu(model, gemm="torch", packed=True)
    assert "Linear GEMMs: torch (inference on packed oneDNN)" in choice.describe()
    assert torch.equal(model.generate(**kwargs), reference)
    assert onednn_calls and all(onednn_calls) and packed_weights.packed_count() > 0
    onednn_calls.clear()
    model.train()
    model(**batch).loss.backward()
    assert onednn_calls == [] and packed_weights.packed_count() == 0  # torch's GEMMs; the copies dropped
    model.eval()
    assert torch.equal(model.generate(**kwargs), reference) and packed_weights.packed_count() > 0  # packed again
