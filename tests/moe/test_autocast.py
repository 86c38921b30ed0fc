"""Mixed precision as users run it: under torch.autocast every experts kernel — the CPU backend's worker threads
included, where autocast is not active — runs its forward and backward GEMMs in bf16, while the weights keep
fp32 gradients and the router stays fp32. The GEMMs are observed at the dispatcher (tests/dispatch_spy.py)."""

import contextlib

import pytest
import torch

from hf_moe_mt.moe import SparseMoE
from hf_moe_mt.moe_kernels import grouped_ffn

from ..dispatch_spy import GemmSpy, on_worker_threads
from .reference import assert_close_rel

COUNTS, D, F_DIM = [5, 0, 9, 6], 16, 32


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _operands(seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts, rows = len(COUNTS), sum(COUNTS)
    tensors = [torch.randn(rows, D, generator=gen), torch.randn(experts, F_DIM, D, generator=gen) * 0.3,
               torch.randn(experts, F_DIM, generator=gen) * 0.3, torch.randn(experts, D, F_DIM, generator=gen) * 0.3,
               torch.randn(experts, D, generator=gen) * 0.3]
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in tensors)
    return x, torch.tensor(COUNTS), w1, b1, w2, b2


def _forward_backward(operands, grad_out):
    out = grouped_ffn(*operands, "gelu")
    out.backward(grad_out.to(out.dtype))
    return out, [operands[i].grad for i in (0, 2, 3, 4, 5)]


def test_every_kernel_runs_forward_and_backward_gemms_in_bf16_under_cpu_autocast(kernel_path, two_threads):
    grad_out = torch.randn(sum(COUNTS), D)
    ref_out, ref_grads = _forward_backward(_operands(), grad_out)
    threaded = kernel_path.name.startswith("threads")
    spy = GemmSpy()
    operands = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16), (on_worker_threads(spy) if threaded else spy):
        out, grads = _forward_backward(operands, grad_out)
    kernel_path.assert_only(kernel_path.name)
    assert out.dtype == torch.bfloat16
    gemms = [call for call in spy.calls if not threaded or call[3].startswith("hf_moe_mt_experts")]
    assert len(gemms) >= 6 and spy.dtypes(worker_threads_only=threaded) == {torch.bfloat16}, spy.calls
    if threaded:
        assert spy.on_workers() >= 6  # forward 2 and backward 4 per busy expert, on the workers
    for name, grad, ref in zip(["x", "w1", "b1", "w2", "b2"], grads, ref_grads):
        assert grad.dtype == torch.float32, name  # autocast's contract: fp32 leaves get fp32 gradients
        assert_close_rel(grad, ref, rtol=5e-2, name=f"grad {name}")
    assert_close_rel(out.float(), ref_out, rtol=5e-2, name="output")


def test_the_router_stays_fp32_and_the_experts_run_bf16_under_autocast():
    layer = SparseMoE(D, F_DIM, 4, top_k=2, drop_tokens=False)
    x = torch.randn(2, 12, D, requires_grad=True)
    spy = GemmSpy()
    with torch.autocast("cpu", dtype=torch.bfloat16), spy:
        out, info = layer(x)
        (out.float().square().sum() + info.aux_loss).backward()
    router = [dtypes for _, dtypes, columns, _ in spy.calls if columns == 4]  # [T, D] x [E, D]ᵀ -> E columns
    experts = [dtypes for _, dtypes, columns, _ in spy.calls if columns in (F_DIM, D)]
    assert router and all(set(dtypes) == {torch.float32} for dtypes in router)
    assert info.router_logits.dtype == torch.float32
    assert experts and all(set(dtypes) == {torch.bfloat16} for dtypes in experts)
    assert layer.experts.up_proj.grad.dtype == torch.float32 and layer.gate.weight.grad.dtype == torch.float32


def test_without_autocast_nothing_is_cast():
    spy = GemmSpy()
    with spy, contextlib.nullcontext():
        out, _ = _forward_backward(_operands(), torch.randn(sum(COUNTS), D))
    assert out.dtype == torch.float32 and spy.dtypes() == {torch.float32}
