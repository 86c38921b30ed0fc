"""A deliberately naive, per-token reference for SparseMoE, written from the spec (not from moe.py).

It loops over tokens, evaluates each chosen expert's FFN with plain matrix-vector products and
autograd's own activations, and applies capacity with an explicit per-expert counter walked in
priority order. Tests compare the layer against it in outputs and in every gradient.
Legend: N positions, T real tokens, D hidden, F ffn, E experts, K top-k.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch.nn import functional as F

from hf_moe_mt.moe import SparseMoE

ACTIVATION_FUNCTIONS = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_new": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


@dataclass
class ReferenceResult:
    output: torch.Tensor  # [..., D]
    choices: list[list[int]]  # per real token, its K experts (best first)
    kept: set[tuple[int, int]]  # surviving (token, j) pairs, token = index among real tokens
    tokens_per_expert: list[int]  # [E]
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    router_logits: torch.Tensor  # [..., E], zeros at padding
    dropped_fraction: float
    capacity: int | None


def spec_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """max(ceil(cf·K·T/E), min_capacity) in exact arithmetic on the factor as written in decimal."""
    return max(math.ceil(Fraction(str(factor)) * top_k * num_tokens / num_experts), min_capacity)


def expert_ffn(layer: SparseMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
    """[D] → [D]: W2_e · act(W1_e · x + b1_e) + b2_e, one token at a time."""
    experts = layer.experts
    act = ACTIVATION_FUNCTIONS[experts.activation]
    h = act(experts.up_proj[expert] @ x + experts.up_proj_bias[expert])
    return experts.down_proj[expert] @ h + experts.down_proj_bias[expert]


def position_priority(num_tokens: int, top_k: int) -> list[tuple[int, int]]:
    """All first choices in token order, then all second choices (DeepSpeed's order)."""
    return [(t, j) for j in range(top_k) for t in range(num_tokens)]


def reference_forward(
    layer: SparseMoE,
    hidden_states: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    priority: list[tuple[int, int]] | None = None,
    kept: set[tuple[int, int]] | None = None,
    router_logits: torch.Tensor | None = None,
) -> ReferenceResult:
    """Run `layer`'s parameters through the spec, token by token.

    priority: order in which pairs claim capacity (default: position order).
    kept: force the surviving pairs (used to check RTS outputs once the surviving set is known).
    router_logits: [N, E] logits to route with (jitter tests), instead of gate(x).
    """
    num_experts, top_k, hidden = layer.num_experts, layer.top_k, layer.hidden_size
    flat = hidden_states.reshape(-1, hidden)
    mask = [True] * flat.shape[0] if padding_mask is None else [bool(v) for v in padding_mask.reshape(-1)]
    real = [i for i, m in enumerate(mask) if m]
    num_tokens = len(real)
    logits, probs, choices = [], [], []
    for pos in real:
        if router_logits is None:
            logit = layer.gate.weight.float() @ flat[pos].float()
        else:
            logit = router_logits.reshape(-1, num_experts)[pos]
        prob = torch.softmax(logit, dim=-1)
        ranked = sorted(range(num_experts), key=lambda e: (-float(prob[e].detach()), e))
        logits.append(logit)
        probs.append(prob)
        choices.append(ranked[:top_k])
    capacity = None
    if layer.drop_tokens:
        factor = layer.capacity_factor if layer.training else layer.eval_capacity_factor
        capacity = max(math.ceil(Fraction(factor) * top_k * num_tokens / num_experts), layer.min_capacity)
    if kept is None:
        kept = _claim_capacity(choices, priority or position_priority(num_tokens, top_k), capacity, num_experts)
    counts = [0] * num_experts
    for t, j in kept:
        counts[choices[t][j]] += 1
    outputs = [None] * flat.shape[0]
    for t, pos in enumerate(real):
        outputs[pos] = _combine_token(layer, flat[pos], choices[t], probs[t], [(t, j) in kept for j in range(top_k)])
    zero = flat.new_zeros(hidden)
    output = torch.stack([zero if o is None else o for o in outputs]).view(hidden_states.shape)
    all_logits = [flat.new_zeros(num_experts)] * flat.shape[0]
    for t, pos in enumerate(real):
        all_logits[pos] = logits[t]
    aux, z = _losses(logits, probs, choices, num_experts, flat)
    dropped = 0.0 if num_tokens == 0 else 1.0 - len(kept) / (num_tokens * top_k)
    return ReferenceResult(
        output, choices, kept, counts, aux, z,
        torch.stack(all_logits).view(*hidden_states.shape[:-1], num_experts), dropped, capacity,
    )


def _claim_capacity(choices, priority, capacity, num_experts) -> set[tuple[int, int]]:
    """Walk pairs in priority order; each expert accepts pairs until it holds `capacity` of them."""
    held = [0] * num_experts
    kept = set()
    for t, j in priority:
        expert = choices[t][j]
        if capacity is None or held[expert] < capacity:
            held[expert] += 1
            kept.add((t, j))
    return kept


def _combine_token(layer, x, choices, prob, kept_flags) -> torch.Tensor:
    """Σ_j w_j FFN_{e_j}(x); top-1 w = p, top-2 w renormalised over the surviving pairs."""
    out = x.new_zeros(layer.hidden_size)
    if layer.top_k == 1:
        if kept_flags[0]:
            out = out + prob[choices[0]] * expert_ffn(layer, choices[0], x)
        return out
    kept_probs = [prob[e] for e, k in zip(choices, kept_flags) if k]
    if not kept_probs:
        return out
    denom = torch.clamp(sum(kept_probs), min=torch.finfo(torch.float32).eps)
    for e, k in zip(choices, kept_flags):
        if k:
            out = out + (prob[e] / denom) * expert_ffn(layer, e, x)
    return out


def _losses(logits, probs, choices, num_experts, like):
    """aux = E·Σ_e mean_t(p_e)·frac_e (frac from first choices), z = mean_t(logsumexp²)."""
    if not logits:
        return like.new_zeros(()), like.new_zeros(())
    num_tokens = len(logits)
    mean_prob = torch.stack(probs).sum(dim=0) / num_tokens
    frac = torch.tensor([sum(c[0] == e for c in choices) / num_tokens for e in range(num_experts)])
    aux = num_experts * (mean_prob * frac).sum()
    z = sum(torch.logsumexp(logit, dim=-1) ** 2 for logit in logits) / num_tokens
    return aux, z


def clone_layer(layer: SparseMoE) -> SparseMoE:
    """An independent copy (own parameters, own .grad) for the reference side of a comparison."""
    return copy.deepcopy(layer)


def randomize_(layer: SparseMoE, generator_seed: int = 0, router_std: float = 1.0, expert_std: float = 0.5) -> SparseMoE:
    """Non-trivial parameters: spread-out router probabilities and non-zero biases (init zeros them)."""
    gen = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for param, std in [
            (layer.gate.weight, router_std),
            (layer.experts.up_proj, expert_std),
            (layer.experts.up_proj_bias, expert_std),
            (layer.experts.down_proj, expert_std),
            (layer.experts.down_proj_bias, expert_std),
        ]:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return layer


def parameter_grads(layer: SparseMoE) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in layer.named_parameters()}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """Max-abs error within rtol of the expected tensor's largest magnitude (fp32 summation-order noise)."""
    assert actual is not None, f"{name}: gradient is None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max abs error {err:.3e} > {rtol:g} x scale {scale:.3e}"


def infer_kept_pairs(layer: SparseMoE, hidden_states: torch.Tensor, output: torch.Tensor) -> set[tuple[int, int]]:
    """Which (token, j) pairs survived, read off the layer's output (no padding): for each token, the one
    subset of its K pairs whose reference combination reproduces the output row (all others far away)."""
    import itertools

    flat, out_flat = hidden_states.reshape(-1, layer.hidden_size), output.reshape(-1, layer.hidden_size)
    kept = set()
    with torch.no_grad():
        for t in range(flat.shape[0]):
            prob = torch.softmax(layer.gate.weight.float() @ flat[t].float(), dim=-1)
            choices = sorted(range(layer.num_experts), key=lambda e: (-float(prob[e]), e))[: layer.top_k]
            scored = []
            for flags in itertools.product([False, True], repeat=layer.top_k):
                candidate = _combine_token(layer, flat[t], choices, prob, list(flags))
                scored.append((float((candidate - out_flat[t]).abs().max()), flags))
            scored.sort()
            scale = max(float(out_flat[t].abs().max()), 1e-3)
            assert scored[0][0] <= 1e-5 * scale, f"token {t}: no subset of its pairs reproduces the output"
            assert scored[1][0] > 1e-3 * scale, f"token {t}: ambiguous surviving pairs"
            kept.update((t, j) for j, flag in enumerate(scored[0][1]) if flag)
    return kept


def layer_with_logits(num_experts: int, top_k: int, logits: torch.Tensor, hidden: int = 8, **kwargs):
    """A layer whose router logits are exactly `logits` [T, E]: gate = identity on the first E features."""
    layer = randomize_(SparseMoE(hidden, 8, num_experts, top_k=top_k, **kwargs))
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(num_experts, hidden))
    x = torch.randn(logits.shape[0], hidden)
    x[:, :num_experts] = logits
    return layer, x
