"""Fixtures for the MoE layer tests: forcing each experts kernel and proving it ran.

`kernel_path` runs a test once per kernel, by making "auto" (what the layers use by default) resolve to it:
the model's own "bmm", "loop" and "grouped_mm" (CUDA's in production; torch._grouped_mm also runs on CPU, so
its custom backward is tested in every CI run), and the CPU backend's loop on worker threads with torch's
GEMMs or with oneDNN's (these tests' tiny GEMMs are below cpu_gemm.MIN_FLOPS, so oneDNN is forced)."""

import functools
import types

import pytest

from hf_moe_mt import moe_kernels
from hf_moe_mt.backends import cpu_experts, cpu_gemm

KERNEL_PATHS = ("bmm", "loop", "grouped_mm", "threads_torch", "threads_onednn")
FORCED = {
    "bmm": moe_kernels.bmm_kernel,
    "loop": moe_kernels.loop_kernel,
    "grouped_mm": moe_kernels.grouped_mm_kernel,
    "threads_torch": functools.partial(moe_kernels.loop_kernel, gemms=cpu_experts.ThreadedGemms()),
    "threads_onednn": functools.partial(moe_kernels.loop_kernel, gemms=cpu_experts.OneDNNGemms()),
}


class PathSpy:
    """Counts which kernel actually ran (padded bmm, per-expert loop, grouped_mm), how many loops handed their
    experts to the worker threads, and how many expert GEMMs went to oneDNN."""

    def __init__(self, monkeypatch):
        self.padded = self.loop = self.grouped_mm = self.threads = self.onednn = 0
        real_padded, real_bounds = moe_kernels._padded_bmm_ffn, moe_kernels._bounds
        real_grouped, real_onednn = moe_kernels._GroupedMMFFN, cpu_experts.onednn_linear
        real_threads = cpu_experts.for_each_expert

        def count(name, real):
            def counted(*args, **kwargs):
                setattr(self, name, getattr(self, name) + 1)
                return real(*args, **kwargs)
            return counted

        monkeypatch.setattr(cpu_experts, "onednn_linear", count("onednn", real_onednn))
        monkeypatch.setattr(cpu_experts, "for_each_expert", count("threads", real_threads))
        monkeypatch.setattr(moe_kernels, "_GroupedMMFFN", types.SimpleNamespace(apply=count("grouped_mm",
                                                                                                real_grouped.apply)))
        monkeypatch.setattr(moe_kernels, "_padded_bmm_ffn", count("padded", real_padded))
        monkeypatch.setattr(moe_kernels, "_bounds", count("loop", real_bounds))  # only the loop computes bounds

    def assert_only(self, path: str) -> None:
        ran = {"bmm": self.padded, "loop": self.loop, "grouped_mm": self.grouped_mm}
        kernel = "loop" if path.startswith("threads") else path
        assert ran[kernel] > 0 and sum(ran.values()) == ran[kernel], f"expected only {path}, ran {ran}"
        assert (self.threads > 0) == path.startswith("threads"), f"{path}: {self.threads} threaded loops"
        assert (self.onednn > 0) == (path == "threads_onednn"), f"{path}: {self.onednn} oneDNN GEMMs"


def _force_path(monkeypatch, path: str) -> PathSpy:
    if path == "threads_onednn" and not cpu_gemm.onednn_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    monkeypatch.setitem(moe_kernels._NAMED_KERNELS, "auto", FORCED[path])
    spy = PathSpy(monkeypatch)
    spy.name = path
    return spy


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    return _force_path(monkeypatch, request.param)


@pytest.fixture(params=["bmm", "loop", "threads_torch"])
def float64_kernel_path(request, monkeypatch):
    """The paths that run in float64 (torch._grouped_mm has no float64 kernels, oneDNN none), for gradcheck."""
    return _force_path(monkeypatch, request.param)


@pytest.fixture
def path_spy(monkeypatch):
    return PathSpy(monkeypatch)
