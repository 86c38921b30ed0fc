"""Padding tokens are never routed or counted, get zero output, zero logits and zero input gradient, and do
not change anything about the real tokens; an all-padding (or empty) batch works and yields zero grads."""

import pytest
import torch

from hf_moe_mt.moe import SparseMoE

from .reference import assert_close_rel, clone_layer, parameter_grads, randomize_

D = 8
# name -> (SparseMoE kwargs, training?)
MODES = {
    "dropless": (dict(drop_tokens=False), True),
    "capacity_by_position": (dict(capacity_factor=0.5, min_capacity=0, use_rts=False), True),
    "capacity_rts": (dict(capacity_factor=0.5, min_capacity=0, use_rts=True), True),
    "eval_capacity": (dict(eval_capacity_factor=0.5, min_capacity=0), False),
}


def _padded_batch():
    """[3, 9, D] with 15 real tokens; the real ones, in order, form the unpadded batch [15, D]."""
    x = torch.randn(3, 9, D)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, :1] = True
    mask[2, :8] = True
    x[~mask] = 100.0 * torch.randn(int((~mask).sum()), D)  # loud padding: any leak would show
    return x, mask


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_does_not_change_real_tokens(top_k, mode):
    """Padded batch vs the same real tokens without padding: same outputs, same router statistics (capacity
    from the real tokens), same parameter gradients; padding rows get zero output, logits and input grad."""
    kwargs, training = MODES[mode]
    layer = randomize_(SparseMoE(D, 12, 4, top_k=top_k, **kwargs)).train(training)
    twin = clone_layer(layer)
    x, mask = _padded_batch()
    x.requires_grad_(True)
    real_x = x.detach()[mask].clone().requires_grad_(True)
    grad_out = torch.randn(15, D)
    torch.manual_seed(7)
    out, info = layer(x, padding_mask=mask)
    torch.manual_seed(7)
    real_out, real_info = twin(real_x)
    out[mask].mul(grad_out).sum().add(out[~mask].sum()).backward()
    real_out.mul(grad_out).sum().backward()
    assert_close_rel(out[mask], real_out, name="real-token outputs")
    assert torch.count_nonzero(out[~mask]) == 0
    assert torch.count_nonzero(info.router_logits[~mask]) == 0
    assert_close_rel(info.router_logits[mask], real_info.router_logits, name="router logits")
    assert info.tokens_per_expert.tolist() == real_info.tokens_per_expert.tolist()
    for field in ("aux_loss", "z_loss", "dropped_fraction"):
        assert float(getattr(info, field).detach()) == pytest.approx(float(getattr(real_info, field).detach()), rel=1e-6)
    assert torch.count_nonzero(x.grad[~mask]) == 0
    assert_close_rel(x.grad[mask], real_x.grad, name="input grad")
    twin_grads = parameter_grads(twin)
    for name, grad in parameter_grads(layer).items():
        assert_close_rel(grad, twin_grads[name], name=f"grad {name}")


def test_padding_tokens_are_not_counted_dropless():
    layer = SparseMoE(D, 12, 4, top_k=2, drop_tokens=False)
    x, mask = _padded_batch()
    _, info = layer(x, padding_mask=mask)
    assert int(info.tokens_per_expert.sum()) == 15 * 2


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_padding_mask_dtypes_are_equivalent(mask_dtype):
    layer = randomize_(SparseMoE(D, 12, 4, top_k=1, capacity_factor=0.5, use_rts=False))
    x, mask = _padded_batch()
    ref, _ = layer(x, padding_mask=mask)
    out, _ = layer(x, padding_mask=mask.to(mask_dtype))
    assert torch.equal(out, ref)


def test_all_true_mask_equals_no_mask():
    layer = randomize_(SparseMoE(D, 12, 4, top_k=2, use_rts=False))
    x = torch.randn(2, 5, D)
    out, info = layer(x, padding_mask=torch.ones(2, 5))
    ref, ref_info = layer(x)
    assert torch.equal(out, ref) and torch.equal(info.tokens_per_expert, ref_info.tokens_per_expert)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_all_padding_batch_gives_zero_output_and_zero_grads(top_k, training):
    layer = randomize_(SparseMoE(D, 12, 4, top_k=top_k, jitter_noise=0.1)).train(training)
    x = torch.randn(2, 3, D, requires_grad=True)
    out, info = layer(x, padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    assert info.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert info.router_logits.shape == (2, 3, 4) and torch.count_nonzero(info.router_logits) == 0
    for field in ("aux_loss", "z_loss", "dropped_fraction"):
        assert float(getattr(info, field)) == 0.0
    (out.sum() + info.aux_loss + info.z_loss).backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    for name, grad in parameter_grads(layer).items():
        assert grad is not None and torch.count_nonzero(grad) == 0, name


def test_empty_input_without_mask():
    layer = SparseMoE(D, 12, 4, top_k=2)
    x = torch.randn(0, D, requires_grad=True)
    out, info = layer(x)
    assert out.shape == (0, D) and info.router_logits.shape == (0, 4)
    out.sum().backward()
    assert all(torch.count_nonzero(g) == 0 for g in parameter_grads(layer).values())
