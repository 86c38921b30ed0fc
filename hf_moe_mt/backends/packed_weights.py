"""oneDNN's blocked ("packed") copies of weights, kept between inference GEMMs.

Why: `_linear_pointwise` with a plain weight reorders that weight into oneDNN's blocked layout on every call.
At decoding sizes (tens of rows against a 512×2048 expert or a 32k-word LM head) the reorder costs as much as
the product; done once per weight and kept, beam-search decoding measured 1.07-1.14× faster on an AMD EPYC
(expert GEMMs 1.4×). The probe (probe.py) measures packed against plain on the machine at hand and the backend
packs only where it won.

Only inference GEMMs use it (no autograd: translation, evaluation); a training step never reads a packed copy,
and every one resets the store (`forget_all`), so weights updated by an optimizer step — in place, or through
`.data` where the version counter does not see it — are packed afresh for the next translation. Within
inference a copy is reused only while its weight is the same tensor (weakref), at the same address and version
(`load_state_dict`, `copy_` and in-place updates bump it). Not seen: a write through `.data` between two
translations with no training step in between; call `hf_moe_mt.backends.forget_packed_weights()` after one.
Memory: one more copy of every packed weight while the store holds it; `forget_all()` frees them.
"""

from __future__ import annotations

import threading
import weakref

import torch

_lock = threading.RLock()  # reentrant: a weakref callback may run inside a locked section
# id(base tensor) -> (weakref to it, {(offset, shape, dtype): (address, version, packed copy)})
_store: dict[int, tuple[weakref.ref, dict[tuple, tuple[int, int, torch.Tensor]]]] = {}
ROWS_HINT = 64  # oneDNN picks its blocking for this many rows; any row count works with the result


def packable(weight: torch.Tensor) -> bool:
    """A 2-D [out, in] CPU weight in its natural layout (a Linear's weight, or one expert's slice of the 3-D
    experts' weights)."""
    return weight.dim() == 2 and weight.is_contiguous() and weight.device.type == "cpu"


def packed(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of `weight` (see `packable`), made now or reused; for inference GEMMs only."""
    base = _base_of(weight)
    slot = (weight.storage_offset(), tuple(weight.shape), weight.dtype)
    with _lock:
        entry = _store.get(id(base))
        if entry is None or entry[0]() is not base:
            entry = (weakref.ref(base, _drop), {})
            _store[id(base)] = entry
        kept = entry[1].get(slot)
        if kept is not None and kept[0] == weight.data_ptr() and kept[1] == weight._version:
            return kept[2]
        copy = _pack(weight.detach())
        entry[1][slot] = (weight.data_ptr(), weight._version, copy)
        return copy


def _base_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that owns a view's storage: copies are kept per owner (an expert's slice shares its 3-D owner)."""
    return tensor if tensor._base is None else tensor._base


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)


def _drop(dead: weakref.ref) -> None:
    """A packed weight's tensor was freed: free its copies (the entry is found by its weakref, not by an id
    that a new tensor may already reuse)."""
    with _lock:
        for key, (ref, _) in list(_store.items()):
            if ref is dead:
                del _store[key]


def forget(tensors) -> None:
    """Drop the packed copies of these tensors only (other models' copies stay)."""
    with _lock:
        for tensor in tensors:
            base = _base_of(tensor)
            entry = _store.get(id(base))
            if entry is not None and entry[0]() is base:
                del _store[id(base)]


def forget_all() -> None:
    """Drop every packed copy (a training step is about to change weights; or to free their memory)."""
    if _store:
        with _lock:
            _store.clear()


def packed_count() -> int:
    """How many packed copies the store holds (tests, diagnostics)."""
    with _lock:
        return sum(len(slots) for _, slots in _store.values())
