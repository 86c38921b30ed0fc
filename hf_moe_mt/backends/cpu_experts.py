"""The CPU backend's experts kernel: the model's own "loop" kernel (moe_kernels) with its per-expert GEMMs on
the GEMM library the probe chose (oneDNN or torch's), concurrently on single-threaded worker threads
(expert_threads.py) where the probe measured that faster than one expert at a time on the library's threads.

`CpuExpertsKernel(gemm)` has the experts-kernel contract of `moe_kernels.grouped_ffn`, so a backend sets it as
`GroupedExperts.implementation`; what it computes, keeps for the backward and returns is the loop kernel's.
Its rule, fixed given the chosen library:
1. not on the CPU: the model's "auto" kernel (nothing here is for GPUs);
2. no autograd (translation): the loop's inference pass, both GEMMs of an expert back to back (on one worker),
   on oneDNN reading kept blocked copies of the expert weights where the probe measured that faster than the
   chosen library's plain GEMMs (`packed`, packed_weights.py; also when training uses torch's library);
3. training: where the probe measured one padded batched GEMM faster than the loop on uniform groups
   (`bmm_for_uniform_groups`), near-uniform groups (`moe_kernels.prefers_padded_bmm`) run as the padded bmm;
   everything else runs the loop (on the worker threads where `workers`). A training call drops every kept
   packed copy first.
"""

from __future__ import annotations

import torch

from .. import moe_kernels
from ..moe_kernels import ExpertGemms, needs_autograd
from . import huge_pages, packed_weights
from .cpu_gemm import bucketed_rows, compiles_per_shape, onednn_linear, onednn_weight_grad, pad_rows, takes_onednn
from .expert_threads import for_each_expert

GEMM_LIBRARIES = ("onednn", "torch")


class ThreadedGemms(ExpertGemms):
    """torch's own GEMMs; `workers`: experts spread over single-threaded workers, else one expert at a time
    on the calling thread, each GEMM split over torch's intra-op threads. Where torch compiles a oneDNN kernel
    per GEMM shape (bf16 on CPUs with native bf16), an expert's rows are padded with zero rows to
    `bucketed_rows`: every expert's row count is data, and a kernel per count costs compile time each step and
    memory in oneDNN's kernel cache for the whole run. Large buffers (weight gradients, activations) go on
    transparent huge pages where that saves page faults (huge_pages.py)."""

    name = "torch"

    def __init__(self, workers: bool = True):
        self.workers = workers

    def new_buffer(self, like, *shape) -> torch.Tensor:
        return huge_pages.new_buffer(like, *shape)

    def for_each_expert(self, work, bounds) -> None:
        for_each_expert(work, bounds, parallel=self.workers)

    def linear_into(self, x, weight, bias, out) -> None:
        rows = _padded_row_count(x)
        if rows == x.shape[0]:
            return super().linear_into(x, weight, bias, out)
        out.copy_(torch.addmm(bias, pad_rows(x, rows), weight.t())[: x.shape[0]])

    def ffn_into(self, x, w1, b1, w2, b2, activation, out) -> None:
        rows = _padded_row_count(x)
        if rows == x.shape[0]:
            return super().ffn_into(x, w1, b1, w2, b2, activation, out)
        padded_out = out.new_empty(rows, out.shape[1])
        super().ffn_into(pad_rows(x, rows), w1, b1, w2, b2, activation, padded_out)
        out.copy_(padded_out[: x.shape[0]])

    def grads_into(self, grad_out, inputs, weight, grad_in, grad_weight) -> None:
        rows = _padded_row_count(grad_out)
        if rows == grad_out.shape[0]:
            return super().grads_into(grad_out, inputs, weight, grad_in, grad_weight)
        padded_grad = pad_rows(grad_out, rows)  # zero rows: nothing added to grad_weight
        grad_in.copy_(torch.mm(padded_grad, weight)[: grad_out.shape[0]])
        torch.mm(padded_grad.t(), pad_rows(inputs, rows), out=grad_weight)


def _padded_row_count(x: torch.Tensor) -> int:
    return bucketed_rows(x.shape[0]) if compiles_per_shape(x) else x.shape[0]


class OneDNNGemms(ThreadedGemms):
    """oneDNN GEMMs (activation fused into the first one) where `takes_onednn` holds, torch's elsewhere."""

    name = "onednn"

    def __init__(self, packed: bool = False, workers: bool = True):
        super().__init__(workers)
        self.packed = packed  # inference GEMMs (`ffn_into`) read kept blocked copies of the expert weights

    def linear_into(self, x, weight, bias, out) -> None:
        if takes_onednn(x, weight, bias):
            out.copy_(onednn_linear(x, weight, bias))
        else:
            super().linear_into(x, weight, bias, out)

    def ffn_into(self, x, w1, b1, w2, b2, activation, out) -> None:
        if takes_onednn(x, w1, b1):
            hidden = onednn_linear(x, w1, b1, activation, packed=self.packed)
            out.copy_(onednn_linear(hidden, w2, b2, packed=self.packed))
        else:
            super().ffn_into(x, w1, b1, w2, b2, activation, out)

    def grads_into(self, grad_out, inputs, weight, grad_in, grad_weight) -> None:
        if takes_onednn(grad_out, weight.t()):  # rows·O·I, the FLOPs of both backward products
            grad_in.copy_(onednn_linear(grad_out, weight.t()))
            grad_weight.copy_(onednn_weight_grad(grad_out, inputs))
        else:
            super().grads_into(grad_out, inputs, weight, grad_in, grad_weight)


class CpuExpertsKernel:
    """An experts kernel (see the module docstring) for one GEMM library, "onednn" or "torch"; `packed`:
    inference runs on oneDNN and reads kept blocked copies of the expert weights; `workers`: the per-expert loop
    runs on the worker threads (else on the calling thread)."""

    def __init__(self, gemm: str, bmm_for_uniform_groups: bool = False, packed: bool = False, workers: bool = True):
        if gemm not in GEMM_LIBRARIES:
            raise ValueError(f"gemm={gemm!r} is not one of {GEMM_LIBRARIES}")
        self.gemm, self.bmm_for_uniform_groups, self.packed = gemm, bmm_for_uniform_groups, packed
        self.workers = workers
        self.gemms = OneDNNGemms(workers=workers) if gemm == "onednn" else ThreadedGemms(workers)  # training
        self.inference_gemms = OneDNNGemms(packed=True, workers=workers) if packed else self.gemms
        self.__name__ = ("cpu_threads_" if workers else "cpu_") + gemm + ("_bmm" if bmm_for_uniform_groups else "") + (
            "_packed" if packed else "")

    def __repr__(self) -> str:
        return self.__name__

    def __call__(self, x, tokens_per_expert, w1, b1, w2, b2, activation: str) -> torch.Tensor:
        if x.device.type != "cpu":  # 1.
            return moe_kernels.auto_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation)
        if not needs_autograd(x, w1, b1, w2, b2):  # 2.
            return moe_kernels.loop_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation, self.inference_gemms)
        packed_weights.forget_all()  # 3.
        counts = tokens_per_expert.tolist()
        if self.bmm_for_uniform_groups and moe_kernels.prefers_padded_bmm(counts, x.shape[0]):  # 3.
            rows = bucketed_rows(max(counts)) if compiles_per_shape(x) else max(counts)  # (see ThreadedGemms)
            return moe_kernels.bmm_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation, rows_per_expert=rows,
                                          new_buffer=self.gemms.new_buffer)
        return moe_kernels.loop_kernel(x, tokens_per_expert, w1, b1, w2, b2, activation, self.gemms)


# (library, padded bmm for near-uniform groups, packed inference weights, worker threads) -> kernel
KERNELS = {(gemm, bmm, packed, workers): CpuExpertsKernel(gemm, bmm, packed, workers)
           for gemm in GEMM_LIBRARIES for bmm in (False, True) for packed in (False, True) for workers in (False, True)}

__all__ = ["CpuExpertsKernel", "KERNELS", "OneDNNGemms", "ThreadedGemms"]
