"""backends/huge_pages: the experts kernel's large fresh buffers fault in as 2 MiB pages in a process without
our memory settings, the backend's kernel allocates its weight gradients and activations that way on both of
its training paths, and the advice is skipped wherever it cannot help."""

import pathlib
import subprocess
import sys

import pytest
import torch

from hf_moe_mt import runtime
from hf_moe_mt.backends import cpu_experts, huge_pages
from hf_moe_mt.moe_kernels import grouped_ffn

THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")

FAULTS_SCRIPT = """
import resource, sys
import torch
from hf_moe_mt.backends import huge_pages

def faults_to_fill(buffer):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer.fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

like = torch.empty(0)
plain = faults_to_fill(torch.empty(16 * 1024 * 1024))  # 64 MiB: glibc maps it fresh
advised = huge_pages.new_buffer(like, 16 * 1024 * 1024)
print(huge_pages.wanted(), plain, faults_to_fill(advised))
"""


def _thp_available() -> bool:
    return THP_MODE.exists() and "[never]" not in THP_MODE.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _thp_available(),
                    reason="needs Linux with transparent huge pages not disabled")
def test_a_large_fresh_buffer_faults_in_as_huge_pages_in_a_plain_process():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1",
           "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout.split()
    wanted, plain, advised = out[0], int(out[1]), int(out[2])
    assert wanted == "True"
    assert plain > 10_000  # 64 MiB in 4 KiB pages: 16,384 faults
    assert advised < plain / 4  # in 2 MiB pages: 32 (more where the kernel had no free huge page)


def test_advice_is_skipped_where_it_cannot_help(monkeypatch):
    monkeypatch.setattr(huge_pages, "wanted", lambda: True)
    large = huge_pages.ALWAYS_MAPPED_BYTES // 4
    assert not huge_pages.advise(torch.empty(large - 1))  # glibc serves it from its heap
    assert not huge_pages.advise(torch.empty(large, device="meta"))
    monkeypatch.undo()
    monkeypatch.setenv(runtime.THP_VARIABLE, "1")  # PyTorch allocates on huge pages itself
    assert not huge_pages.wanted()
    monkeypatch.setenv(runtime.THP_VARIABLE, "0")
    monkeypatch.setattr(runtime, "_keeping_freed_memory", True)  # glibc serves large blocks from its heap
    assert not huge_pages.wanted()
    monkeypatch.setattr(runtime, "_keeping_freed_memory", False)
    assert huge_pages.wanted() == sys.platform.startswith("linux")


@pytest.mark.parametrize("bmm", [False, True], ids=["loop", "padded_bmm"])
def test_the_backend_kernel_puts_weight_gradients_and_activations_on_advised_buffers(bmm, monkeypatch):
    """Experts whose stacked weights are 32 MiB (8 x 2048 x 512 fp32): both weight gradients and, at 4,096 rows,
    the [rows, ffn] activations reach glibc's always-mapped size."""
    advised = []
    monkeypatch.setattr(huge_pages, "wanted", lambda: True)
    monkeypatch.setattr(huge_pages, "_madvise", lambda start, length, advice: advised.append(length) or 0)
    gen = torch.Generator().manual_seed(0)
    experts, d, ffn, rows = 8, 512, 2048, 4096
    x = torch.randn(rows, d, generator=gen, requires_grad=True)
    w1 = (torch.randn(experts, ffn, d, generator=gen) * 0.02).requires_grad_()
    w2 = (torch.randn(experts, d, ffn, generator=gen) * 0.02).requires_grad_()
    b1, b2 = torch.zeros(experts, ffn, requires_grad=True), torch.zeros(experts, d, requires_grad=True)
    kernel = cpu_experts.KERNELS["torch", bmm, False, False]
    grouped_ffn(x, torch.full((experts,), rows // experts), w1, b1, w2, b2, "relu", kernel).sum().backward()
    weight_bytes = experts * d * ffn * 4
    # h and act(h) forward, act(h) again and dh backward, dW1 and dW2; each advised in whole 2 MiB pages
    assert len(advised) == 6 and all(weight_bytes - 2 * huge_pages.HUGE_PAGE_BYTES <= n <= weight_bytes
                                     for n in advised)
