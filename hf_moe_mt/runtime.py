"""Process-wide CPU settings for MoE training (transparent huge pages, glibc, oneDNN's kernel cache). Never
applied on import: `hf-moe-mt train`/`quickstart` and the benchmark scripts call `apply_memory_settings()`;
scripts of your own may call it too (first thing, before any tensor exists). A process that keeps freed memory
holds its peak footprint: call `release_freed_memory()` between phases that allocate differently (e.g. between
models of different sizes), or the heap fragments and grows."""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
OPT_OUT = "HF_MOE_MT_KEEP_FREED_MEMORY"  # set to 0 to leave glibc's defaults alone
_keeping_freed_memory = False  # set once keep_freed_memory() applied its settings in this process


THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch; set it to 0 yourself to opt out
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's own; set it yourself to choose another size
ONEDNN_DEFAULT_CAPACITY = 1024  # oneDNN's default
ONEDNN_CACHE_CAPACITY = 16384


def apply_memory_settings() -> dict[str, bool]:
    """The three settings below; returns which took effect."""
    return {"transparent_huge_pages": use_transparent_huge_pages(), "keep_freed_memory": keep_freed_memory(),
            "more_onednn_kernels": keep_more_onednn_kernels()}


def keep_more_onednn_kernels() -> bool:
    """Let oneDNN keep `ONEDNN_CACHE_CAPACITY` compiled GEMM kernels instead of its default 1024, unless the
    environment already sets a size.

    Why: torch runs bf16 GEMMs on CPUs with native bf16 (AVX512-BF16, AMX) through oneDNN, which JIT-compiles a
    kernel for every new shape, at several ms each (a 200 x 256 -> 1,024 bf16 GEMM runs in 0.4 ms). Under bf16
    autocast a training step's shapes vary with the batch's padded length and with every expert's row count, so
    a run meets thousands of shapes; with room for only 1,024 the cache evicts kernels that come back a few steps
    later and recompiles them. With the larger cache the quickstart's bf16 steps were 1.46x faster on an AMX
    Xeon (compilation had been a quarter of the step) for 2-4 GB more peak memory (docs/benchmarks.md). oneDNN
    reads the variable once, when it first compiles a kernel: call this before any GEMM. Returns whether a cache
    larger than oneDNN's default is requested now."""
    os.environ.setdefault(ONEDNN_CACHE_VARIABLE, str(ONEDNN_CACHE_CAPACITY))
    try:
        return int(os.environ[ONEDNN_CACHE_VARIABLE]) > ONEDNN_DEFAULT_CAPACITY
    except ValueError:
        return False


def use_transparent_huge_pages() -> bool:
    """Back large CPU tensors with transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE), unless the
    environment already says otherwise. Why: expert gradients are fresh allocations every step
    (zero_grad(set_to_none=True)) and page-faulting them in 4 KiB pages costs several times more than in
    2 MiB ones. PyTorch reads the variable once, at its first CPU allocation, so this works only before any
    tensor exists; child processes inherit it. Returns whether THP is requested now."""
    os.environ.setdefault(THP_VARIABLE, "1")
    return os.environ[THP_VARIABLE] == "1"


def keep_freed_memory() -> bool:
    """Serve large tensors from glibc's heap and keep freed memory for reuse instead of unmapping it.

    Why: a training step frees and re-allocates hundreds of MB of expert gradients and activations. With
    glibc's defaults each of those is a fresh mmap that the next step page-faults in again (124 ms per
    512 MB measured here; ~15 ms with transparent huge pages, which in turn stall for seconds now and then
    on memory compaction). Keeping freed memory makes the process hold its peak footprint, as PyTorch's
    CUDA caching allocator does; fwd+bwd of a 128-expert layer (T=4096, d=512) went from 572 ms (noisy,
    up to 1.2 s) to 448 ms. Returns whether the settings were applied (False off glibc/Linux or opted out).
    """
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    global _keeping_freed_memory
    _keeping_freed_memory = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _keeping_freed_memory


def keeps_freed_memory() -> bool:
    """Whether `keep_freed_memory()` applied its settings in this process."""
    return _keeping_freed_memory


def release_freed_memory() -> bool:
    """Give the free parts of glibc's heap back to the OS (malloc_trim); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
