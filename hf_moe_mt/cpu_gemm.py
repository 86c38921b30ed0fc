"""CPU inference GEMMs through oneDNN instead of MKL.

Why: torch runs an fp32 `F.linear` / `addmm` on the CPU with MKL's sgemm, which on AMD CPUs takes a slow code
path; oneDNN (bundled with every x86 and aarch64 torch build) JIT-compiles AVX-512 kernels for any vendor.
Measured on this project's 2-core AMD EPYC, fp32, one call each: the LM head of beam-4 decoding
(64 × 512 → 32000) 13.9 ms with MKL vs 6.6 ms with oneDNN; one expert at decode size (64 rows, 512 → 2048 →
512) 1.82 vs 0.80 ms; 1 row 0.110 vs 0.091 ms. Results agree to float rounding (≤ 2e-4 absolute on
unit-scale 512-term dot products). bf16 already goes to oneDNN inside torch, so nothing changes there.

Only where no gradient is needed (generation, evaluation): oneDNN's `_linear_pointwise` has no autograd
formula. Everywhere else — training, CUDA, torch.compile (inductor picks its own kernels), dtypes oneDNN does
not take — `linear` is exactly `F.linear`. `HF_MOE_MT_ONEDNN=0` in the environment, or `use_onednn(False)`,
turns it off (e.g. to compare on an Intel CPU, where MKL is fast).

Pure torch (travels with the Hub's remote code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

# oneDNN post-op (name, algorithm) that computes each activation fused into the GEMM; same names as moe_kernels.
FUSED_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
                      "silu": ("swish", "")}
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# oneDNN costs ~10-20 us more per call than MKL; below this many FLOPs (2·rows·in·out) MKL is as fast or faster.
# Measured crossover, 1 and 2 threads: 2.1e6 (1×512→2048: 0.93x, 16×256→256: 0.99x), 4.2e6 (8×512→512:
# 1.07-1.20x), 8.4e6 (4×512→2048: 1.39x, 64×256→256: 1.30x).
MIN_FLOPS = 4e6

_available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = os.environ.get("HF_MOE_MT_ONEDNN", "1") != "0"


def onednn_enabled() -> bool:
    return _available and _enabled


@contextmanager
def use_onednn(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN inference GEMMs on or off inside the block (process-wide; for benchmarks and tests)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `onednn_linear` should compute this product: CPU, fp32/bf16 throughout, no gradient wanted,
    and large enough to repay oneDNN's per-call overhead."""
    if not (_enabled and _available) or x.device.type != "cpu" or 2 * x.numel() * weight.shape[0] < MIN_FLOPS:
        return False
    if x.dtype not in _ONEDNN_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not torch.compiler.is_compiling()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """`activation(x @ weight.T + bias)` in one oneDNN call; only where `takes_onednn` holds.
    `activation`: None or a name of moe_kernels.ACTIVATIONS."""
    attr, algorithm = FUSED_ACTIVATIONS[activation] if activation else ("none", "")
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, attr, [], algorithm)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, on oneDNN where it applies."""
    return onednn_linear(x, weight, bias) if takes_onednn(x, weight, bias) else F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state-dict keys) whose inference forward runs on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
