"""The fast path (sort-by-expert dispatch + grouped expert FFN) equals the naive per-token reference,
in outputs, router statistics and every gradient, on both CPU kernel paths."""

import pytest
import torch

from hf_moe_mt.moe import SparseMoE

from .reference import assert_close_rel, clone_layer, parameter_grads, randomize_, reference_forward

D, F_DIM, E = 12, 20, 4

# name -> (SparseMoE kwargs, training?, expect drops?)
REGIMES = {
    "dropless": (dict(drop_tokens=False), True, False),
    "capacity_without_drops": (dict(capacity_factor=4.0, use_rts=False), True, False),
    "train_drops_by_position": (dict(capacity_factor=0.5, min_capacity=0, use_rts=False), True, True),
    "eval_drops": (dict(eval_capacity_factor=0.5, min_capacity=0, use_rts=True), False, True),
}


def _run_both(layer, x, loss_weights, padding_mask=None):
    """Forward+backward through the layer and through the reference on a copy; return both sides."""
    ref_layer = clone_layer(layer)
    x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, info = layer(x_fast, padding_mask=padding_mask)
    ref = reference_forward(ref_layer, x_ref, padding_mask=padding_mask)
    for o, aux, z, xx in [(out, info.aux_loss, info.z_loss, x_fast), (ref.output, ref.aux_loss, ref.z_loss, x_ref)]:
        ((o * loss_weights).sum() + 0.3 * aux + 0.2 * z).backward()
    return (out, info, x_fast, layer), (ref, x_ref, ref_layer)


def _assert_equivalent(fast, reference):
    (out, info, x_fast, layer), (ref, x_ref, ref_layer) = fast, reference
    assert_close_rel(out, ref.output, name="output")
    assert info.tokens_per_expert.tolist() == ref.tokens_per_expert
    assert float(info.dropped_fraction) == pytest.approx(ref.dropped_fraction, abs=1e-6)
    assert_close_rel(info.aux_loss, ref.aux_loss, name="aux_loss")
    assert_close_rel(info.z_loss, ref.z_loss, name="z_loss")
    assert_close_rel(info.router_logits, ref.router_logits, name="router_logits")
    assert_close_rel(x_fast.grad, x_ref.grad, name="grad hidden_states")
    ref_grads = parameter_grads(ref_layer)
    for name, grad in parameter_grads(layer).items():
        assert_close_rel(grad, ref_grads[name], name=f"grad {name}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_per_token_reference(top_k, regime, activation, kernel_path):
    kwargs, training, expect_drops = REGIMES[regime]
    layer = randomize_(SparseMoE(D, F_DIM, E, top_k=top_k, activation=activation, **kwargs))
    layer.train(training)
    x = torch.randn(2, 12, D)
    fast, reference = _run_both(layer, x, torch.randn(2, 12, D))
    _assert_equivalent(fast, reference)
    kernel_path.assert_only(kernel_path.name)
    ref = reference[0]
    assert (ref.dropped_fraction > 0) == expect_drops, f"regime {regime} dropped {ref.dropped_fraction}"


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_reference_with_padding_and_drops(top_k, kernel_path):
    layer = randomize_(SparseMoE(D, F_DIM, E, top_k=top_k, capacity_factor=0.5, min_capacity=0, use_rts=False))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 2:] = False
    fast, reference = _run_both(layer, torch.randn(3, 10, D), torch.randn(3, 10, D), padding_mask=mask)
    _assert_equivalent(fast, reference)
    assert reference[0].dropped_fraction > 0
    kernel_path.assert_only(kernel_path.name)


@pytest.mark.parametrize("activation", ["gelu_new", "silu"])
def test_layer_matches_reference_other_activations(activation):
    layer = randomize_(SparseMoE(D, F_DIM, E, top_k=2, activation=activation, capacity_factor=0.75, min_capacity=0,
                                 use_rts=False))
    fast, reference = _run_both(layer, torch.randn(20, D), torch.randn(20, D))
    _assert_equivalent(fast, reference)


def test_single_expert_dropless_equals_dense_ffn():
    """E=1, top-1: every token gets probability 1, so the layer is exactly one dense FFN."""
    layer = randomize_(SparseMoE(D, F_DIM, 1, top_k=1, drop_tokens=False, activation="gelu"))
    x = torch.randn(15, D)
    out, info = layer(x)
    ex = layer.experts
    dense = torch.nn.functional.gelu(x @ ex.up_proj[0].T + ex.up_proj_bias[0]) @ ex.down_proj[0].T + ex.down_proj_bias[0]
    assert_close_rel(out, dense, name="output")
    assert info.tokens_per_expert.tolist() == [15]
    assert float(info.aux_loss.detach()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_experts,top_k,tokens", [(16, 2, 5), (2, 2, 9), (16, 1, 3)])
def test_layer_matches_reference_at_edge_expert_counts(num_experts, top_k, tokens, kernel_path):
    """More experts than tokens (most groups empty) and E == K (every token uses every expert)."""
    layer = randomize_(SparseMoE(D, F_DIM, num_experts, top_k=top_k, capacity_factor=1.0, min_capacity=1,
                                 use_rts=False))
    fast, reference = _run_both(layer, torch.randn(tokens, D), torch.randn(tokens, D))
    _assert_equivalent(fast, reference)


def test_non_contiguous_input_and_mask_match_contiguous_copies():
    layer = randomize_(SparseMoE(D, F_DIM, E, top_k=2, capacity_factor=0.75, min_capacity=0, use_rts=False))
    x = torch.randn(7, 3, D).transpose(0, 1)  # [3, 7, D] non-contiguous
    mask = (torch.rand(7, 3) > 0.3).T
    assert not x.is_contiguous() and not mask.is_contiguous()
    out, info = layer(x, padding_mask=mask)
    ref, ref_info = layer(x.contiguous(), padding_mask=mask.contiguous())
    assert torch.equal(out, ref)
    assert torch.equal(info.router_logits, ref_info.router_logits)
