"""The process settings of runtime.py: freed tensors are reused without page faults, huge pages and the larger
oneDNN kernel cache are requested, and a user's own environment wins."""

import os
import subprocess
import sys

import pytest

from hf_moe_mt.backends.cpu_gemm import onednn_available

SCRIPT = """
import resource
from hf_moe_mt.runtime import keep_freed_memory
applied = keep_freed_memory()
import torch
peak = torch.ones(128 * 1024 * 1024)  # a 512 MB step touched and freed: the loop's peak footprint
del peak
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = torch.ones(64 * 1024 * 1024)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run_in_a_fresh_process(script: str, *args: str, timeout: float, **variables: str) -> str:
    """stdout of `script` in a new interpreter whose environment holds only `variables` besides the paths and one
    thread: the settings under test are read once per process, so each case needs its own."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1", **variables}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=True).stdout


def _page_faults_of_a_repeated_allocation(opt_out: bool) -> tuple[str, int]:
    variables = {"THP_MEM_ALLOC_ENABLE": "0"} | ({"HF_MOE_MT_KEEP_FREED_MEMORY": "0"} if opt_out else {})
    applied, faults = _run_in_a_fresh_process(SCRIPT, timeout=120, **variables).split()
    return applied, int(faults)


def test_kept_memory_is_reused_without_page_faults():
    applied, faults = _page_faults_of_a_repeated_allocation(opt_out=False)
    assert applied == "True" and faults < 1_000  # 256 MB in 4 KiB pages would be 65,536 faults


def test_opting_out_leaves_glibc_unmapping_freed_memory():
    applied, faults = _page_faults_of_a_repeated_allocation(opt_out=True)
    assert applied == "False" and faults > 30_000



def test_huge_pages_are_requested_by_the_call_and_a_users_opt_out_wins(monkeypatch):
    from hf_moe_mt.runtime import use_transparent_huge_pages

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert use_transparent_huge_pages() and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert not use_transparent_huge_pages() and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


CACHE_SCRIPT = """
import sys
from hf_moe_mt.runtime import keep_more_onednn_kernels
applied = keep_more_onednn_kernels() if sys.argv[1] == "apply" else None
import torch
weight = torch.randn(8, 8)
inputs = [torch.randn(rows, 8) for rows in range(1, 1201)]  # 1,200 shapes: more than oneDNN's default 1,024
for _ in range(2):
    for x in inputs:
        torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
print("applied", applied)
"""


def _onednn_cache_events(apply: bool, capacity: str | None = None) -> tuple[str, dict[str, int]]:
    """Run 1,200 oneDNN GEMM shapes twice in a fresh process; oneDNN's verbose log counts cache hits/misses."""
    variables = {"ONEDNN_VERBOSE": "profile_create"} | (
        {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity} if capacity is not None else {})
    out = _run_in_a_fresh_process(CACHE_SCRIPT, "apply" if apply else "plain", timeout=300, **variables)
    events = {kind: out.count(f"create:cache_{kind}") for kind in ("hit", "miss")}
    return out.strip().splitlines()[-1], events


# Each GEMM call creates one primitive here (AMX Xeon); other CPUs may add a cached weight reorder or two, hence
# the bounds rather than exact counts.
NEEDS_ONEDNN = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@NEEDS_ONEDNN
def test_the_larger_onednn_cache_keeps_every_kernel_a_run_comes_back_to():
    applied, events = _onednn_cache_events(apply=False)
    assert applied == "applied None" and events["miss"] >= 2400  # the default cache evicted every shape
    applied, events = _onednn_cache_events(apply=True)
    assert applied == "applied True" and events["hit"] >= 1200 and events["miss"] <= 1210, events  # 2nd pass hits


@NEEDS_ONEDNN
def test_a_users_own_onednn_cache_size_wins():
    applied, events = _onednn_cache_events(apply=True, capacity="1024")
    assert applied == "applied False" and events["miss"] >= 2400
