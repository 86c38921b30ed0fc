"""The experts kernel's large CPU buffers on transparent huge pages, tensor by tensor.

Why: glibc serves every block of 32 MiB or more from a fresh mmap (its adaptive mmap threshold stops growing
there), so in a process without `runtime.apply_memory_settings()` each such tensor is page-faulted in, 4 KiB at
a time, every time it is allocated. The experts' stacked weight gradients [E, out, in] are such tensors at any
real size (E=128, d=512, ffn=2048: two of 512 MiB per layer and step), and so are the [rows, ffn] activations
of a large batch. Asking the kernel to back them with 2 MiB pages (what PyTorch does for every allocation under
`THP_MEM_ALLOC_ENABLE=1`) makes first-touching 512 MiB 2-3x cheaper. Only these tensors' pages change; nothing
process-wide.

Skipped where it cannot help or is not needed: below `ALWAYS_MAPPED_BYTES` (glibc reuses smaller blocks from
its heap, already faulted in), when PyTorch allocates on huge pages itself (`THP_MEM_ALLOC_ENABLE=1`), when
`runtime.keep_freed_memory()` made glibc serve large blocks from its heap too, off Linux. Where the system
disables THP (`/sys/kernel/mm/transparent_hugepage/enabled` is `never`) the advice is accepted and ignored.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from .. import runtime

ALWAYS_MAPPED_BYTES = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
HUGE_PAGE_BYTES = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14  # linux/mman.h


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def wanted() -> bool:
    """Whether advising is in effect in this process now (see the module docstring)."""
    return (_madvise is not None and os.environ.get(runtime.THP_VARIABLE) != "1"
            and not runtime.keeps_freed_memory())


def advise(tensor: torch.Tensor) -> bool:
    """Ask the kernel to back `tensor`'s not-yet-touched pages with huge pages (its 2 MiB-aligned interior: only
    whole huge pages can be). Call it right after allocating, before writing. Returns whether advice was given."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < ALWAYS_MAPPED_BYTES or not wanted():
        return False
    start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (tensor.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return end > start and _madvise(start, end - start, _MADV_HUGEPAGE) == 0


def new_buffer(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """`like.new_empty(shape)`, advised onto huge pages where that helps."""
    buffer = like.new_empty(shape)
    advise(buffer)
    return buffer
