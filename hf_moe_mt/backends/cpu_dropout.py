"""Dropout whose mask takes a quarter of the random draws of torch's on a CPU, for the model's `nn.Dropout`s.

Why: torch's CPU dropout draws one double from the Mersenne Twister per element, serially (no thread helps),
which made dropout a large share of a small model's training step. Here each 64-bit draw gives four 16-bit
uniforms, and an element is kept when its uniform is at or above round(p · 2¹⁶): the keep probability is
1 − p to within 2⁻¹⁷, the same for every element and independent between them. The draws come from torch's
default CPU generator, so `torch.manual_seed` (and transformers' `set_seed`) reproduce a run, and gradient
checkpointing, which restores that generator before recomputing, recomputes the same mask. Autograd keeps the
one-byte mask (torch's keeps a mask in the input's dtype).

Everywhere else — off the CPU, inside torch.compile (inductor generates its own dropout), p = 0 or 1, eval
mode — `dropout` is exactly `F.dropout`. Never imported by the model's own files.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .instance_forward import replace_forward, replaced_forward

_UNIFORM_BITS = 16
_DRAWS_PER_INT64 = 64 // _UNIFORM_BITS


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool tensor of `shape`, True with probability 1 − p (to within 2⁻¹⁷) per element, independently."""
    numel = shape.numel()
    bits = torch.empty(-(-numel // _DRAWS_PER_INT64), dtype=torch.int64).random_(-2**63, None)
    # int16 views of the 64-bit draws are uniform on [-2¹⁵, 2¹⁵); shift the threshold into that range
    threshold = round(p * 2**_UNIFORM_BITS) - 2**(_UNIFORM_BITS - 1)
    return bits.view(torch.int16)[:numel].view(shape) >= threshold


class _KeepAndScale(torch.autograd.Function):
    """x · keep / (1 − p), whose backward applies the same mask and scale to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad_output.mul(keep).mul_(ctx.scale), None, None


def takes_fast_dropout(x: torch.Tensor, p: float, training: bool) -> bool:
    """CPU, training, 0 < p < 1, floating point, not inside torch.compile (checked first: no guard added)."""
    if torch.compiler.is_compiling() or not training or not 0.0 < p < 1.0:
        return False
    return x.device.type == "cpu" and x.is_floating_point()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the cheaper mask where `takes_fast_dropout`."""
    if not takes_fast_dropout(x, p, training):
        return F.dropout(x, p, training)
    return _KeepAndScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


def _fast_dropout_forward(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return dropout(x, self.p, self.training)


def route_dropout(module: nn.Dropout, fast: bool) -> None:
    """Run this `nn.Dropout` through `dropout` (or back through its own forward), keeping its type
    (instance_forward.py), as `cpu_gemm.route_linear` does for Linear layers. `inplace=True` modules are left
    alone (their callers rely on the input being overwritten)."""
    if not module.inplace:
        replace_forward(module, _fast_dropout_forward if fast else None)


def routes_to_fast_dropout(module: nn.Module) -> bool:
    return replaced_forward(module) is _fast_dropout_forward
