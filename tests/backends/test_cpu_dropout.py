"""The backend's dropout: torch's keep probability and scale, independent elements, seeded by torch's generator,
the same mask in the backward and under gradient checkpointing, and F.dropout wherever it does not apply."""

import math

import pytest
import torch
from torch import nn

from hf_moe_mt.backends import disable_fast_cpu, enable_fast_cpu
from hf_moe_mt.backends.cpu_dropout import dropout, keep_mask, routes_to_fast_dropout

from ..modeling.conftest import loss_and_grads, make_model, random_batch


def _within_binomial(kept: int, trials: int, probability: float, sigmas: float = 5.0) -> bool:
    return abs(kept - trials * probability) <= sigmas * math.sqrt(trials * probability * (1 - probability))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_every_element_is_kept_with_probability_one_minus_p(p):
    """Over 2²⁰ elements, each of the four 16-bit lanes of a 64-bit draw on its own: a lane fed fewer random bits
    (e.g. a draw that leaves the sign bit 0) would keep a different share."""
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([2**18, 4]), p)
    assert keep.dtype == torch.bool
    for lane in range(4):
        assert _within_binomial(int(keep[:, lane].sum()), 2**18, 1 - p), (lane, keep[:, lane].float().mean())


def test_neighbouring_elements_are_independent():
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([2**20]), 0.5)
    for offset in (1, 2, 3, 4, 5):  # same draw (1-3), next draw (4, 5)
        both = int((keep[:-offset] & keep[offset:]).sum())
        assert _within_binomial(both, 2**20 - offset, 0.25), offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_as_torch_scales_them_and_dropped_ones_are_zero(dtype):
    torch.manual_seed(0)
    x = torch.randn(37, 53, dtype=dtype)  # an element count that leaves part of the last 64-bit draw unused
    out = dropout(x, 0.25)
    kept = out != 0
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out[kept], x[kept] * (1 / 0.75), rtol=0, atol=0)
    assert _within_binomial(int(kept.sum()), x.numel(), 0.75)


def test_the_backward_applies_the_forwards_mask_and_scale():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)

    def seeded_dropout(inputs):
        torch.manual_seed(3)  # gradcheck calls it many times: the same mask each time
        return dropout(inputs, 0.4)

    assert torch.autograd.gradcheck(seeded_dropout, (x,))
    out = seeded_dropout(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (out != 0).double() / 0.6)


def test_autograd_keeps_a_one_byte_mask():
    saved = []
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        dropout(x, 0.1)
    assert saved == [torch.bool]


def test_the_same_seed_gives_the_same_mask_and_another_seed_another():
    x = torch.randn(100, 100)
    first, again, other = (torch.manual_seed(seed) and dropout(x, 0.1) for seed in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_where_it_does_not_apply_it_is_f_dropout():
    x = torch.randn(10, 10)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    meta = torch.empty(10, 10, device="meta")
    assert dropout(meta, 0.1).device.type == "meta"  # (off the CPU: F.dropout)


def _dropout_model():
    return make_model(dropout=0.1, activation_dropout=0.1).train()


def test_the_backend_routes_every_dropout_of_the_model_and_disable_undoes_it():
    model = _dropout_model()
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    layers = model.config.encoder_layers + model.config.decoder_layers
    assert len(dropouts) >= 2 + layers  # embeddings of both stacks, a residual dropout per layer, dense FFNs
    enable_fast_cpu(model, gemm="torch")
    assert all(type(m) is nn.Dropout and routes_to_fast_dropout(m) for m in dropouts)
    disable_fast_cpu(model)
    assert not any(routes_to_fast_dropout(m) for m in dropouts)


def test_an_inplace_dropout_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1, inplace=True), nn.Dropout(0.1))
    enable_fast_cpu(model, gemm="torch")
    assert [routes_to_fast_dropout(m) for m in model[1:]] == [False, True]


def test_gradient_checkpointing_recomputes_the_same_masks():
    """Recomputing a layer must draw the same masks, or its gradients would belong to another forward."""
    model, batch = _dropout_model(), random_batch()
    enable_fast_cpu(model, gemm="torch")
    expected_loss, expected_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_model_with_the_backends_dropout_trains_as_with_torchs():
    """Not the same masks, so compare what dropout does to the model: how far its training-mode logits move from
    the eval-mode ones, averaged over many masks, agrees with torch's dropout to within the sampling noise; the
    same measure tells p = 0.3 from p = 0.25, so the test has the power to see a wrong rate or scale."""
    model, batch = make_model(dropout=0.3, activation_dropout=0.3), random_batch()

    def spread(seeds):
        with torch.no_grad():
            reference = model.eval()(**batch).logits
            model.train()
            return torch.tensor([torch.manual_seed(s) and (model(**batch).logits - reference).pow(2).mean().item()
                                 for s in seeds])

    standard = spread(range(100))
    enable_fast_cpu(model, gemm="torch")
    fast = spread(range(100, 200))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.25
    lower_rate = spread(range(200, 300))

    def apart(a, b):
        return abs(a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b))

    assert apart(fast, standard) < 5, (fast.mean(), standard.mean())
    assert apart(lower_rate, standard) > 5, (lower_rate.mean(), standard.mean())
