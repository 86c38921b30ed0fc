"""Expert parallelism applied from outside the single-device model.

Owns: process groups (EP × expert-data-parallel), the all-to-all token exchange around the local
experts, slicing a full model's experts onto ranks and gathering them back, and the gradient rules
expert parameters need (reduce over the expert-data-parallel group, clip by the global norm).
Never imported by modeling/configuration code; the model stays world-size independent.

Rank layout (DeepSpeed's, so both engines agree), world = ep × edp, e.g. world 4, ep 2:

    EP groups  (all-to-all):            [0, 1]  [2, 3]
    expert-DP groups (expert grads):    [0, 2]  [1, 3]
    data-parallel (shared params):      [0, 1, 2, 3]

Rank r holds global experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .moe import GroupedExperts, SparseMoE
from .moe_kernels import grouped_ffn

EXPERT_PARAM_FLAG = "expert_parallel"  # attribute set on every expert parameter


@dataclass(frozen=True)
class ExpertParallelGroups:
    ep_size: int
    ep_rank: int
    ep_group: object
    edp_size: int
    edp_rank: int
    edp_group: object
    world_size: int

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for this expert-parallel layout (its param groups key on it)."""
        return f"ep_size_{self.ep_size}"


def create_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Build the EP and expert-DP groups on an initialised default process group (collective call)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"expert_parallel_size={ep_size} needs torch.distributed initialised; "
                         "launch with torchrun / accelerate launch / deepspeed")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"world size {world} is not divisible by expert_parallel_size={ep_size}; "
                         f"use an ep size that divides {world}")
    ep_group = edp_group = None
    # Every rank must create every group, in the same order.
    for first in range(0, world, ep_size):
        group = dist.new_group(list(range(first, first + ep_size)))
        if first <= rank < first + ep_size:
            ep_group = group
    for offset in range(ep_size):
        group = dist.new_group(list(range(offset, world, ep_size)))
        if rank % ep_size == offset:
            edp_group = group
    return ExpertParallelGroups(ep_size, rank % ep_size, ep_group, world // ep_size, rank // ep_size,
                                edp_group, world)


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty(sum(ctx.input_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ExpertParallelExperts(GroupedExperts):
    """`mlp.experts` under EP: holds this rank's slice of experts, exchanges rows by all-to-all.

    Same parameter names as GroupedExperts (shapes are [E/ep, …]); same contract: forward(x [R, D]
    grouped by GLOBAL expert, tokens_per_expert [E]) → [R, D]. Data flow, ep = 2, E = 4:

        rank 0 rows: e0 e0 e1 | e2 e3 e3      rank 1 rows: e1 | e2 e2 e3
                     └ keep ┘   └─ to 1 ─┘                 └to 0┘ └ keep ┘
        all-to-all → rank 0 holds [from 0: e0 e0 e1][from 1: e1] → regroup by local expert
        → grouped GEMM → inverse regroup → all-to-all back → rows in the caller's order.
    """

    def __init__(self, num_global_experts: int, hidden_size: int, ffn_dim: int, activation: str,
                 groups: ExpertParallelGroups):
        if num_global_experts % groups.ep_size:
            raise ValueError(f"num_experts={num_global_experts} is not divisible by expert_parallel_size="
                             f"{groups.ep_size}; choose an ep size that divides the number of experts")
        super().__init__(num_global_experts // groups.ep_size, hidden_size, ffn_dim, activation)
        self.num_global_experts, self.groups = num_global_experts, groups
        for param in self.parameters():
            mark_expert_parameter(param, groups)

    @property
    def first_global_expert(self) -> int:
        return self.groups.ep_rank * self.num_experts

    def forward(self, hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """1. exchange counts  2. send rows to the owners  3. regroup by local expert  4. experts
        5. undo the regrouping and send results back."""
        ep, local = self.groups.ep_size, self.num_experts
        # 1. received[s, e] = rows rank s sends to my local expert e. One host sync for the splits.
        received = torch.empty_like(tokens_per_expert).view(ep, local)
        dist.all_to_all_single(received, tokens_per_expert.contiguous(), group=self.groups.ep_group)
        send_splits = tokens_per_expert.view(ep, local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        # 2.
        rows = all_to_all(hidden_states, recv_splits, send_splits, self.groups.ep_group)
        # 3. rows arrive source-major (s, e); the grouped GEMM needs expert-major (e, s).
        order = _source_major_to_expert_major(received)
        local_rows = rows.index_select(0, order)
        # 4.
        out = grouped_ffn(local_rows, received.sum(0), self.up_proj, self.up_proj_bias,
                          self.down_proj, self.down_proj_bias, self.activation, self.implementation)
        # 5.
        out = torch.empty_like(out).index_copy(0, order, out)
        return all_to_all(out, send_splits, recv_splits, self.groups.ep_group)


def _source_major_to_expert_major(received: torch.Tensor) -> torch.Tensor:
    """Row permutation taking blocks ordered (source, expert) to (expert, source)."""
    ep, local = received.shape
    block = torch.arange(ep * local, device=received.device)
    block_of_row = torch.repeat_interleave(block, received.reshape(-1))
    key = (block_of_row % local) * ep + torch.div(block_of_row, local, rounding_mode="floor")
    return torch.argsort(key, stable=True)


def mark_expert_parameter(param: nn.Parameter, groups: ExpertParallelGroups) -> None:
    """Tag a parameter as an expert (not all-reduced over data parallel).

    `allreduce=False` + `group_name` are what DeepSpeed's engine and
    `split_params_into_different_moe_groups_for_optimizer` look for.
    """
    setattr(param, EXPERT_PARAM_FLAG, True)
    param.allreduce = False
    param.group_name = groups.group_name


def is_expert_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, EXPERT_PARAM_FLAG, False))


def moe_layers(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseMoE)]


def parallelize_experts(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """Replace every SparseMoE's experts by this rank's slice wrapped in the all-to-all exchange.

    Call on the full single-device model (same weights on every rank, e.g. after from_pretrained or
    a seeded init) before the optimizer and DDP/DeepSpeed wrapping. Returns the model.
    """
    for name, moe in moe_layers(model):
        full = moe.experts
        if isinstance(full, ExpertParallelExperts):
            raise ValueError(f"{name} is already expert-parallel; call parallelize_experts once")
        sliced = ExpertParallelExperts(full.num_experts, full.hidden_size, full.ffn_dim, full.activation, groups)
        sliced.implementation = full.implementation
        sliced.to(device=full.up_proj.device, dtype=full.up_proj.dtype)
        start, stop = sliced.first_global_expert, sliced.first_global_expert + sliced.num_experts
        with torch.no_grad():
            for param_name, param in sliced.named_parameters():
                param.copy_(getattr(full, param_name)[start:stop])
        moe.experts = sliced
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if is_expert_parameter(param)]


def exclude_experts_from_ddp(model: nn.Module) -> None:
    """Make torch DDP (and accelerate's DDP wrapper) leave expert parameters alone.

    Without this DDP broadcasts rank 0's experts over every rank at wrap time and averages
    gradients of *different* experts (silently wrong).
    """
    model._ddp_params_and_buffers_to_ignore = expert_parameter_names(model)


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Sum expert grads over the expert-DP group, divide by world size: the same scaling DDP gives
    shared params (each rank's loss is a local mean; the model's gradient is their average)."""
    grads = [p.grad for p in model.parameters() if is_expert_parameter(p) and p.grad is not None]
    if not grads:
        return
    if groups.edp_size > 1:
        flat = _flatten_dense_tensors(grads)  # one collective instead of one per tensor
        dist.all_reduce(flat, group=groups.edp_group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
    # Grads arrive here summed over the EP group's tokens (the all-to-all backward brings every
    # rank's contribution to the expert's owner), then over expert-DP replicas: total = world ranks.
    for g in grads:
        g.div_(groups.world_size)


@torch.no_grad()
def global_grad_norm(model: nn.Module, groups: ExpertParallelGroups, norm_type: float = 2.0) -> torch.Tensor:
    """True L2 norm of the whole model's gradient: shared² (identical on all ranks) + Σ over EP ranks
    of each rank's expert². Averaging per-rank norms (DDP clip) would differ across EP ranks."""
    if norm_type != 2.0:
        raise ValueError(f"norm_type={norm_type} is not supported under expert parallelism; use 2.0")
    shared = [p.grad for p in model.parameters() if p.grad is not None and not is_expert_parameter(p)]
    expert = [p.grad for p in model.parameters() if p.grad is not None and is_expert_parameter(p)]
    device = (shared or expert)[0].device if (shared or expert) else torch.device("cpu")
    # Squared sums stay on the gradients' device (NCCL reduces device tensors only; no per-tensor host sync).
    shared_sq, expert_sq = (_sum_of_squares(grads, device) for grads in (shared, expert))
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (shared_sq + expert_sq).sqrt().float()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm([g.detach().double() for g in grads])
    return torch.stack(norms).square().sum()

@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ExpertParallelGroups) -> torch.Tensor:
    """Clip all gradients by the global norm (same coefficient on every rank); returns the norm."""
    total = global_grad_norm(model, groups)
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(coef)
    return total


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """A snapshot of the single-device state dict (all experts, HF names) on every rank. Collective call.

    Tensors that share storage in the model (tied embeddings / LM head) share one copy here too, so
    `save_pretrained` still sees the tie and writes the weight once.
    """
    state, copies = {}, {}
    expert_names = set(expert_parameter_names(model))
    for name, tensor in model.state_dict().items():
        if name in expert_names and groups.ep_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
            state[name] = torch.cat(parts, dim=0)
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in copies:
            copies[key] = tensor.detach().clone()
        state[name] = copies[key]
    return state


def slice_full_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of gather: keep this rank's experts of a full state dict (for load_state_dict)."""
    sliced = dict(state)
    for module_name, moe in moe_layers(model):
        experts = moe.experts
        if not isinstance(experts, ExpertParallelExperts):
            continue
        start = experts.first_global_expert
        for param_name, param in experts.named_parameters():
            key = f"{module_name}.experts.{param_name}"
            full = state[key]
            if full.shape[0] != experts.num_global_experts:
                raise ValueError(f"{key} has {full.shape[0]} experts, the model expects "
                                 f"{experts.num_global_experts}; the checkpoint belongs to another configuration")
            sliced[key] = full[start:start + param.shape[0]]
    return sliced

