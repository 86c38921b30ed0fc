"""Fixtures for the MoE layer tests: forcing each kernel path of grouped_ffn and proving it ran.

The grouped_mm path is CUDA's in production; torch._grouped_mm also runs on CPU (a slower loop inside
torch), so forcing it here tests its custom backward in every CI run. `loop_onednn` is the loop with its
GEMMs on oneDNN, as production CPUs run it (these tests' tiny GEMMs are below cpu_gemm.MIN_FLOPS, so the
plain `loop` path runs torch's own GEMMs)."""

import types

import pytest

from hf_moe_mt import cpu_gemm, moe_kernels

KERNEL_PATHS = ("padded", "loop", "loop_onednn", "grouped_mm")


class PathSpy:
    """Counts which grouped_ffn implementation actually ran (padded bmm, per-expert loop, grouped_mm) and
    how many expert GEMMs went to oneDNN."""

    def __init__(self, monkeypatch):
        self.padded = 0
        self.loop = 0
        self.grouped_mm = 0
        self.onednn = 0
        real_padded, real_bounds = moe_kernels._padded_bmm_ffn, moe_kernels._bounds
        real_grouped, real_onednn = moe_kernels._GroupedMMFFN, moe_kernels.onednn_linear

        def onednn(*args):
            self.onednn += 1
            return real_onednn(*args)

        monkeypatch.setattr(moe_kernels, "onednn_linear", onednn)

        def grouped(*args):
            self.grouped_mm += 1
            return real_grouped.apply(*args)

        monkeypatch.setattr(moe_kernels, "_GroupedMMFFN", types.SimpleNamespace(apply=grouped))

        def padded(*args, **kwargs):
            self.padded += 1
            return real_padded(*args, **kwargs)

        def bounds(*args, **kwargs):  # only the loop path's forward computes row bounds
            self.loop += 1
            return real_bounds(*args, **kwargs)

        monkeypatch.setattr(moe_kernels, "_padded_bmm_ffn", padded)
        monkeypatch.setattr(moe_kernels, "_bounds", bounds)

    def assert_only(self, path: str) -> None:
        ran = {"padded": self.padded, "loop": self.loop, "grouped_mm": self.grouped_mm}
        kernel = "loop" if path == "loop_onednn" else path
        assert ran[kernel] > 0 and sum(ran.values()) == ran[kernel], f"expected only {path}, ran {ran}"
        assert (self.onednn > 0) == (path == "loop_onednn"), f"{path}: {self.onednn} oneDNN GEMMs"


def _force_path(monkeypatch, path: str) -> PathSpy:
    """The padded bmm is forced on or off, and so are grouped_mm and oneDNN."""
    if path == "loop_onednn" and not cpu_gemm.onednn_enabled():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0 if path == "loop_onednn" else float("inf"))
    monkeypatch.setattr(moe_kernels, "_prefers_padded_bmm", lambda counts, rows: path == "padded")
    monkeypatch.setattr(moe_kernels, "_use_grouped_mm", lambda x, w1: path == "grouped_mm")
    spy = PathSpy(monkeypatch)
    spy.name = path
    return spy


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    return _force_path(monkeypatch, request.param)


@pytest.fixture(params=["padded", "loop"])
def float64_kernel_path(request, monkeypatch):
    """The paths that run in float64 (torch._grouped_mm has no float64 kernels), for gradcheck."""
    return _force_path(monkeypatch, request.param)


@pytest.fixture
def path_spy(monkeypatch):
    return PathSpy(monkeypatch)
