"""Bad arguments raise a one-line ValueError naming the argument; a fixed seed reproduces everything."""

import re

import pytest
import torch

from hf_moe_mt.moe import SparseMoE

from .reference import parameter_grads

GOOD = dict(hidden_size=8, ffn_dim=16, num_experts=4)
BAD_CONSTRUCTION = [
    (dict(top_k=0), "top_k"),
    (dict(top_k=3), "top_k"),
    (dict(num_experts=1, top_k=2), "num_experts"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.25), "capacity_factor"),
    (dict(eval_capacity_factor=0.0), "eval_capacity_factor"),
    (dict(activation="swish-ish"), "activation"),
    (dict(min_capacity=-1), "min_capacity"),
    (dict(jitter_noise=1.5), "jitter_noise"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(ffn_dim=0), "ffn_dim"),
]


def _assert_one_line_naming(excinfo, name):
    message = str(excinfo.value)
    assert "\n" not in message.strip(), message
    assert re.search(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", message), f"{name!r} not named in: {message}"


@pytest.mark.parametrize("overrides,name", BAD_CONSTRUCTION, ids=[f"{n}-{v}" for v, n in BAD_CONSTRUCTION])
def test_bad_constructor_argument_raises_one_line_value_error(overrides, name):
    with pytest.raises(ValueError) as excinfo:
        SparseMoE(**{**GOOD, **overrides})
    _assert_one_line_naming(excinfo, name)


def test_wrong_hidden_size_raises_one_line_value_error():
    layer = SparseMoE(**GOOD)
    with pytest.raises(ValueError) as excinfo:
        layer(torch.randn(2, 3, 9))
    _assert_one_line_naming(excinfo, "hidden_size")


@pytest.mark.parametrize("mask_shape", [(2, 4), (5,), (2, 3, 2)])
def test_wrong_padding_mask_size_raises_one_line_value_error(mask_shape):
    layer = SparseMoE(**GOOD)
    with pytest.raises(ValueError) as excinfo:
        layer(torch.randn(2, 3, 8), padding_mask=torch.ones(mask_shape))
    _assert_one_line_naming(excinfo, "padding_mask")


def test_transposed_padding_mask_raises():
    """hidden_states [B=2, S=3, D] needs a [2, 3] mask; a transposed [3, 2] one has the same element count."""
    layer = SparseMoE(**GOOD)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).T  # [3, 2]: flattened, it marks other positions as real
    with pytest.raises(ValueError) as excinfo:
        layer(torch.randn(2, 3, 8), padding_mask=mask)
    _assert_one_line_naming(excinfo, "padding_mask")


def test_valid_edge_arguments_are_accepted():
    SparseMoE(**{**GOOD, "num_experts": 2}, top_k=2, min_capacity=0, jitter_noise=0.0, activation="gelu")


def _train_step(seed, top_k):
    torch.manual_seed(seed)
    layer = SparseMoE(8, 16, 4, top_k=top_k, capacity_factor=0.75, use_rts=True, jitter_noise=0.1)
    x = torch.randn(3, 7, 8, requires_grad=True)
    out, info = layer(x)
    (out.square().sum() + info.aux_loss + info.z_loss).backward()
    return out.detach(), info, x.grad, parameter_grads(layer)


@pytest.mark.parametrize("top_k", [1, 2])
def test_fixed_seed_reproduces_outputs_stats_and_grads_bitwise(top_k, kernel_path):
    out_a, info_a, xg_a, grads_a = _train_step(11, top_k)
    out_b, info_b, xg_b, grads_b = _train_step(11, top_k)
    assert torch.equal(out_a, out_b) and torch.equal(xg_a, xg_b)
    assert torch.equal(info_a.router_logits, info_b.router_logits)
    assert torch.equal(info_a.tokens_per_expert, info_b.tokens_per_expert)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    out_c, info_c, _, _ = _train_step(12, top_k)
    assert not torch.equal(out_a, out_c)
