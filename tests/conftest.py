"""Shared test setup: offline Hub, small thread counts, deterministic seeds."""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The CPU backend's GEMM probe caches its result per machine: tests (and the commands they start) share one
# fresh cache instead of the user's.
_TEST_CACHE = None if "HF_MOE_MT_CACHE" in os.environ else tempfile.mkdtemp(prefix="hf_moe_mt_test_cache_")
os.environ.setdefault("HF_MOE_MT_CACHE", _TEST_CACHE or "")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _remove_test_cache():
    yield
    if _TEST_CACHE:
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)
