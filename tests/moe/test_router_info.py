"""RouterInfo: aux loss (1.0 at perfect balance, computed before dropping), z-loss, fp32 router logits,
tokens per expert, dropped fraction, and multiplicative jitter on the router input only."""

import math

import pytest
import torch

from hf_moe_mt.moe import SparseMoE

from .reference import assert_close_rel, layer_with_logits, randomize_, reference_forward


def _balanced_logits(num_experts, tokens_per_expert, high=2.5, second=1.0):
    """Token t prefers expert t % E, then (t+1) % E; over whole rounds of E tokens every expert is first
    and second choice equally often and has mean probability exactly 1/E."""
    logits = torch.zeros(num_experts * tokens_per_expert, num_experts)
    tokens = torch.arange(logits.shape[0])
    logits[tokens, tokens % num_experts] = high
    logits[tokens, (tokens + 1) % num_experts] = second
    return logits


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [4, 8])
def test_aux_loss_is_one_for_perfectly_balanced_routing(num_experts, top_k):
    layer, x = layer_with_logits(num_experts, top_k, _balanced_logits(num_experts, 3), hidden=num_experts + 2)
    _, info = layer(x)
    assert float(info.aux_loss.detach()) == pytest.approx(1.0, abs=1e-6)
    assert info.tokens_per_expert.tolist() == [3 * top_k] * num_experts


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_grows_with_imbalance(top_k):
    """All tokens to expert 0 with probability p0: aux = E·p0·1 > 1; half of them: in between."""
    logits = torch.zeros(12, 4)
    logits[:, 0] = 3.0
    logits[:, 1] = 1.0
    layer, x = layer_with_logits(4, top_k, logits)
    _, info = layer(x)
    p0 = torch.softmax(logits[0], -1)[0].item()
    assert float(info.aux_loss.detach()) == pytest.approx(4 * p0, rel=1e-6)
    half = torch.cat([logits[:6], _balanced_logits(4, 2)[:6]])
    layer_half, x_half = layer_with_logits(4, top_k, half)
    aux_half = float(layer_half(x_half)[1].aux_loss.detach())
    assert 1.0 < aux_half < float(info.aux_loss.detach())


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_and_z_loss_follow_their_formulas_and_ignore_dropping(top_k):
    """aux = E·Σ_e mean_t(p_e)·frac_e (frac from first choices, before capacity), z = mean_t(lse(logits)²)."""
    layer = randomize_(SparseMoE(10, 12, 6, top_k=top_k, capacity_factor=0.25, min_capacity=0, use_rts=False))
    x = torch.randn(40, 10)
    _, info = layer(x)
    logits = x @ layer.gate.weight.T
    probs = torch.softmax(logits, -1)
    frac = torch.bincount(probs.argmax(-1), minlength=6).float() / 40
    assert float(info.dropped_fraction) > 0.3
    assert_close_rel(info.aux_loss, 6 * (probs.mean(0) * frac).sum(), name="aux")
    assert_close_rel(info.z_loss, torch.logsumexp(logits, -1).square().mean(), name="z")
    layer.drop_tokens = False
    _, dropless = layer(x)
    assert float(dropless.dropped_fraction) == 0.0
    assert float(dropless.aux_loss.detach()) == pytest.approx(float(info.aux_loss.detach()), rel=1e-6)
    assert float(dropless.z_loss.detach()) == pytest.approx(float(info.z_loss.detach()), rel=1e-6)


def test_router_runs_in_fp32_for_bf16_inputs():
    layer = randomize_(SparseMoE(8, 16, 4, top_k=2, drop_tokens=False)).to(torch.bfloat16)
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    out, info = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert info.router_logits.dtype == torch.float32 and info.aux_loss.dtype == torch.float32
    expected = x.float().reshape(-1, 8) @ layer.gate.weight.float().T
    assert torch.equal(info.router_logits.reshape(-1, 4), expected)


def test_tokens_per_expert_and_dropped_fraction_for_a_known_routing():
    """T=10, E=2, top-1: 7 tokens want expert 0 and 3 expert 1; capacity ceil(10/2)=5 → [5, 3], 2/10 dropped."""
    logits = torch.zeros(10, 2)
    logits[:7, 0] = 2.0
    logits[7:, 1] = 2.0
    layer, x = layer_with_logits(2, 1, logits, capacity_factor=1.0, min_capacity=0, use_rts=False)
    _, info = layer(x)
    assert info.tokens_per_expert.tolist() == [5, 3]
    assert float(info.dropped_fraction) == pytest.approx(0.2, abs=1e-7)


def test_jitter_perturbs_only_the_router_input_and_only_in_training():
    """Training: logits = (x ⊙ n) Wᵀ with n ∈ [1-ε, 1+ε], but experts see the clean x, so the output equals
    the reference routed with the reported logits. Eval: no noise at all."""
    eps = 0.2
    layer = randomize_(SparseMoE(8, 12, 4, top_k=2, drop_tokens=False, jitter_noise=eps))
    x = torch.randn(24, 8)
    clean = x @ layer.gate.weight.T
    out, info = layer(x)
    assert not torch.allclose(info.router_logits, clean)
    bound = eps * (x.abs() @ layer.gate.weight.abs().T) + 1e-5
    assert torch.all((info.router_logits - clean).abs() <= bound)
    ref = reference_forward(layer, x, router_logits=info.router_logits)
    assert_close_rel(out, ref.output, name="output with clean expert inputs")
    layer.eval()
    _, eval_info = layer(x)
    assert torch.allclose(eval_info.router_logits, clean, rtol=1e-6, atol=1e-6)


def test_router_info_shapes_follow_the_input():
    layer = SparseMoE(8, 16, 4, top_k=2)
    out, info = layer(torch.randn(2, 3, 5, 8))
    assert out.shape == (2, 3, 5, 8)
    assert info.router_logits.shape == (2, 3, 5, 4)
    assert info.tokens_per_expert.shape == (4,)
    assert info.aux_loss.shape == info.z_loss.shape == info.dropped_fraction.shape == ()
    assert math.isfinite(float(info.z_loss.detach()))
