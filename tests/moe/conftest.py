"""Fixtures for the MoE layer tests: forcing each CPU kernel path of grouped_ffn and proving it ran."""

import math

import pytest

from hf_moe_mt import moe_kernels


class PathSpy:
    """Counts which grouped_ffn implementation actually ran (padded bmm or the per-expert loop)."""

    def __init__(self, monkeypatch):
        self.padded = 0
        self.loop = 0
        real_padded, real_bounds = moe_kernels._padded_bmm_ffn, moe_kernels._bounds

        def padded(*args, **kwargs):
            self.padded += 1
            return real_padded(*args, **kwargs)

        def bounds(*args, **kwargs):  # only the loop path's forward computes row bounds
            self.loop += 1
            return real_bounds(*args, **kwargs)

        monkeypatch.setattr(moe_kernels, "_padded_bmm_ffn", padded)
        monkeypatch.setattr(moe_kernels, "_bounds", bounds)

    def assert_only(self, path: str) -> None:
        if path == "padded":
            assert self.padded > 0 and self.loop == 0, f"padded={self.padded} loop={self.loop}"
        else:
            assert self.loop > 0 and self.padded == 0, f"padded={self.padded} loop={self.loop}"


@pytest.fixture(params=["padded", "loop"])
def kernel_path(request, monkeypatch):
    """Force one CPU path: an infinite waste budget always pads, a negative one never does."""
    waste = math.inf if request.param == "padded" else -1.0
    monkeypatch.setattr(moe_kernels, "PADDED_BMM_MAX_WASTE", waste)
    spy = PathSpy(monkeypatch)
    spy.name = request.param
    return spy


@pytest.fixture
def path_spy(monkeypatch):
    return PathSpy(monkeypatch)
