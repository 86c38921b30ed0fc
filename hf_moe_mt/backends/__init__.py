"""Optional CPU speed backend, applied to a loaded model from outside (like expert parallelism, parallel.py).

The model's own files use plain `nn.Linear` and standard torch ops only: they travel as Hub remote code, run
anywhere, and stay visible to everything that looks for `nn.Linear` (quantization, PEFT). On a CPU one call
makes the same model faster:

    from hf_moe_mt.backends import enable_fast_cpu
    choice = enable_fast_cpu(model)          # print(choice.describe())

1. A GEMM library for each use — the model's Linear layers, the experts — from a short measured probe,
   cached per machine (probe.py): oneDNN where it won, torch's default (MKL on x86) elsewhere.
2. Every `nn.Linear` whose library is oneDNN runs through `cpu_gemm.linear` (type, parameters and state-dict
   keys unchanged; exactly F.linear off the CPU, under autocast and torch.compile).
3. The experts run `cpu_experts.CpuExpertsKernel`: per-expert GEMMs, concurrently on single-threaded worker
   threads or one expert at a time on the library's own threads, whichever the probe measured faster (and,
   where it measured it faster, near-uniform groups as one padded batched GEMM). Its large fresh buffers
   (stacked weight gradients, [rows, ffn] activations) go on transparent huge pages in a process without our
   memory settings, where glibc would page-fault them in 4 KiB at a time every step (huge_pages.py).
4. Where the probe measured it faster than the use's own plain GEMMs, inference GEMMs (translation, evaluation)
   run on oneDNN reading weights packed once into oneDNN's blocked layout and kept, also for a use whose
   training stays on torch's library (packed_weights.py: one more copy of those weights in memory
   while translating; a training step drops them).
5. Every `nn.Dropout` draws its mask four elements per 64-bit random number (cpu_dropout.py) instead of
   torch's one serial draw per element: the same distribution and seeding, a fraction of the time.
Nothing of it is saved with the model; `disable_fast_cpu(model)` undoes it. The `hf-moe-mt` commands and the
benchmark scripts call it; `HF_MOE_MT_CPU_GEMM=onednn|torch` forces a library, `=off` leaves models standard.
Never imported by the model's own files.

Why a call on the model, not transformers' hooks or torch.library ops: transformers' `ExpertsInterface` /
`@use_experts_implementation` dispatch experts that route inside themselves (top-k index and weights in,
gated experts, the decorated class in the modeling file); ours receive rows already planned by capacity and
RTS and grouped by expert, the contract expert parallelism swaps in — so the experts take a kernel by name or
as a callable (`GroupedExperts.implementation`), and this backend hands them one. Linear layers have no such
hook; replacing their forward on the instance (as accelerate's device hooks do) keeps `type(m) is nn.Linear`
for quantization and PEFT. A torch.library custom op would add a registration and fake kernels only to serve
torch.compile, under which the backend steps aside anyway (inductor picks its own kernels).
"""

from __future__ import annotations

import os
from dataclasses import replace

from torch import nn

from .cpu_dropout import route_dropout, routes_to_fast_dropout
from .cpu_experts import KERNELS as EXPERTS_KERNELS
from .cpu_gemm import route_linear, routes_to_onednn
from . import packed_weights
from .packed_weights import forget_all as forget_packed_weights
from .probe import ENV_OVERRIDE, GemmChoice, choose_gemm, cpu_count, cpu_model

OFF = GemmChoice("off", "off", "override")
_SAVED_KERNEL = "_kernel_without_backend"  # attribute on an experts module: its kernel before enable_fast_cpu


def enable_fast_cpu(model: nn.Module, gemm: str = "auto", packed: bool | None = None,
                    dropout: bool = True) -> GemmChoice:
    """Apply the CPU backend to `model` (any model: every exact `nn.Linear` and `nn.Dropout` is routed, and
    every hf_moe_mt experts module gets the backend's experts kernel). `gemm`: "auto" (probe, or
    HF_MOE_MT_CPU_GEMM when set), "onednn" or "torch". `packed`: whether inference GEMMs run on oneDNN with
    packed weights; None: where the probe measured it faster (never under a `gemm` override, which sets the
    library only). `dropout=False` keeps torch's dropout (its exact random stream, e.g. to repeat a run made
    without the backend). Returns the choice made; with HF_MOE_MT_CPU_GEMM=off and gemm "auto" it applies
    nothing and returns `OFF`. Calling it again re-applies (e.g. after expert parallelism swapped experts)."""
    if gemm == "auto" and os.environ.get(ENV_OVERRIDE) == "off":
        disable_fast_cpu(model)
        return OFF
    choice = choose_gemm(gemm)
    if packed is not None:
        choice = replace(choice, linear_packed=packed, experts_packed=packed)
    for module in model.modules():
        if type(module) is nn.Linear:
            route_linear(module, choice.linear == "onednn", choice.linear_packed)
        elif type(module) is nn.Dropout:
            route_dropout(module, dropout)
    for experts in experts_modules(model):
        if not hasattr(experts, _SAVED_KERNEL):
            setattr(experts, _SAVED_KERNEL, experts.implementation)
        experts.implementation = EXPERTS_KERNELS[choice.experts, choice.experts_bmm, choice.experts_packed,
                                                       choice.experts_workers]
    return choice


def disable_fast_cpu(model: nn.Module) -> None:
    """Back to the model's own kernels: plain `nn.Linear` and `nn.Dropout` forwards, the experts' kernel from
    before."""
    for module in model.modules():
        if type(module) is nn.Linear and routes_to_onednn(module):
            route_linear(module, False)
        elif type(module) is nn.Dropout and routes_to_fast_dropout(module):
            route_dropout(module, False)
    packed_weights.forget(model.parameters())
    for experts in experts_modules(model):
        if hasattr(experts, _SAVED_KERNEL):
            experts.implementation = getattr(experts, _SAVED_KERNEL)
            delattr(experts, _SAVED_KERNEL)


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """hf_moe_mt experts modules, matched by class name so that copies loaded as Hub remote code count too."""
    return [m for m in model.modules() if any(cls.__name__ == "GroupedExperts" for cls in type(m).__mro__)]


def describe_machine() -> str:
    """One line for benchmark tables: CPU model, CPUs this process may use, torch's thread count."""
    import torch

    return f"{cpu_model()}, {cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"


__all__ = ["GemmChoice", "OFF", "choose_gemm", "cpu_count", "cpu_model", "describe_machine", "disable_fast_cpu",
           "enable_fast_cpu", "experts_modules", "forget_packed_weights"]
