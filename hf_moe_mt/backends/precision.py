"""Whether bf16 autocast makes training faster on this CPU: a short measured probe, cached per machine.

Why measured: on CPUs with native bf16 arithmetic (AVX512-BF16, AMX) torch's bf16 GEMMs run at about twice the
fp32 rate and a whole training step gets faster; on CPUs without it torch emulates bf16 and the same step gets
several times slower. Flags in /proc/cpuinfo tell only part of it (which kernels torch's build dispatches to
is the rest), so the answer is a measurement: a Linear's forward + backward at a training-sized block
(`ROWS` rows, 512 → 2048), fp32 against bf16 autocast, timed like the GEMM probe (alternating, best of its
repeats after a warm-up). bf16 is chosen when it takes at most `MAX_TIME_RATIO` of the fp32 time: the GEMMs
must gain clearly, because the casts and the fp32 parts of a step (norms, softmax, the optimizer) gain
nothing. Cost: a fraction of a second, once per machine (cached in probe.py's cache directory, keyed like the
GEMM probe, through the same `cached_measurement`). On GPUs the question is answered by
`torch.cuda.is_bf16_supported()`.

Used by `training.bf16: auto` in the `hf-moe-mt train` configuration.

A second probe answers which attention to train with under CPU bf16 autocast: torch's CPU flash-attention kernel
(what SDPA picks on a CPU) computes its backward several times slower in bf16 than in fp32 on some CPUs (4-10x
measured on an AMX Xeon at verse lengths), where eager attention's bf16 matmuls gain like any GEMM. It times
transformers' SDPA attention against the model's eager attention, forward + backward under bf16 autocast at a
training-sized block, and picks eager when SDPA is clearly slower. It takes about as long as the first probe and
is cached the same way, in its own file (`ATTENTION_CACHE_FILE`, keyed by machine and `ATTENTION_PROBE_VERSION`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from .probe import MARGIN, _best_seconds, cached_measurement, machine_key

logger = logging.getLogger(__name__)

CACHE_FILE = "cpu_bf16_probe.json"
ROWS, D_IN, D_OUT = 256, 512, 2048
MAX_TIME_RATIO = 0.7
ATTENTION_CACHE_FILE = "cpu_bf16_attention_probe.json"
ATTENTION_SHAPE = (64, 4, 32, 64)  # batch, heads, length, head size: a batch of verses
ATTENTION_PROBE_VERSION = 1  # part of the cache key: a changed measurement invalidates old answers


@dataclass(frozen=True)
class Bf16Choice:
    """bf16 autocast on or off for CPU training, the measured bf16/fp32 time ratio and where it came from."""

    use_bf16: bool
    time_ratio: float
    source: str  # "probe" or "cache"

    def describe(self) -> str:
        verdict = "faster" if self.use_bf16 else "not faster"
        return (f"bf16 autocast {verdict} on this CPU (Linear forward+backward bf16/fp32 time {self.time_ratio:.2f}, "
                f"chosen below {MAX_TIME_RATIO}; {self.source})")


def cpu_bf16_choice(again: bool = False) -> Bf16Choice:
    """The cached answer for this machine, or a new measurement (then cached); `again` measures regardless."""
    fields, source = cached_measurement(
        CACHE_FILE, machine_key(), lambda: asdict(_decide(measure_time_ratio(), "probe")), "bf16 probe", again,
        usable=lambda entry: isinstance(entry.get("time_ratio"), (int, float)))
    return _decide(float(fields["time_ratio"]), source)


def _decide(time_ratio: float, source: str) -> Bf16Choice:
    return Bf16Choice(time_ratio <= MAX_TIME_RATIO, round(time_ratio, 3), source)


def measure_time_ratio() -> float:
    """Best bf16-autocast time / best fp32 time of one Linear forward + backward (x and W both need grad)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D_IN, generator=gen, requires_grad=True)
    weight = torch.randn(D_OUT, D_IN, generator=gen, requires_grad=True)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = F.linear(x, weight)
        out.float().sum().backward()
        x.grad = weight.grad = None

    best = _best_seconds("bf16 autocast", {"fp32": lambda: step(False), "bf16": lambda: step(True)})
    return best["bf16"] / best["fp32"]


@dataclass(frozen=True)
class AttentionChoice:
    """The attention implementation to train with under CPU bf16 autocast, and the measured SDPA/eager ratio."""

    implementation: str  # "sdpa" or "eager"
    time_ratio: float
    source: str

    def describe(self) -> str:
        return (f"{self.implementation} attention under bf16 autocast on this CPU (forward+backward SDPA/eager time "
                f"{self.time_ratio:.2f}, eager above {1 + MARGIN:.2f}; {self.source})")


def cpu_bf16_attention_choice(again: bool = False) -> AttentionChoice:
    """The cached answer for this machine, or a new measurement (then cached); `again` measures regardless."""
    fields, source = cached_measurement(
        ATTENTION_CACHE_FILE, f"{machine_key()}, attention probe v{ATTENTION_PROBE_VERSION}",
        lambda: asdict(_decide_attention(measure_attention_time_ratio(), "probe")), "bf16 attention probe", again,
        usable=lambda entry: isinstance(entry.get("time_ratio"), (int, float)))
    return _decide_attention(float(fields["time_ratio"]), source)


def _decide_attention(time_ratio: float, source: str) -> AttentionChoice:
    return AttentionChoice("eager" if time_ratio > 1 + MARGIN else "sdpa", round(time_ratio, 3), source)


def measure_attention_time_ratio() -> float:
    """Best SDPA time / best eager time, forward + backward of bf16 queries, keys and values (as autocast's
    projections make them) with a padding mask, through the functions the model dispatches to."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..modeling_moe_mt import eager_attention_forward

    batch, heads, length, head_size = ATTENTION_SHAPE
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(batch, heads, length, head_size, generator=gen, dtype=torch.bfloat16)
                         .requires_grad_() for _ in range(3))
    mask = torch.zeros(batch, 1, length, length)
    mask[: batch // 2, ..., length // 2:] = torch.finfo(torch.float32).min  # half the batch padded
    module = torch.nn.Module()
    module.is_causal = False

    def step(attention) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention(module, query, key, value, mask, scaling=head_size ** -0.5, dropout=0.0)
        out.float().sum().backward()
        query.grad = key.grad = value.grad = None

    best = _best_seconds("bf16 attention", {"sdpa": lambda: step(sdpa_attention_forward),
                                            "eager": lambda: step(eager_attention_forward)})
    return best["sdpa"] / best["eager"]


def resolve_bf16(value, on_cuda: bool) -> bool:
    """`training.bf16` as the Trainer needs it: a bool stays; "auto" becomes the answer for the device the run
    uses (CUDA: bf16 support; CPU: the probe)."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ValueError(f"training.bf16 must be true, false or auto, got {value!r}")
    if on_cuda:
        return torch.cuda.is_bf16_supported()
    choice = cpu_bf16_choice()
    logger.info("hf_moe_mt: %s", choice.describe())
    return choice.use_bf16


__all__ = ["AttentionChoice", "Bf16Choice", "MAX_TIME_RATIO", "cpu_bf16_attention_choice", "cpu_bf16_choice",
           "measure_attention_time_ratio", "measure_time_ratio", "resolve_bf16"]
