"""GEMMs on oneDNN instead of torch's default CPU library (MKL on x86), for `nn.Linear` layers and experts.

Why: which library is faster depends on the CPU (on AMD EPYCs MKL's fp32 sgemm takes a slow code path and
oneDNN's JIT kernels were ~2× faster; on an Intel Xeon MKL was faster), so `probe.py` measures both on the
machine at hand and the backend (`__init__.py`) routes a model's GEMMs here only where oneDNN won (training and
inference), or its inference GEMMs only where packed oneDNN weights won decoding.

oneDNN's `_linear_pointwise` has no autograd formula: in training `linear` runs it inside `_OneDNNLinear`,
whose backward computes dx and dW on oneDNN as well (once: a double backward raises). Everywhere else — CUDA,
CPU autocast, torch.compile (inductor picks its own kernels), dtypes oneDNN does not take, tiny products —
`linear` is exactly `F.linear`. A private torch op: this module is never imported by the model's own files.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..moe_kernels import needs_autograd
from . import packed_weights
from .instance_forward import replace_forward, replaced_forward

# oneDNN post-op (name, algorithm) that computes each activation fused into the GEMM; same names as moe_kernels.
FUSED_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
                      "silu": ("swish", "")}
_available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# bf16 only where torch itself sends bf16 GEMMs to oneDNN (AVX-512 and up); elsewhere oneDNN's bf16 is slow.
_bf16_supported = _available and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and \
    torch.ops.mkldnn._is_mkldnn_bf16_supported()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _bf16_supported else (torch.float32,)
# oneDNN costs more per call than MKL (tens of µs); below this many FLOPs (2·rows·in·out) it stops paying off.
MIN_FLOPS = 4e6


def onednn_available() -> bool:
    return _available


def takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether oneDNN should compute x·weightᵀ + bias: CPU, fp32/bf16 throughout, no CPU autocast on this thread
    (F.linear then casts as autocast wants; the experts get operands already cast by `grouped_ffn`), not inside
    torch.compile (checked first: a shape test there would add a guard and recompile), and large enough to
    repay oneDNN's per-call overhead. Gradients are fine: `linear` then runs it inside `_OneDNNLinear`."""
    if torch.compiler.is_compiling() or not _available or x.device.type != "cpu":
        return False
    if x.dtype not in _ONEDNN_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    return 2 * x.numel() * weight.shape[0] >= MIN_FLOPS and not torch.is_autocast_enabled("cpu")


def bucketed_rows(rows: int) -> int:
    """Rows rounded up so that varying row counts map onto few shapes: oneDNN JIT-compiles a kernel for every
    new shape, which costs about as much as the GEMM itself at training sizes (dynamic padding would otherwise
    be slower than MKL). Up to 64 rows exact (decode sizes, which recur anyway), above that ≤ 12.5 % padding:
    m in [2^j, 2^(j+1)) rounds up to a multiple of 2^(j-3)."""
    if rows <= 64:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def compiles_per_shape(x: torch.Tensor) -> bool:
    """Whether torch's own GEMM on x runs as a oneDNN kernel JIT-compiled for each new shape: bf16 on a CPU
    with native bf16 (torch sends those GEMMs to oneDNN; fp32 goes to MKL, which compiles nothing)."""
    return _bf16_supported and x.dtype == torch.bfloat16 and x.device.type == "cpu" \
        and not torch.compiler.is_compiling()


def pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """[m, k] → [count, k] with zero rows appended (rows itself when m == count)."""
    if rows.shape[0] == count:
        return rows
    padded = rows.new_empty(count, rows.shape[1])
    padded[: rows.shape[0]] = rows
    padded[rows.shape[0]:].zero_()
    return padded


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, packed: bool = False) -> torch.Tensor:
    """`activation(x @ weight.T + bias)` in one oneDNN call, no autograd; only where `takes_onednn` holds.
    x's rows are padded to `bucketed_rows`; strided views (e.g. `weight.t()`) are read in place.
    `activation`: None or a moe_kernels.ACTIVATIONS name. `packed`: read the weight's kept blocked copy
    (packed_weights.py; inference only — the caller guarantees no training step runs before its next use)."""
    attr, algorithm = FUSED_ACTIVATIONS[activation] if activation else ("none", "")
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if packed and packed_weights.packable(weight):
        weight = packed_weights.packed(weight)
    out = torch.ops.mkldnn._linear_pointwise(pad_rows(rows, bucketed_rows(count)), weight, bias, attr, [],
                                             algorithm)
    return out[:count].view(*x.shape[:-1], out.shape[-1])


def onednn_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """dW = grad_outᵀ · inputs for 2-D grad_out [m, n], inputs [m, k] → [n, k]; the summed-over m is padded
    with zero rows to `bucketed_rows` (a new m would be a new oneDNN kernel, see there)."""
    count = bucketed_rows(grad_out.shape[0])
    return torch.ops.mkldnn._linear_pointwise(pad_rows(grad_out, count).t(), pad_rows(inputs, count).t(), None,
                                              "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with all three GEMMs on oneDNN: y = x Wᵀ + b; dx = dy W; dW = dyᵀ x; db = Σ dy."""

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: bool = False, train_on_onednn: bool = True) -> torch.Tensor:
    """`F.linear`, on oneDNN where it applies (with a oneDNN backward when a gradient is wanted). `packed`:
    without autograd, read the weight's kept blocked copy (packed_weights.py); a call with autograd (a
    training step) drops every kept copy first, so no later inference reads one made before an update.
    `train_on_onednn=False`: only inference goes to oneDNN; with autograd this is F.linear (torch's library)."""
    if needs_autograd(x, weight, bias):
        if not torch.compiler.is_compiling():  # (a compiled graph would not run it anyway)
            packed_weights.forget_all()
        if train_on_onednn and takes_onednn(x, weight, bias):
            return _OneDNNLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    if not takes_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    return onednn_linear(x, weight, bias, packed=packed)


def _onednn_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _onednn_packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, packed=True)


def _packed_inference_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, packed=True, train_on_onednn=False)


# (training on oneDNN, inference on packed weights) -> the forward `route_linear` installs
_ROUTED_FORWARDS = {(True, False): _onednn_linear_forward, (True, True): _onednn_packed_linear_forward,
                    (False, True): _packed_inference_linear_forward}
_ONEDNN_FORWARDS = tuple(_ROUTED_FORWARDS.values())


def route_linear(module: nn.Linear, on_onednn: bool, packed: bool = False) -> None:
    """Run this `nn.Linear` through `linear` (or back through its own forward), keeping its type, parameters
    and state-dict keys (instance_forward.py). `on_onednn`: training and inference GEMMs on oneDNN. `packed`:
    its inference GEMMs read a kept blocked copy of the weight on oneDNN (packed_weights.py), also where
    training stays on torch's library."""
    replace_forward(module, _ROUTED_FORWARDS[on_onednn, packed] if on_onednn or packed else None)


def routes_to_onednn(module: nn.Module) -> bool:
    return replaced_forward(module) in _ONEDNN_FORWARDS
