"""The CPU memory setting (runtime.keep_freed_memory): freed tensors are reused without page faults."""

import os
import subprocess
import sys

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


def _page_faults_of_a_repeated_allocation(opt_out: bool) -> tuple[str, int]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "THP_MEM_ALLOC_ENABLE": "0",
           "OMP_NUM_THREADS": "1"}
    if opt_out:
        env["HF_MOE_MT_KEEP_FREED_MEMORY"] = "0"
    applied, faults = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                                     timeout=120, check=True).stdout.split()
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
