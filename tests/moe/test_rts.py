"""Random Token Selection: an overflowing expert keeps exactly `capacity` pairs, a uniformly random subset
(top-1 and top-2), reproducible per seed; position mode keeps the first pairs; eval mode never samples."""

import pytest
import torch

from hf_moe_mt.moe import SparseMoE, plan_routing

from .reference import (assert_close_rel, clone_layer, infer_kept_pairs, layer_with_logits, parameter_grads,
                        randomize_, reference_forward)


def _contested_top2_logits():
    """E=4, T=8. Tokens 0-3 choose (1, 0), tokens 4-7 choose (0, 2): expert 0 holds 8 pairs, the four
    EARLIER ones being second choices. With cf=1, K=2: capacity = ceil(2·8/4) = 4."""
    logits = torch.zeros(8, 4)
    logits[:4, 1], logits[:4, 0] = 4.0, 2.0
    logits[4:, 0], logits[4:, 2] = 4.0, 2.0
    return logits


def _kept_with_seed(layer, x, seed):
    torch.manual_seed(seed)
    out, info = layer(x)
    return frozenset(infer_kept_pairs(layer, x, out)), info


def test_position_mode_top1_keeps_the_first_tokens():
    logits = torch.zeros(10, 2)
    logits[:, 0] = 3.0  # every token wants expert 0, capacity ceil(10/2) = 5
    layer, x = layer_with_logits(2, 1, logits, capacity_factor=1.0, min_capacity=0, use_rts=False)
    out, info = layer(x)
    assert infer_kept_pairs(layer, x, out) == {(t, 0) for t in range(5)}
    assert torch.count_nonzero(out[5:]) == 0
    assert info.tokens_per_expert.tolist() == [5, 0]


def test_position_mode_top2_keeps_first_choices_before_second_choices():
    layer, x = layer_with_logits(4, 2, _contested_top2_logits(), capacity_factor=1.0, min_capacity=0, use_rts=False)
    out, info = layer(x)
    expected = {(t, 0) for t in range(8)} | {(t, 1) for t in range(4, 8)}
    assert infer_kept_pairs(layer, x, out) == expected
    assert info.tokens_per_expert.tolist() == [4, 4, 4, 0]
    assert float(info.dropped_fraction) == pytest.approx(0.25)


def test_top2_weights_renormalised_over_surviving_pairs():
    """Tokens 0-3 lost their second pair: output = 1.0·FFN_1(x). Tokens 4-7 kept both: p_a/(p_a+p_b) each."""
    layer, x = layer_with_logits(4, 2, _contested_top2_logits(), capacity_factor=1.0, min_capacity=0, use_rts=False)
    out, _ = layer(x)
    ffn = [reference_ffn_rows(layer, e, x) for e in range(4)]
    p = torch.softmax(_contested_top2_logits(), dim=-1)
    assert_close_rel(out[:4], ffn[1][:4], name="single survivor gets weight 1")
    both = (p[4:, 0:1] * ffn[0][4:] + p[4:, 2:3] * ffn[2][4:]) / (p[4:, 0:1] + p[4:, 2:3])
    assert_close_rel(out[4:], both, name="two survivors renormalised")


def reference_ffn_rows(layer, expert, x):
    ex = layer.experts
    h = torch.relu(x @ ex.up_proj[expert].T + ex.up_proj_bias[expert])
    return (h @ ex.down_proj[expert].T + ex.down_proj_bias[expert]).detach()


@pytest.mark.parametrize("top_k", [1, 2])
def test_rts_keeps_exactly_capacity_and_matches_reference_on_the_kept_pairs(top_k, kernel_path):
    """Random layer, cf 0.5: every expert keeps min(demand, capacity) pairs; given the surviving set the
    output and all gradients equal the per-token reference."""
    layer = randomize_(SparseMoE(8, 12, 4, top_k=top_k, capacity_factor=0.5, min_capacity=0, use_rts=True))
    x = torch.randn(32, 8)
    torch.manual_seed(3)
    out, info = layer(x.requires_grad_(True))
    kept = infer_kept_pairs(layer, x, out)
    demand = reference_forward(layer, x, kept=set()).choices
    capacity = layer.capacity(32)
    for e in range(4):
        wanted = sum(c.count(e) for c in demand)
        held = sum(demand[t][j] == e for t, j in kept)
        assert held == min(wanted, capacity) == info.tokens_per_expert[e].item(), f"expert {e}"
    assert len(kept) < 32 * top_k  # something overflowed
    ref_layer, x_ref = clone_layer(layer), x.detach().clone().requires_grad_(True)
    ref = reference_forward(ref_layer, x_ref, kept=kept)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.output.backward(grad_out)
    assert_close_rel(out, ref.output, name="output")
    assert_close_rel(x.grad, x_ref.grad, name="grad hidden_states")
    ref_grads = parameter_grads(ref_layer)
    for name, grad in parameter_grads(layer).items():
        assert_close_rel(grad, ref_grads[name], name=f"grad {name}")
    kernel_path.assert_only(kernel_path.name)


@pytest.mark.parametrize("top_k", [1, 2])
def test_rts_subset_depends_on_seed_and_only_on_seed(top_k):
    logits = _contested_top2_logits() if top_k == 2 else torch.zeros(8, 4).index_fill_(1, torch.tensor([0]), 3.0)
    layer, x = layer_with_logits(4, top_k, logits, capacity_factor=1.0, min_capacity=0, use_rts=True)
    capacity = layer.capacity(8)
    subsets = {}
    for seed in range(8):
        kept, info = _kept_with_seed(layer, x, seed)
        assert info.tokens_per_expert[0].item() == capacity
        assert kept == _kept_with_seed(layer, x, seed)[0], f"seed {seed} not reproducible"
        subsets[seed] = kept
    assert len(set(subsets.values())) >= 5, "different seeds should pick different subsets"


def test_rts_top2_samples_second_choices_too():
    """Position mode never keeps expert 0's second-choice pairs here; RTS keeps some of them."""
    layer, x = layer_with_logits(4, 2, _contested_top2_logits(), capacity_factor=1.0, min_capacity=0, use_rts=True)
    kept_second = set()
    for seed in range(6):
        kept, _ = _kept_with_seed(layer, x, seed)
        kept_second |= {t for t, j in kept if j == 1 and t < 4}
    assert kept_second, "RTS never kept a second-choice pair of the overflowing expert"


@pytest.mark.parametrize("top_k", [1, 2])
def test_rts_subset_is_uniform_over_the_experts_pairs(top_k):
    """1000 draws: each of expert 0's 8 contested pairs survives with probability capacity/8 = 1/2,
    first and second choices alike; uncontested pairs always survive."""
    probs = torch.softmax(_contested_top2_logits(), dim=-1)
    if top_k == 1:
        probs = torch.softmax(torch.zeros(8, 4).index_fill_(1, torch.tensor([0]), 3.0), dim=-1)
    kept_count = torch.zeros(8 * top_k)
    draws = 1000
    for seed in range(draws):
        torch.manual_seed(seed)
        plan = plan_routing(probs, top_k, capacity=4, random_priority=True)
        kept_count[plan.kept_pairs] += 1
    freq = (kept_count / draws).view(8, top_k)
    if top_k == 1:
        assert torch.all((freq - 0.5).abs() < 0.08), freq  # 5 sigma
    else:
        contested = torch.cat([freq[:4, 1], freq[4:, 0]])
        assert torch.all((contested - 0.5).abs() < 0.08), freq
        assert torch.all(freq[:4, 0] == 1) and torch.all(freq[4:, 1] == 1), freq


@pytest.mark.parametrize("top_k", [1, 2])
def test_rts_is_off_in_eval_mode(top_k):
    """eval with an overflowing expert: the same (position-order) subset for every seed."""
    logits = _contested_top2_logits() if top_k == 2 else torch.zeros(8, 4).index_fill_(1, torch.tensor([0]), 3.0)
    layer, x = layer_with_logits(4, top_k, logits, eval_capacity_factor=1.0, min_capacity=0, use_rts=True)
    layer.eval()
    expected = reference_forward(layer, x).kept  # position priority
    assert len(expected) < 8 * top_k
    for seed in range(4):
        assert _kept_with_seed(layer, x, seed)[0] == expected
