"""Grouped expert FFN kernels: y_e = act(x_e W1_eᵀ + b1_e) W2_eᵀ + b2_e over rows grouped by expert.

Pure torch and standard ops only: this file travels with the Hub's remote code, so no private backend ops and
no threads live here (those are `hf_moe_mt.backends`, applied to a model from outside). Which kernel runs is
an explicit choice, `implementation` of `grouped_ffn` (a model sets it from `config.experts_kernel`):
- "grouped_mm": `torch._grouped_mm` for all six GEMMs of forward + backward (CUDA's fast path: weight
  gradients come out of a grouped GEMM in the parameter's own layout; offsets stay on the device, so nothing
  waits for the GPU).
- "loop": per-expert GEMMs inside one autograd.Function whose backward writes each weight gradient straight
  into its slice of one [E, …] tensor (no per-expert full-size zero tensors); without autograd (translation)
  both GEMMs of an expert run back to back, so its hidden rows stay in cache. How and where the per-expert
  GEMMs run, and where its large buffers come from, is an `ExpertGemms` object: torch's own ops on the calling
  thread here; backends supply others.
- "bmm": rows scattered into a padded [E, max rows, D] batch and two batched GEMMs (CPU libraries parallelise
  a batched GEMM over experts; near-uniform groups waste little padding).
- "auto": the fixed rule of `auto_kernel_name`.
- any callable with the signature `kernel(x, tokens_per_expert, w1, b1, w2, b2, activation)` (a backend's).
Under `torch.autocast`, `grouped_ffn` casts the operands to the autocast dtype itself and runs the kernel with
autocast off: `torch._grouped_mm` is not an autocast op, and autocast state is per thread (worker threads and
custom backwards would otherwise run in fp32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
KERNELS = ("auto", "grouped_mm", "loop", "bmm")

ExpertsKernel = Callable[..., torch.Tensor]  # (x, tokens_per_expert, w1, b1, w2, b2, activation) -> [R, D]


def grouped_ffn(x, tokens_per_expert, w1, b1, w2, b2, activation: str,
                implementation: str | ExpertsKernel = "auto") -> torch.Tensor:
    """x [R, D] grouped by expert, tokens_per_expert [E] → [R, D]. w1 [E, F, D], w2 [E, D, F].
    `implementation`: a name of `KERNELS` or a kernel callable (see the module docstring)."""
    kernel = implementation if callable(implementation) else _NAMED_KERNELS[check_kernel(implementation)]
    if x.shape[0] == 0:
        # Keep the graph connected so every parameter gets a (zero) gradient, as DDP/ZeRO expect.
        return x + 0.0 * (w1.sum() + b1.sum() + w2.sum() + b2.sum())
    dtype = _autocast_dtype(x)
    if dtype is None:
        return kernel(x, tokens_per_expert, w1, b1, w2, b2, activation)
    x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))  # .to() sends fp32 gradients to fp32 weights
    with torch.autocast(x.device.type, enabled=False):
        return kernel(x, tokens_per_expert, w1, b1, w2, b2, activation)


def check_kernel(implementation) -> str | ExpertsKernel:
    """The implementation itself, or a one-line ValueError naming the valid choices."""
    if not callable(implementation) and implementation not in KERNELS:
        raise ValueError(f"experts kernel {implementation!r} is not one of {KERNELS} (or a kernel callable); "
                         "\"auto\" picks one per call by a fixed rule")
    return implementation


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would give a GEMM on x's device, or None outside autocast (float64 is never cast)."""
    device = x.device.type
    if not x.is_floating_point() or x.dtype == torch.float64 or not torch.amp.is_autocast_available(device):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors (None skipped) must record a graph."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------- "auto"


def auto_kernel_name(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, training: bool) -> str:
    """The rule behind "auto", deterministic given the inputs:
    1. CUDA: "grouped_mm" where torch has it and rows are 16-byte aligned (its kernels' requirement), else "loop".
    2. CPU without autograd (translation): "loop" (both GEMMs of an expert back to back).
    3. CPU with autograd: "bmm" while the padding it computes stays within `padded_bmm_waste_budget` (near-uniform
       groups, as in capacity-limited training), else "loop"."""
    if x.is_cuda:  # 1.
        return "grouped_mm" if _grouped_mm_supported(x, w1) else "loop"
    if not training:  # 2.
        return "loop"
    counts = tokens_per_expert.tolist()  # 3. host sync; free on CPU
    return "bmm" if prefers_padded_bmm(counts, x.shape[0]) else "loop"


def auto_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation):
    name = auto_kernel_name(x, tokens_per_expert, w1, needs_autograd(x, w1, b1, w2, b2))
    return _NAMED_KERNELS[name](x, tokens_per_expert, w1, b1, w2, b2, activation)


def padded_bmm_waste_budget(rows_per_expert: float) -> float:
    """How many padded rows per real row (E·max_count / R) a padded bmm may compute and still beat the
    per-expert loop: a batched GEMM gains more over separate library calls the smaller each expert's group
    (fitted to fwd+bwd timings at d=512, ffn=2048 on 2 cores; a fixed rule, so "auto" is reproducible)."""
    advantage = 0.06 + 0.05 * math.log2(512 / max(rows_per_expert, 1.0))
    return 1.0 + min(max(advantage, 0.0), 0.30)


def prefers_padded_bmm(counts: list[int], num_rows: int) -> bool:
    return max(counts) * len(counts) <= padded_bmm_waste_budget(num_rows / len(counts)) * num_rows


def _grouped_mm_supported(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """torch._grouped_mm exists and its CUDA kernels can take these rows (d and ffn 16-byte aligned)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return (x.shape[1] * x.element_size()) % 16 == 0 and (w1.shape[1] * x.element_size()) % 16 == 0


# ------------------------------------------------------------------------------------------------ activations


def activation_forward(name: str, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(h), into `out` when given (a buffer of h's shape the caller chose, see `ExpertGemms.new_buffer`)."""
    if out is None:
        if name == "relu":
            return torch.relu(h)
        if name == "gelu":
            return F.gelu(h)
        if name == "gelu_new":
            return F.gelu(h, approximate="tanh")
        return F.silu(h)
    if name == "relu":
        return torch.clamp_min(h, 0, out=out)  # what torch.relu computes
    if name in ("gelu", "gelu_new"):
        return torch.ops.aten.gelu.out(h, approximate="none" if name == "gelu" else "tanh", out=out)
    return torch.ops.aten.silu.out(h, out=out)


def activation_backward(name: str, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d act(h)/dh · grad from the pre-activation h (so the forward need not keep act(h)), written over
    `grad`, which every caller owns: one [rows, ffn] temporary less at the backward's peak."""
    if name == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=grad)
    if name == "gelu_new":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate="tanh", grad_input=grad)
    return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=grad)


# ------------------------------------------------------------------------------------------------ grouped_mm


def grouped_mm_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation):
    if x.is_cuda and not _grouped_mm_supported(x, w1):
        raise ValueError(f"experts kernel 'grouped_mm' needs torch._grouped_mm and 16-byte aligned rows on CUDA "
                         f"(d={x.shape[1]}, ffn={w1.shape[1]} in {x.dtype}); use 'auto' or 'loop'")
    return _GroupedMMFFN.apply(x, tokens_per_expert, w1, b1, w2, b2, activation)


def _expert_of_row(tokens_per_expert: torch.Tensor, num_rows: int) -> torch.Tensor:
    experts = torch.arange(tokens_per_expert.numel(), device=tokens_per_expert.device)
    return torch.repeat_interleave(experts, tokens_per_expert, output_size=num_rows)


class _GroupedMMFFN(torch.autograd.Function):
    """Two grouped GEMMs forward, four backward. A custom backward because autograd's own derivative
    of `b[expert_of_row]` is a sort-based index_put over R·F elements, and because the weight
    gradients come out directly in the [E, F, D] / [E, D, F] layout of the parameters."""

    @staticmethod
    def forward(ctx, x, tokens_per_expert, w1, b1, w2, b2, activation):
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        expert = _expert_of_row(tokens_per_expert, x.shape[0])
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offsets).add_(b1.index_select(0, expert))  # [R, F]
        a = activation_forward(activation, h)
        y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offsets).add_(b2.index_select(0, expert))  # [R, D]
        ctx.save_for_backward(x, h, a, w1, w2, offsets)  # keeps act(h), like a dense FFN's autograd does
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, a, w1, w2, offsets = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_w2 = torch._grouped_mm(grad_y.t(), a, offs=offsets)  # [E, D, F]
        grad_h = activation_backward(ctx.activation, torch._grouped_mm(grad_y, w2, offs=offsets), h)  # [R, F]
        del a
        grad_w1 = torch._grouped_mm(grad_h.t(), x, offs=offsets)  # [E, F, D]
        grad_x = torch._grouped_mm(grad_h, w1, offs=offsets)  # [R, D]
        return (grad_x, None, grad_w1, _row_sums_per_group(grad_h, offsets), grad_w2,
                _row_sums_per_group(grad_y, offsets), None)


def _row_sums_per_group(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[R, N] rows grouped by `offsets` → [E, N] per-group sums (bias gradients), as one more grouped
    GEMM with a block of ones: deterministic (no atomics) and no host sync. Eight ones-columns, not one,
    because the kernels need 16-byte aligned strides; the transposed view keeps that for any R."""
    ones = rows.new_ones(rows.shape[0], 8).t()  # [8, R], column-major
    return torch._grouped_mm(ones, rows, offs=offsets)[:, 0]


# ------------------------------------------------------------------------------------------------------- bmm


def bmm_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation, rows_per_expert: int | None = None,
               new_buffer: Callable[..., torch.Tensor] | None = None):
    """`rows_per_expert`: the padded group size, at least the largest group (default: exactly that).
    `new_buffer(like, *shape)`: where the batched GEMMs' outputs come from (default `like.new_empty(shape)`)."""
    largest = int(tokens_per_expert.max())
    if rows_per_expert is not None and rows_per_expert < largest:
        raise ValueError(f"rows_per_expert={rows_per_expert} is below the largest group ({largest} rows)")
    return _padded_bmm_ffn(x, tokens_per_expert, rows_per_expert or largest, w1, b1, w2, b2, activation,
                           new_buffer or TORCH_GEMMS.new_buffer)


def _padded_bmm_ffn(x, tokens_per_expert, rows_per_expert, w1, b1, w2, b2, activation, new_buffer):
    """Scatter rows into [E, M, D] (M = largest group), two batched GEMMs, gather back.

    Padding rows are zero, so they add nothing to any weight gradient.
    """
    num_experts, hidden = w1.shape[0], x.shape[1]
    expert = _expert_of_row(tokens_per_expert, x.shape[0])
    starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    slot = expert * rows_per_expert + (torch.arange(x.shape[0], device=x.device) - starts[expert])
    padded = x.new_zeros(num_experts * rows_per_expert, hidden).index_copy(0, slot, x)
    y = _BatchedFFN.apply(padded.view(num_experts, rows_per_expert, hidden), w1, b1, w2, b2, activation,
                          new_buffer)
    return y.view(-1, hidden).index_select(0, slot)


class _BatchedFFN(torch.autograd.Function):
    """Two batched GEMMs over [E, M, ·]. A custom backward so dW comes out in the parameter's own
    [E, F, D] / [E, D, F] layout: autograd's bmm backward yields the transposed layout and
    AccumulateGrad then spends more time on a strided copy than the GEMMs take."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation, new_buffer):
        num_experts, rows = x.shape[:2]
        h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2),
                          out=new_buffer(x, num_experts, rows, w1.shape[1]))  # [E, M, F]
        a = activation_forward(activation, h, out=new_buffer(h, *h.shape))
        y = torch.baddbmm(b2.unsqueeze(1), a, w2.transpose(1, 2),
                          out=new_buffer(x, num_experts, rows, w2.shape[1]))  # [E, M, D]
        ctx.save_for_backward(x, h, w1, w2)
        ctx.activation, ctx.new_buffer = activation, new_buffer
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, w1, w2 = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        new_buffer = ctx.new_buffer
        a = activation_forward(ctx.activation, h, out=new_buffer(h, *h.shape))
        grad_w2 = torch.bmm(grad_y.transpose(1, 2), a, out=new_buffer(w2, *w2.shape))  # [E, D, F]
        grad_h = activation_backward(ctx.activation, torch.bmm(grad_y, w2, out=new_buffer(h, *h.shape)), h)
        del a
        grad_w1 = torch.bmm(grad_h.transpose(1, 2), x, out=new_buffer(w1, *w1.shape))  # [E, F, D]
        grad_x = torch.bmm(grad_h, w1)  # [E, M, D]
        return grad_x, grad_w1, grad_h.sum(dim=1), grad_w2, grad_y.sum(dim=1), None, None



# ------------------------------------------------------------------------------------------------------ loop


class ExpertGemms:
    """How the "loop" kernel runs one expert's GEMMs, and on which thread: here torch's own ops, one expert
    after another on the calling thread (each GEMM split over torch's intra-op threads). A backend subclasses
    it (another GEMM library, experts concurrently on worker threads); what the loop computes and keeps for
    the backward stays in `_LoopFFN`. Every method writes only its own expert's slices."""

    name = "torch"

    def new_buffer(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """An uninitialised tensor the kernel will write in full (activations, gradients); a backend may place
        large ones differently."""
        return like.new_empty(shape)

    def for_each_expert(self, work: Callable[[int, int, int], None], bounds: list[tuple[int, int]]) -> None:
        """Call `work(expert, lo, hi)` for every expert (rows lo:hi)."""
        for expert, (lo, hi) in enumerate(bounds):
            work(expert, lo, hi)

    def linear_into(self, x, weight, bias, out) -> None:
        """out = x·weightᵀ + bias."""
        torch.addmm(bias, x, weight.t(), out=out)

    def ffn_into(self, x, w1, b1, w2, b2, activation: str, out) -> None:
        """out = act(x·w1ᵀ + b1)·w2ᵀ + b2 (no autograd)."""
        hidden = activation_forward(activation, torch.addmm(b1, x, w1.t()))
        torch.addmm(b2, hidden, w2.t(), out=out)

    def grads_into(self, grad_out, inputs, weight, grad_in, grad_weight) -> None:
        """For out = inputs·weightᵀ + b: grad_in = grad_out·weight, grad_weight = grad_outᵀ·inputs."""
        torch.mm(grad_out, weight, out=grad_in)
        torch.mm(grad_out.t(), inputs, out=grad_weight)


TORCH_GEMMS = ExpertGemms()


def loop_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation, gemms: ExpertGemms = TORCH_GEMMS):
    counts = tokens_per_expert.tolist()  # host sync (on CUDA too: the loop needs the row bounds)
    if needs_autograd(x, w1, b1, w2, b2):
        return _LoopFFN.apply(x, counts, w1, b1, w2, b2, activation, gemms)
    return _inference_ffn(x, counts, w1, b1, w2, b2, activation, gemms)


def _inference_ffn(x, counts, w1, b1, w2, b2, activation, gemms: ExpertGemms):
    """No autograd: act(x_e W1_eᵀ + b1_e) W2_eᵀ + b2_e per expert in one go (one pass over the experts, the
    hidden rows still in cache for the second GEMM)."""
    y = x.new_empty(x.shape[0], w2.shape[1])

    def expert_ffn(e: int, lo: int, hi: int) -> None:
        if hi > lo:
            gemms.ffn_into(x[lo:hi], w1[e], b1[e], w2[e], b2[e], activation, y[lo:hi])

    gemms.for_each_expert(expert_ffn, _bounds(counts))
    return y


class _LoopFFN(torch.autograd.Function):
    """Per-expert GEMMs into preallocated slices (`gemms` decides how and where they run); keeps only x and h
    for the backward."""

    @staticmethod
    def forward(ctx, x, counts, w1, b1, w2, b2, activation, gemms):
        bounds = _bounds(counts)
        h = gemms.new_buffer(x, x.shape[0], w1.shape[1])  # [R, F]
        gemms.for_each_expert(_linear_into(gemms, x, w1, b1, h), bounds)
        a = activation_forward(activation, h, out=gemms.new_buffer(h, *h.shape))
        y = gemms.new_buffer(x, x.shape[0], w2.shape[1])  # [R, D]
        gemms.for_each_expert(_linear_into(gemms, a, w2, b2, y), bounds)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.bounds, ctx.activation, ctx.gemms = bounds, activation, gemms
        return y

    @staticmethod
    def backward(ctx, grad_y):
        """1. through W2 (grad_a, dW2, db2)  2. through the activation  3. through W1 (grad_x, dW1, db1)."""
        x, h, w1, w2 = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        # act(h) recomputed: cheaper than keeping [R, F] alive
        a = activation_forward(ctx.activation, h, out=ctx.gemms.new_buffer(h, *h.shape))
        # 1.
        grad_a = ctx.gemms.new_buffer(h, *h.shape)
        grad_w2, grad_b2 = _per_expert_weight_grads(ctx.gemms, ctx.bounds, grad_y, a, w2, grad_a)
        # 2.
        grad_h = activation_backward(ctx.activation, grad_a, h)
        del grad_a, a
        # 3.
        grad_x = ctx.gemms.new_buffer(x, *x.shape)
        grad_w1, grad_b1 = _per_expert_weight_grads(ctx.gemms, ctx.bounds, grad_h, x, w1, grad_x)
        return grad_x, None, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def _linear_into(gemms: ExpertGemms, inputs, weight, bias, out):
    """work(e, lo, hi): out rows of expert e = inputs rows · weight[e]ᵀ + bias[e]."""

    def expert_linear(e: int, lo: int, hi: int) -> None:
        if hi > lo:
            gemms.linear_into(inputs[lo:hi], weight[e], bias[e], out[lo:hi])

    return expert_linear


def _per_expert_weight_grads(gemms: ExpertGemms, bounds, grad_out, inputs, weight, grad_in):
    """For out_e = in_e Wᵀ + b: writes grad_in rows, returns (dW [E, O, I], db [E, O]) slice by slice."""
    grad_weight = gemms.new_buffer(weight, *weight.shape)
    grad_bias = weight.new_empty(weight.shape[0], weight.shape[1])

    def expert_grads(e: int, lo: int, hi: int) -> None:
        if hi == lo:
            grad_weight[e].zero_()
            grad_bias[e].zero_()
            return
        gemms.grads_into(grad_out[lo:hi], inputs[lo:hi], weight[e], grad_in[lo:hi], grad_weight[e])
        torch.sum(grad_out[lo:hi], dim=0, out=grad_bias[e])

    gemms.for_each_expert(expert_grads, bounds)
    return grad_weight, grad_bias


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


_NAMED_KERNELS: dict[str, ExpertsKernel] = {
    "auto": auto_kernel, "grouped_mm": grouped_mm_kernel, "loop": loop_kernel, "bmm": bmm_kernel,
}
