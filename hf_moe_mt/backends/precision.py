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
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from .probe import _best_seconds, cached_measurement, machine_key

logger = logging.getLogger(__name__)

CACHE_FILE = "cpu_bf16_probe.json"
ROWS, D_IN, D_OUT = 256, 512, 2048
MAX_TIME_RATIO = 0.7


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


__all__ = ["Bf16Choice", "MAX_TIME_RATIO", "cpu_bf16_choice", "measure_time_ratio", "resolve_bf16"]
