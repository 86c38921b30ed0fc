"""Grouped expert FFN kernels: y_e = act(x_e W1_eᵀ + b1_e) W2_eᵀ + b2_e over rows grouped by expert.

Pure torch (travels with remote code). Four paths behind one function, `grouped_ffn`:
- CUDA: `torch._grouped_mm` for all six GEMMs of forward + backward (weight gradients come out of a
  grouped GEMM in the parameter's own layout; offsets stay on the device, so nothing waits for the GPU).
- CPU: a loop of per-expert GEMMs (oneDNN, see cpu_gemm) on single-threaded workers inside one
  autograd.Function whose backward writes each weight gradient straight into its slice of one [E, …]
  tensor (no per-expert full-size zero tensors).
- CPU without oneDNN, near-uniform groups (e.g. capacity-limited training): a padded `bmm` (MKL's batched
  GEMM parallelises over experts; MKL's small per-expert GEMMs lose to it).
- CPU without autograd (translation): both GEMMs of one expert back to back on one worker thread, so its
  hidden rows stay in cache and the experts need one pass of the worker pool, not two; on oneDNN (cpu_gemm).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .cpu_gemm import needs_autograd, onednn_linear, onednn_weight_grad, takes_onednn
from .expert_threads import for_each_expert

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")


def padded_bmm_waste_budget(rows_per_expert: float) -> float:
    """How many padded rows per real row (E·max_count / R) a padded bmm may compute and still beat the
    per-expert loop. Measured on 2 cores (fwd+bwd, d=512, ffn=2048): the loop costs 26 % more per row than
    bmm at 32 rows per expert, 15 % at 128 and 6 % at 512 — small GEMMs gain from bmm, large ones do not."""
    advantage = 0.06 + 0.05 * math.log2(512 / max(rows_per_expert, 1.0))
    return 1.0 + min(max(advantage, 0.0), 0.30)


def _prefers_padded_bmm(counts: list[int], num_rows: int) -> bool:
    return max(counts) * len(counts) <= padded_bmm_waste_budget(num_rows / len(counts)) * num_rows


def _loop_runs_on_onednn(x: torch.Tensor, counts: list[int], w1: torch.Tensor) -> bool:
    """Whether a typical expert's GEMMs in the loop go to oneDNN (cpu_gemm). Then the loop wins outright:
    fwd+bwd, uniform groups, d=512, ffn=2048, 2 cores, loop on oneDNN vs padded bmm on MKL: 16 rows per
    expert 298 vs 316 ms (E=128) and 106 vs 128 ms (E=64); 32 rows 274 vs 374 ms; 64 rows 200 vs 311 ms."""
    return takes_onednn(x[: max(x.shape[0] // len(counts), 1)], w1[0])


def activation_forward(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_new":
        return F.gelu(h, approximate="tanh")
    return F.silu(h)


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


def grouped_ffn(x, tokens_per_expert, w1, b1, w2, b2, activation: str) -> torch.Tensor:
    """x [R, D] grouped by expert, tokens_per_expert [E] → [R, D]. w1 [E, F, D], w2 [E, D, F]."""
    if x.shape[0] == 0:
        # Keep the graph connected so every parameter gets a (zero) gradient, as DDP/ZeRO expect.
        return x + 0.0 * (w1.sum() + b1.sum() + w2.sum() + b2.sum())
    if _use_grouped_mm(x, w1):
        return _GroupedMMFFN.apply(x, tokens_per_expert, w1, b1, w2, b2, activation)
    counts = tokens_per_expert.tolist()  # host sync; free on CPU
    if not x.is_cuda:
        if not needs_autograd(x, w1, b1, w2, b2):
            return _inference_ffn(x, counts, w1, b1, w2, b2, activation)
        if not _loop_runs_on_onednn(x, counts, w1) and _prefers_padded_bmm(counts, x.shape[0]):
            return _padded_bmm_ffn(x, tokens_per_expert, max(counts), w1, b1, w2, b2, activation)
    return _LoopFFN.apply(x, counts, w1, b1, w2, b2, activation)


def _inference_ffn(x, counts, w1, b1, w2, b2, activation):
    """No autograd: each worker runs act(x_e W1_eᵀ + b1_e) W2_eᵀ + b2_e for its experts in one go.
    Measured at decode size (128 uneven rows, 16 experts, d=512, ffn=2048, 2 cores): 7.8 ms against
    11.7 ms for the two-pass training loop; on oneDNN (see cpu_gemm) with the activation fused into the
    first GEMM, where it applies."""
    y = x.new_empty(x.shape[0], w2.shape[1])

    def expert_ffn(e: int, lo: int, hi: int) -> None:
        if hi == lo:
            return
        if takes_onednn(x[lo:hi], w1[e], b1[e]):
            y[lo:hi] = onednn_linear(onednn_linear(x[lo:hi], w1[e], b1[e], activation), w2[e], b2[e])
        else:
            hidden = activation_forward(activation, torch.addmm(b1[e], x[lo:hi], w1[e].t()))
            torch.addmm(b2[e], hidden, w2[e].t(), out=y[lo:hi])

    for_each_expert(expert_ffn, _bounds(counts))
    return y


def _expert_of_row(tokens_per_expert: torch.Tensor, num_rows: int) -> torch.Tensor:
    experts = torch.arange(tokens_per_expert.numel(), device=tokens_per_expert.device)
    return torch.repeat_interleave(experts, tokens_per_expert, output_size=num_rows)


def _use_grouped_mm(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """CUDA with torch._grouped_mm, whose kernels need 16-byte aligned rows (d and ffn multiples of 8 in
    bf16). On CPU the per-expert paths below measured faster than torch's grouped_mm loop."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    return (x.shape[1] * x.element_size()) % 16 == 0 and (w1.shape[1] * x.element_size()) % 16 == 0


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


def _padded_bmm_ffn(x, tokens_per_expert, rows_per_expert, w1, b1, w2, b2, activation):
    """Scatter rows into [E, M, D] (M = largest group), two batched GEMMs, gather back.

    Padding rows are zero, so they add nothing to any weight gradient.
    """
    num_experts, hidden = w1.shape[0], x.shape[1]
    expert = _expert_of_row(tokens_per_expert, x.shape[0])
    starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    slot = expert * rows_per_expert + (torch.arange(x.shape[0], device=x.device) - starts[expert])
    padded = x.new_zeros(num_experts * rows_per_expert, hidden).index_copy(0, slot, x)
    y = _BatchedFFN.apply(padded.view(num_experts, rows_per_expert, hidden), w1, b1, w2, b2, activation)
    return y.view(-1, hidden).index_select(0, slot)


class _BatchedFFN(torch.autograd.Function):
    """Two batched GEMMs over [E, M, ·]. A custom backward so dW comes out in the parameter's own
    [E, F, D] / [E, D, F] layout: autograd's bmm backward yields the transposed layout and
    AccumulateGrad then spends more time on a strided copy than the GEMMs take."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation):
        h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))  # [E, M, F]
        y = torch.baddbmm(b2.unsqueeze(1), activation_forward(activation, h), w2.transpose(1, 2))  # [E, M, D]
        ctx.save_for_backward(x, h, w1, w2)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, w1, w2 = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        a = activation_forward(ctx.activation, h)
        grad_w2 = torch.bmm(grad_y.transpose(1, 2), a)  # [E, D, F]
        grad_h = activation_backward(ctx.activation, torch.bmm(grad_y, w2), h)  # [E, M, F]
        del a
        grad_w1 = torch.bmm(grad_h.transpose(1, 2), x)  # [E, F, D]
        grad_x = torch.bmm(grad_h, w1)  # [E, M, D]
        return grad_x, grad_w1, grad_h.sum(dim=1), grad_w2, grad_y.sum(dim=1), None


class _LoopFFN(torch.autograd.Function):
    """Per-expert GEMMs into preallocated slices, experts spread over single-threaded workers
    (expert_threads.py); keeps only x and h for the backward."""

    @staticmethod
    def forward(ctx, x, counts, w1, b1, w2, b2, activation):
        bounds = _bounds(counts)
        h = x.new_empty(x.shape[0], w1.shape[1])  # [R, F]
        parallel = not x.is_cuda  # GPU kernels queue on one stream: worker threads would only add overhead
        for_each_expert(_linear_into(x, w1, b1, h), bounds, parallel)
        a = activation_forward(activation, h)
        y = x.new_empty(x.shape[0], w2.shape[1])  # [R, D]
        for_each_expert(_linear_into(a, w2, b2, y), bounds, parallel)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.bounds, ctx.activation, ctx.parallel = bounds, activation, parallel
        return y

    @staticmethod
    def backward(ctx, grad_y):
        """1. through W2 (grad_a, dW2, db2)  2. through the activation  3. through W1 (grad_x, dW1, db1)."""
        x, h, w1, w2 = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        a = activation_forward(ctx.activation, h)  # recomputed: cheaper than keeping [R, F] alive
        # 1.
        grad_a = torch.empty_like(h)
        grad_w2, grad_b2 = _per_expert_weight_grads(ctx.bounds, grad_y, a, w2, grad_a, ctx.parallel)
        # 2.
        grad_h = activation_backward(ctx.activation, grad_a, h)
        del grad_a, a
        # 3.
        grad_x = torch.empty_like(x)
        grad_w1, grad_b1 = _per_expert_weight_grads(ctx.bounds, grad_h, x, w1, grad_x, ctx.parallel)
        return grad_x, None, grad_w1, grad_b1, grad_w2, grad_b2, None


def _linear_into(inputs, weight, bias, out):
    """work(e, lo, hi): out rows of expert e = inputs rows · weight[e]ᵀ + bias[e] (oneDNN where it pays)."""

    def expert_linear(e: int, lo: int, hi: int) -> None:
        if hi == lo:
            return
        if takes_onednn(inputs[lo:hi], weight[e]):
            out[lo:hi] = onednn_linear(inputs[lo:hi], weight[e], bias[e])
        else:
            torch.addmm(bias[e], inputs[lo:hi], weight[e].t(), out=out[lo:hi])

    return expert_linear


def _per_expert_weight_grads(bounds, grad_out, inputs, weight, grad_in, parallel):
    """For out_e = in_e Wᵀ + b: writes grad_in rows, returns (dW [E, O, I], db [E, O]) slice by slice."""
    grad_weight = torch.empty_like(weight)
    grad_bias = weight.new_empty(weight.shape[0], weight.shape[1])

    def expert_grads(e: int, lo: int, hi: int) -> None:
        if hi == lo:
            grad_weight[e].zero_()
            grad_bias[e].zero_()
            return
        if takes_onednn(grad_out[lo:hi], weight[e].t()):  # rows·O·I, the FLOPs of all three products
            grad_in[lo:hi] = onednn_linear(grad_out[lo:hi], weight[e].t())
            grad_weight[e] = onednn_weight_grad(grad_out[lo:hi], inputs[lo:hi])
        else:
            torch.mm(grad_out[lo:hi], weight[e], out=grad_in[lo:hi])
            torch.mm(grad_out[lo:hi].t(), inputs[lo:hi], out=grad_weight[e])
        torch.sum(grad_out[lo:hi], dim=0, out=grad_bias[e])

    for_each_expert(expert_grads, bounds, parallel)
    return grad_weight, grad_bias


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds
