"""The sparse MoE feed-forward layer (paper routing + grouped-GEMM experts), pure PyTorch.

Travels with the Hub's remote code: it must not import transformers, deepspeed or anything outside
torch and its flat siblings. Legend for shape comments: N all positions, T real (non-padding) tokens,
D hidden size, F expert ffn size, E experts, K top-k, P = T·K (token, expert) pairs, R kept pairs.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from fractions import Fraction
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .moe_kernels import ACTIVATIONS, ExpertsKernel, check_kernel, grouped_ffn


@dataclass
class RouterInfo:
    """What one SparseMoE call reports about its routing (for losses, logging and tests).

    Not frozen: transformers' exporters rebuild model outputs by setting every tensor attribute in place (dtype
    and device casts), and a frozen dataclass refuses that.
    """

    aux_loss: torch.Tensor  # scalar fp32: E·Σ_e mean_t(p_e)·frac_e, before dropping; 1.0 = balanced
    z_loss: torch.Tensor  # scalar fp32: mean_t(logsumexp(logits)²)
    router_logits: torch.Tensor  # [..., E] fp32, zeros at padding positions
    tokens_per_expert: torch.Tensor  # [E] int64: (token, expert) pairs each expert processed
    dropped_fraction: torch.Tensor  # scalar fp32: dropped pairs / (T·K)


@dataclass(frozen=True)
class RoutingPlan:
    """Which (token, expert) pairs survive and where they go; handed from routing to dispatch/combine.

    Pairs are numbered p = t·K + j (token t's j-th choice). `kept_pairs` lists the surviving pairs
    sorted by expert; every expert's rows are contiguous, expert e owning `tokens_per_expert[e]` rows.
    `row_of_pair` is the inverse map, so both directions of dispatch/combine are gathers (no scatter-add).
    """

    kept_pairs: torch.Tensor  # [R] int64, pair ids sorted by expert
    row_of_pair: torch.Tensor  # [P] int64, the row of each pair in kept order; R for a dropped pair
    tokens_per_expert: torch.Tensor  # [E] int64, sums to R
    combine_weights: torch.Tensor  # [T, K] fp32, 0 for dropped pairs
    num_tokens: int  # T
    top_k: int  # K

    @property
    def token_index(self) -> torch.Tensor:
        """[R] the token each kept pair belongs to."""
        return torch.div(self.kept_pairs, self.top_k, rounding_mode="floor")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Per-expert capacity `max(ceil(cf·K·T/E), min_capacity)` (DeepSpeed's definition, T = real tokens).

    Exact decimal arithmetic: in floats 1.1·100/10 = 11.000000000000002, which `ceil` turns into 12.
    Integer ceil-division keeps it traceable when torch.compile makes `num_tokens` symbolic.
    """
    numerator, denominator = Fraction(repr(float(capacity_factor))).as_integer_ratio()
    return max(-(-(numerator * top_k * num_tokens) // (denominator * num_experts)), min_capacity)


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 occurrences of each expert id. Not `torch.bincount`: on CUDA it reads max(ids) back to
    the host to size its output, a GPU sync in every MoE layer."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    return counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))


def load_balancing_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """Switch/DeepSpeed aux loss E·Σ_e mean_t(p_e)·frac_e with frac from the first choice; 1.0 when balanced."""
    num_experts = probs.shape[-1]
    frac = count_per_expert(first_choice, num_experts).to(probs.dtype) / first_choice.numel()
    return num_experts * torch.sum(probs.mean(dim=0) * frac)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss mean(logsumexp(logits)²): keeps router logits small so fp32/bf16 softmax stays stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def plan_routing(
    probs: torch.Tensor, top_k: int, capacity: int | None, random_priority: bool
) -> RoutingPlan:
    """Choose top-k experts per token, then decide which pairs each expert keeps.

    1. top-k experts per token (ties broken by lower expert id).
    2. Order every expert's pairs by priority: random (RTS) or by position (all first choices in token
       order, then all second choices: DeepSpeed's top-2 order).
    3. One argsort over `expert·P + priority` groups pairs by expert in priority order; the first
       `capacity` of each expert survive (all of them when `capacity is None`, the dropless mode).
    4. Combine weights: the router probability for top-1; for top-2 the two probabilities renormalised
       over the pairs that survived (GShard/DeepSpeed), so a token that lost one pair keeps its scale.
    """
    num_tokens, num_experts = probs.shape
    num_pairs = num_tokens * top_k
    device = probs.device
    # 1.
    topk_probs, topk_experts = probs.topk(top_k, dim=-1)  # [T, K]
    expert_of_pair = topk_experts.reshape(-1)  # [P]
    # 2. Priorities are a permutation of 0..P-1, so the sort keys below are unique (deterministic order).
    # Dropless keeps every pair: no random draw, so the RNG stream and the row order do not depend on it.
    if random_priority and capacity is not None:
        priority = torch.randperm(num_pairs, device=device)
    else:
        pair = torch.arange(num_pairs, device=device)
        priority = (pair % top_k) * num_tokens + torch.div(pair, top_k, rounding_mode="floor")
    # 3.
    order = torch.argsort(expert_of_pair * num_pairs + priority)  # [P] pair ids grouped by expert
    counts = count_per_expert(expert_of_pair, num_experts)  # [E]
    if capacity is None:
        kept_pairs, kept_counts = order, counts
    else:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(num_pairs, device=device) - starts[expert_of_pair[order]]
        kept_pairs = order[rank_in_expert < capacity]  # sizes the expert batch: the one host sync
        kept_counts = counts.clamp(max=capacity)
    num_kept = kept_pairs.shape[0]
    row_of_pair = torch.full((num_pairs,), num_kept, dtype=torch.int64, device=device)
    row_of_pair.index_copy_(0, kept_pairs, torch.arange(num_kept, device=device))  # unique indices: no races
    # 4.
    weights = topk_probs if num_kept == num_pairs else topk_probs * (row_of_pair < num_kept).view(num_tokens, top_k)
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return RoutingPlan(kept_pairs, row_of_pair, kept_counts, weights, num_tokens, top_k)


def dispatch(tokens: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[T, D] → [R, D]: one row per kept pair, grouped by expert (no one-hot, no capacity padding)."""
    return _Dispatch.apply(tokens, plan.token_index, plan.row_of_pair, plan.top_k)


def combine(expert_out: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[R, D] → [T, D]: weighted sum over each token's kept pairs; dropped pairs contribute zero."""
    return _Combine.apply(expert_out, plan.combine_weights, plan.kept_pairs, plan.row_of_pair)


def _rows_of_pairs(rows: torch.Tensor, row_of_pair: torch.Tensor) -> torch.Tensor:
    """[R, D] → [P, D]: each pair's row, a zero row for a dropped pair (row index R)."""
    if row_of_pair.shape[0] > rows.shape[0]:  # some pair was dropped (R < P)
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return rows.index_select(0, row_of_pair)


class _Dispatch(torch.autograd.Function):
    """Gather token rows into kept-pair order. The backward gathers each pair's gradient row back and sums
    a token's K rows: autograd's own derivative of index_select is a scatter-add, which uses atomics on
    GPUs (slow for bf16, and nondeterministic in general)."""

    @staticmethod
    def forward(ctx, tokens, token_of_row, row_of_pair, top_k):
        ctx.save_for_backward(row_of_pair)
        ctx.num_tokens, ctx.top_k = tokens.shape[0], top_k
        return tokens.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_of_pair,) = ctx.saved_tensors
        per_pair = _rows_of_pairs(grad_rows, row_of_pair).view(ctx.num_tokens, ctx.top_k, grad_rows.shape[-1])
        return (per_pair[:, 0] if ctx.top_k == 1 else per_pair.sum(dim=1)), None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = Σ_j w[t, j] · rows[row_of_pair[t·K + j]], gathers in both directions (see _Dispatch)."""

    @staticmethod
    def forward(ctx, expert_out, weights, kept_pairs, row_of_pair):
        num_tokens, top_k = weights.shape
        per_pair = _rows_of_pairs(expert_out, row_of_pair).view(num_tokens, top_k, expert_out.shape[-1])  # [T, K, D]
        out = (per_pair * weights.to(expert_out.dtype).unsqueeze(-1)).sum(dim=1)
        ctx.save_for_backward(per_pair, weights, kept_pairs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        per_pair, weights, kept_pairs = ctx.saved_tensors
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = torch.einsum("tkd,td->tk", per_pair, grad_out).to(weights.dtype)
        grad_per_pair = grad_out.unsqueeze(1) * weights.to(grad_out.dtype).unsqueeze(-1)  # [T, K, D]
        grad_rows = grad_per_pair.view(-1, grad_out.shape[-1]).index_select(0, kept_pairs)
        return grad_rows, grad_weights, None, None


class TopKRouter(nn.Module):
    """`mlp.gate`: a bias-free linear map to expert logits, always evaluated in fp32."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        # fp32 written out: `from_config(dtype=bf16)` and `torch.set_default_dtype` must not create a bf16 router
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, D] → [T, E] fp32 logits. fp32 because bf16 softmax over experts flips top-k choices; also under
        autocast, which would otherwise run this GEMM in its low-precision dtype."""
        device = hidden_states.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            return F.linear(hidden_states.float(), self.weight.float())


def _grouped_ffn_op(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                    w2: torch.Tensor, b2: torch.Tensor, activation: str, implementation: str) -> torch.Tensor:
    return grouped_ffn(x, tokens_per_expert, w1, b1, w2, b2, activation, implementation)


# torch.compile cannot trace the experts: each one's row count is data (on CPU read with `.tolist()`). A compiled
# forward therefore calls them as one opaque operator, so decoding compiles without a graph break. Inside, CUDA runs
# grouped GEMMs on device-side offsets (no host sync); on CPU reading the counts costs nothing. Inference only: no
# autograd is registered, so a compiled training step keeps the plain call (and its graph break). One namespace
# per loaded copy of this file (the package and Hub remote code may both be imported in one process).
_OP_NAMESPACE = re.sub(r"\W", "_", __name__)
opaque_grouped_ffn = torch.library.custom_op(f"{_OP_NAMESPACE}::grouped_ffn", mutates_args=())(_grouped_ffn_op)
opaque_grouped_ffn.register_fake(lambda x, tokens_per_expert, w1, b1, w2, b2, activation, implementation: x.new_empty(
    x.shape[0], w2.shape[1]))


class GroupedExperts(nn.Module):
    """`mlp.experts`: E two-layer FFNs stored as stacked tensors, experts on dim 0.

    `up_proj` [E, F, D], `up_proj_bias` [E, F], `down_proj` [E, D, F], `down_proj_bias` [E, D] —
    the on-disk format for every expert-parallel size (a rank holds a contiguous slice of dim 0).
    forward(x [R, D] grouped by expert, tokens_per_expert [E]) → [R, D].
    `implementation`: which kernel computes them (`moe_kernels.KERNELS` name or a kernel callable; not saved
    with the weights); `set_experts_kernel` changes it on a whole model.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_dim: int, activation: str = "relu",
                 implementation: str | ExpertsKernel = "auto"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.num_experts, self.hidden_size, self.ffn_dim = num_experts, hidden_size, ffn_dim
        self.activation = activation
        self.implementation = check_kernel(implementation)
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, hidden_size))
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, ffn_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_dim))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)
        nn.init.zeros_(self.up_proj_bias)
        nn.init.zeros_(self.down_proj_bias)

    def forward(self, hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        weights = (self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # An operator takes a kernel's name, not a function: a speed backend's kernel (a callable, e.g. the CPU
            # worker threads) steps aside under torch.compile, as the backend's Linear routing does.
            name = self.implementation if isinstance(self.implementation, str) else "auto"
            return opaque_grouped_ffn(hidden_states, tokens_per_expert, *weights, self.activation, name)
        return grouped_ffn(hidden_states, tokens_per_expert, *weights, self.activation, self.implementation)

    def extra_repr(self) -> str:
        kernel = getattr(self.implementation, "__name__", self.implementation)
        return f"num_experts={self.num_experts}, activation={self.activation}, implementation={kernel}"


def set_experts_kernel(model: nn.Module, implementation: str | ExpertsKernel) -> int:
    """Run every GroupedExperts in `model` (expert-parallel ones included) with `implementation`; returns how
    many there were. The config's `experts_kernel` sets the same at construction."""
    check_kernel(implementation)
    experts = [module for module in model.modules() if isinstance(module, GroupedExperts)]
    for module in experts:
        module.implementation = implementation
    return len(experts)


class SparseMoE(nn.Module):
    """The paper's MoE FFN: top-1/top-2 routing with capacity, Random Token Selection and jitter.

    forward(hidden_states [..., D], padding_mask [...] (1/True = real token) or None)
      → (output [..., D], RouterInfo). Padding positions are never routed and get zero output;
    dropped pairs contribute zero (the residual connection around this layer carries the token).
    Expert parallelism replaces `self.experts` from outside (see parallel.py); nothing here
    depends on the world size.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        use_rts: bool = True,
        drop_tokens: bool = True,
        jitter_noise: float = 0.0,
        activation: str = "relu",
        experts_kernel: str | ExpertsKernel = "auto",
    ):
        super().__init__()
        _check_arguments(hidden_size, ffn_dim, num_experts, top_k, capacity_factor, eval_capacity_factor,
                         min_capacity, jitter_noise)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor, self.min_capacity = capacity_factor, eval_capacity_factor, min_capacity
        self.use_rts, self.drop_tokens, self.jitter_noise = use_rts, drop_tokens, jitter_noise
        self.gate = TopKRouter(hidden_size, num_experts)
        self.experts = GroupedExperts(num_experts, hidden_size, ffn_dim, activation, experts_kernel)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for `num_tokens` real tokens in the current mode; None = dropless."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, self.top_k, factor, self.min_capacity)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """1. keep real tokens  2. router logits (fp32, jitter)  3. plan  4. dispatch → experts → combine
        5. scatter back to every position and report."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has last dimension {hidden_states.shape[-1]} but the layer was built with "
                f"hidden_size={self.hidden_size}; pass [..., {self.hidden_size}] inputs"
            )
        # 1.
        flat = hidden_states.reshape(-1, self.hidden_size)  # [N, D]
        real_index = _real_token_index(padding_mask, hidden_states.shape[:-1])
        tokens = flat if real_index is None else flat.index_select(0, real_index)  # [T, D]
        # 2.
        router_input = tokens
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(tokens).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = tokens * noise
        logits = self.gate(router_input)  # [T, E] fp32
        probs = torch.softmax(logits, dim=-1)
        # 3. RTS only while training: evaluation and translation stay deterministic.
        plan = plan_routing(probs, self.top_k, self.capacity(tokens.shape[0]), self.use_rts and self.training)
        # 4.
        expert_out = self.experts(dispatch(tokens, plan), plan.tokens_per_expert)  # [R, D]
        out = combine(expert_out, plan)  # [T, D]
        # 5.
        info = self._router_info(logits, probs, plan, hidden_states.shape[:-1], real_index)
        if real_index is not None:
            out = flat.new_zeros(flat.shape).index_copy(0, real_index, out)
        return out.view(hidden_states.shape), info

    def _router_info(self, logits, probs, plan: RoutingPlan, lead_shape, real_index) -> RouterInfo:
        num_pairs = plan.num_tokens * self.top_k
        if plan.num_tokens == 0:
            zero = logits.new_zeros(())
            aux, z, dropped = zero, zero, zero
        else:
            aux = load_balancing_loss(probs, probs.argmax(dim=-1))
            z = router_z_loss(logits)
            dropped = 1.0 - plan.tokens_per_expert.sum().to(torch.float32) / num_pairs
        if real_index is not None:
            logits = logits.new_zeros(math.prod(lead_shape), self.num_experts).index_copy(0, real_index, logits)
        return RouterInfo(aux, z, logits.view(*lead_shape, self.num_experts), plan.tokens_per_expert, dropped)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
                f"use_rts={self.use_rts}, drop_tokens={self.drop_tokens}, jitter_noise={self.jitter_noise}")


def _real_token_index(padding_mask: torch.Tensor | None, lead_shape: torch.Size) -> torch.Tensor | None:
    """Indices of real tokens, or None when every position is real (the common, copy-free case)."""
    if padding_mask is None:
        return None
    if padding_mask.shape != lead_shape:
        raise ValueError(
            f"padding_mask has shape {tuple(padding_mask.shape)} but hidden_states has {tuple(lead_shape)} "
            "positions; pass a mask shaped like hidden_states[..., 0]"
        )
    mask = padding_mask.reshape(-1).bool()
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _check_arguments(hidden_size, ffn_dim, num_experts, top_k, capacity_factor, eval_capacity_factor,
                     min_capacity, jitter_noise) -> None:
    checks = [
        (hidden_size > 0, f"hidden_size={hidden_size} must be positive"),
        (ffn_dim > 0, f"ffn_dim={ffn_dim} must be positive"),
        (top_k in (1, 2), f"top_k={top_k} is not supported; use 1 (the paper's default) or 2"),
        (num_experts >= top_k, f"num_experts={num_experts} must be at least top_k={top_k}"),
        (capacity_factor > 0, f"capacity_factor={capacity_factor} must be positive (1.0 = paper training)"),
        (eval_capacity_factor > 0, f"eval_capacity_factor={eval_capacity_factor} must be positive (2.0 = paper eval)"),
        (min_capacity >= 0, f"min_capacity={min_capacity} must be >= 0"),
        (0 <= jitter_noise < 1, f"jitter_noise={jitter_noise} must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
