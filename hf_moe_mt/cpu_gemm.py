"""CPU GEMMs of the model's Linear layers and its experts through oneDNN instead of MKL.

Why: torch runs an fp32 `F.linear` / `addmm` on the CPU with MKL's sgemm, which on AMD CPUs takes a slow code
path; oneDNN (bundled with every x86 and aarch64 torch build) JIT-compiles AVX-512 kernels for any vendor.
Measured on this project's 2-core AMD EPYC, fp32, one call each: the LM head of beam-4 decoding
(64 × 512 → 32000) 13.9 ms with MKL vs 6.6 ms with oneDNN; one expert at decode size (64 rows, 512 → 2048 →
512) 1.82 vs 0.80 ms; 1 row 0.110 vs 0.091 ms. Results agree to float rounding (≤ 2e-4 absolute on
unit-scale 512-term dot products). bf16 goes to oneDNN inside torch too where the CPU has AVX-512; this
module takes bf16 only there.

oneDNN's `_linear_pointwise` has no autograd formula: in training `linear` runs it inside `_OneDNNLinear`,
whose backward computes dx and dW on oneDNN as well (once: a double backward raises). Everywhere else — CUDA, CPU autocast, torch.compile
(inductor picks its own kernels), dtypes oneDNN does not take, tiny products — `linear` is exactly `F.linear`.
`HF_MOE_MT_ONEDNN=0` in the environment, or `use_onednn(False)`, turns it off (e.g. to compare on an Intel
CPU, where MKL is fast).

Pure torch (travels with the Hub's remote code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

# oneDNN post-op (name, algorithm) that computes each activation fused into the GEMM; same names as moe_kernels.
FUSED_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
                      "silu": ("swish", "")}
_available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# bf16 only where torch itself sends bf16 GEMMs to oneDNN (AVX-512 and up); elsewhere oneDNN's bf16 is slow.
_bf16_supported = _available and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and \
    torch.ops.mkldnn._is_mkldnn_bf16_supported()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _bf16_supported else (torch.float32,)
# oneDNN costs ~10-20 us more per call than MKL; below this many FLOPs (2·rows·in·out) MKL is as fast or faster.
# Measured crossover, 1 and 2 threads: 2.1e6 (1×512→2048: 0.93x, 16×256→256: 0.99x), 4.2e6 (8×512→512:
# 1.07-1.20x), 8.4e6 (4×512→2048: 1.39x, 64×256→256: 1.30x).
MIN_FLOPS = 4e6

_enabled = os.environ.get("HF_MOE_MT_ONEDNN", "1") != "0"


def onednn_enabled() -> bool:
    return _available and _enabled


@contextmanager
def use_onednn(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN GEMMs on or off inside the block (process-wide; for benchmarks and tests)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether oneDNN should compute x·weightᵀ + bias: CPU, fp32/bf16 throughout, no CPU autocast (which
    would want the product in its own dtype; autocast is per thread, so the expert workers do not see the
    caller's — their GEMMs run in the tensors' own dtype, as they always did), not inside torch.compile
    (checked first: a shape test there would add a guard and recompile), and large enough to repay oneDNN's
    per-call overhead. Gradients are fine: `linear` then runs it inside `_OneDNNLinear`."""
    if torch.compiler.is_compiling() or not (_enabled and _available) or x.device.type != "cpu":
        return False
    if x.dtype not in _ONEDNN_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    return 2 * x.numel() * weight.shape[0] >= MIN_FLOPS and not torch.is_autocast_enabled("cpu")


def bucketed_rows(rows: int) -> int:
    """Rows rounded up so that varying row counts map onto few shapes: oneDNN JIT-compiles a kernel for every
    new shape (measured: 1200×128→256 on one thread, fixed rows 312 µs/call; a new row count each call
    600 µs, MKL 720 µs; padded to buckets 376–386 µs). Up to 64 rows exact (decode sizes, which recur anyway),
    above that ≤ 12.5 % padding: m in [2^j, 2^(j+1)) rounds up to a multiple of 2^(j-3)."""
    if rows <= 64:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def _pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """[m, k] → [count, k] with zero rows appended (rows itself when m == count)."""
    if rows.shape[0] == count:
        return rows
    padded = rows.new_empty(count, rows.shape[1])
    padded[: rows.shape[0]] = rows
    padded[rows.shape[0]:].zero_()
    return padded


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """`activation(x @ weight.T + bias)` in one oneDNN call, no autograd; only where `takes_onednn` holds.
    x's rows are padded to `bucketed_rows`; strided views (e.g. `weight.t()`) are read in place.
    `activation`: None or a moe_kernels.ACTIVATIONS name."""
    attr, algorithm = FUSED_ACTIVATIONS[activation] if activation else ("none", "")
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    out = torch.ops.mkldnn._linear_pointwise(_pad_rows(rows, bucketed_rows(count)), weight, bias, attr, [],
                                             algorithm)
    return out[:count].view(*x.shape[:-1], weight.shape[0])


def onednn_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """dW = grad_outᵀ · inputs for 2-D grad_out [m, n], inputs [m, k] → [n, k]; the summed-over m is padded
    with zero rows to `bucketed_rows` (a new m would be a new oneDNN kernel, see there)."""
    count = bucketed_rows(grad_out.shape[0])
    return torch.ops.mkldnn._linear_pointwise(_pad_rows(grad_out, count).t(), _pad_rows(inputs, count).t(), None,
                                              "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with all three GEMMs on oneDNN: y = x Wᵀ + b; dx = dy W; dW = dyᵀ x; db = Σ dy.
    Measured (1024 rows, 2 threads, MKL → oneDNN): 512→2048 forward 10.9 → 4.5 ms, dx 10.8 → 4.8 ms,
    dW 10.5 → 6.7 ms; LM head 512→32000 forward 200 → 106 ms, dx 162 → 81 ms, dW 172 → 158 ms."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # like F.linear's autograd: x only if W needs a gradient, W only if x does (frozen-weight fine-tuning)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable  # the oneDNN op has no derivative: a double backward must fail, not come out wrong
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # dx = dy W, as a linear with weight Wᵀ (grad mode is off in here)
            grad_x = linear(grad_rows, weight.t()).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            x_rows = x.reshape(-1, x.shape[-1])
            on_onednn = takes_onednn(x_rows, grad_rows.t())  # dW has the forward's FLOPs
            grad_weight = onednn_weight_grad(grad_rows, x_rows) if on_onednn else grad_rows.t() @ x_rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors (None skipped) must record a graph."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, on oneDNN where it applies (with a oneDNN backward when a gradient is wanted)."""
    if not takes_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if needs_autograd(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state-dict keys) whose forward and backward run on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
