"""Capacity = max(ceil(cf·K·T/E), min_capacity) over the T non-padding tokens; train vs eval factor;
dropless keeps every pair."""

import itertools

import pytest
import torch

from hf_moe_mt.moe import SparseMoE, expert_capacity

from .reference import spec_capacity

D = 8


def _skewed_layer(num_experts, top_k, **kwargs):
    """Every token's first choice is expert 0 and its second expert 1 (for x[..., 0] > 0)."""
    layer = SparseMoE(D, 8, num_experts, top_k=top_k, **kwargs)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 10.0
        layer.gate.weight[1, 0] = 5.0
    return layer


def _skewed_inputs(batch, seq):
    x = torch.randn(batch, seq, D)
    x[..., 0] = 1.0 + torch.rand(batch, seq)
    return x


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.25, 2.0, 3.5])
def test_expert_capacity_matches_formula_for_exact_factors(factor):
    for tokens, experts, top_k, min_capacity in itertools.product([1, 7, 64, 100, 333, 4096], [1, 3, 8, 32, 128],
                                                                  [1, 2], [0, 4, 50]):
        expected = spec_capacity(tokens, experts, top_k, factor, min_capacity)
        assert expert_capacity(tokens, experts, top_k, factor, min_capacity) == expected, (tokens, experts, top_k)


def test_expert_capacity_matches_formula_for_decimal_factors():
    """A user's capacity_factor=1.1 means 11/10: ceil(1.1·100/10) = 11. Computed as 1.1*1*100/10 in binary
    floating point it is 11.000000000000002 and ceil() rounds it up to 12."""
    mismatches = []
    for factor, tokens, experts, top_k in itertools.product([0.3, 0.6, 0.7, 1.1, 1.2, 2.2], range(1, 120),
                                                            [1, 3, 5, 10, 11], [1, 2]):
        expected = spec_capacity(tokens, experts, top_k, factor, 0)
        got = expert_capacity(tokens, experts, top_k, factor, 0)
        if got != expected:
            mismatches.append((factor, tokens, experts, top_k, got, expected))
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. (cf, T, E, K, got, expected) = {mismatches[:3]}"


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_capacity_uses_train_factor_in_training_and_eval_factor_in_eval(top_k):
    layer = SparseMoE(D, 8, 8, top_k=top_k, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=4)
    layer.train()
    assert layer.capacity(100) == spec_capacity(100, 8, top_k, 1.0, 4)
    layer.eval()
    assert layer.capacity(100) == spec_capacity(100, 8, top_k, 2.0, 4)
    assert layer.capacity(3) == 4  # min_capacity wins for tiny batches


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_overflowing_expert_keeps_exactly_capacity_real_tokens(top_k, training):
    """All real tokens pick expert 0 (and 1): each keeps exactly capacity(T_real) pairs; padding is not counted."""
    layer = _skewed_layer(8, top_k, capacity_factor=1.25, eval_capacity_factor=2.5, min_capacity=2)
    layer.train(training)
    x = _skewed_inputs(2, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 13:] = False  # 53 real tokens out of 80 positions
    real = 53
    _, info = layer(x, padding_mask=mask)
    factor = 1.25 if training else 2.5
    capacity = spec_capacity(real, 8, top_k, factor, 2)
    assert capacity < real  # the test needs an overflow
    expected = [capacity] + [0] * 7 if top_k == 1 else [capacity, capacity] + [0] * 6
    assert info.tokens_per_expert.tolist() == expected
    assert info.tokens_per_expert.dtype == torch.int64
    assert float(info.dropped_fraction) == pytest.approx(1 - capacity * top_k / (real * top_k), abs=1e-6)


def test_min_capacity_applies_when_formula_is_smaller():
    layer = _skewed_layer(8, 1, capacity_factor=1.0, min_capacity=6)
    _, info = layer(_skewed_inputs(1, 16))  # ceil(16/8) = 2 < 6
    assert info.tokens_per_expert[0].item() == 6


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_keeps_every_pair_even_when_one_expert_takes_all(top_k, training):
    layer = _skewed_layer(8, top_k, drop_tokens=False, capacity_factor=0.1, eval_capacity_factor=0.1)
    layer.train(training)
    assert layer.capacity(1000) is None
    x = _skewed_inputs(3, 17)
    out, info = layer(x)
    assert info.tokens_per_expert.tolist() == [51] * top_k + [0] * (8 - top_k)
    assert float(info.dropped_fraction) == 0.0
    assert torch.count_nonzero(out.abs().sum(-1)) == 51  # no token lost its output
