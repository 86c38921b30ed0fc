"""backends/cpu_experts: the CPU backend's experts kernel follows its fixed rule (the loop on the worker threads or
the calling thread as the kernel says, a padded bmm for near-uniform groups only where the probe measured it
faster, the inference pass without autograd), sizes oneDNN's backward GEMMs by the right FLOPs, and pads expert
rows to few shapes where GEMM kernels are compiled per shape. Its numerics
are covered by every tests/moe test through the `kernel_path` fixture (threads_torch, threads_onednn)."""

import pytest
import torch

from hf_moe_mt import moe_kernels
from hf_moe_mt.backends import cpu_experts, cpu_gemm
from hf_moe_mt.moe_kernels import grouped_ffn

from ..dispatch_spy import GemmSpy
from ..moe.reference import assert_close_rel

D, F_DIM = 8, 12


def _operands(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts, rows = len(counts), sum(counts)
    tensors = [torch.randn(rows, D, generator=gen), torch.randn(experts, F_DIM, D, generator=gen),
               torch.randn(experts, F_DIM, generator=gen), torch.randn(experts, D, F_DIM, generator=gen),
               torch.randn(experts, D, generator=gen)]
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in tensors)
    return x, torch.tensor(counts), w1, b1, w2, b2


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("bmm,counts,expected", [
    (True, [4, 4, 4, 4], "bmm"), (True, [13, 1, 1, 1], "threads_loop"),
    (False, [4, 4, 4, 4], "threads_loop"), (False, [13, 1, 1, 1], "threads_loop"),
])
def test_training_runs_the_kernel_of_the_rule(gemm, bmm, counts, expected, path_spy):
    kernel = cpu_experts.KERNELS[gemm, bmm, False, True]
    assert kernel.__name__ == f"cpu_threads_{gemm}" + ("_bmm" if bmm else "")
    grouped_ffn(*_operands(counts), "relu", kernel).sum().backward()
    path_spy.assert_only("bmm" if expected == "bmm" else f"threads_{gemm}" if gemm == "onednn" else "threads_torch")


def test_without_autograd_every_kernel_runs_the_loops_inference_pass(path_spy, monkeypatch):
    calls, real = [], moe_kernels._inference_ffn
    monkeypatch.setattr(moe_kernels, "_inference_ffn", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        grouped_ffn(*_operands([4, 4, 4, 4]), "relu", cpu_experts.KERNELS["torch", True, False, True])
    assert calls == [1] and path_spy.padded == 0 and path_spy.threads == 1


@pytest.fixture
def path_spy(monkeypatch):
    from ..moe.conftest import PathSpy

    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
    return PathSpy(monkeypatch)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")
def test_expert_backward_sizes_its_gemms_by_rows_times_in_times_out(monkeypatch):
    """W [O=16, I=64], 4 rows: each backward GEMM is 2·4·16·64 = 8192 FLOPs (not 2·4·16·16 = 2048)."""
    calls, real = [], cpu_experts.onednn_linear
    monkeypatch.setattr(cpu_experts, "onednn_linear", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 4096)
    gen = torch.Generator().manual_seed(0)
    weight, grad_out, inputs = torch.randn(16, 64, generator=gen), torch.randn(4, 16), torch.randn(4, 64)
    grad_in, grad_weight = torch.empty(4, 64), torch.empty(16, 64)
    cpu_experts.OneDNNGemms().grads_into(grad_out, inputs, weight, grad_in, grad_weight)
    assert calls == [1]  # dx on oneDNN (dW goes through onednn_weight_grad)
    torch.testing.assert_close(grad_in, grad_out @ weight)
    torch.testing.assert_close(grad_weight, grad_out.t() @ inputs)


def test_off_the_cpu_the_kernel_is_the_models_auto(monkeypatch):
    """Nothing in the backend is for GPUs: a non-CPU input goes to the model's own "auto" kernel."""
    seen = []
    monkeypatch.setattr(moe_kernels, "auto_kernel", lambda x, *args: seen.append(x.device.type) or x)
    x = torch.randn(4, D, device="meta")
    out = cpu_experts.KERNELS["onednn", False, False, True](x, torch.tensor([4]), *_operands([4])[2:], "relu")
    assert seen == ["meta"] and out is x


def test_results_equal_the_standard_loop_on_uneven_groups():
    operands = _operands([5, 0, 9, 3])
    grad = torch.randn(17, D)
    results = []
    kernels = [cpu_experts.KERNELS[key] for key in (("torch", True, False, True), ("onednn", False, False, True),
                                                    ("torch", False, False, False), ("onednn", False, False, False))]
    for kernel in ("loop", *kernels):
        copies = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in operands]
        out = grouped_ffn(*copies, "gelu", kernel)
        out.backward(grad)
        results.append([out] + [copies[i].grad for i in (0, 2, 3, 4, 5)])
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            assert_close_rel(got, expected, rtol=1e-5)


@pytest.mark.parametrize("workers", [True, False])
def test_the_loop_uses_worker_threads_only_when_its_kernel_says_so(workers, monkeypatch):
    """Both passes (forward with autograd, backward, and inference) run each expert's GEMMs on worker threads
    with `workers`, and on the calling thread, one expert after another, without."""
    import threading

    kernel = cpu_experts.KERNELS["torch", False, False, workers]
    seen, gemms = set(), kernel.gemms
    for method in ("linear_into", "ffn_into", "grads_into"):
        real = getattr(gemms, method)
        monkeypatch.setattr(gemms, method, lambda *a, real=real: seen.add(threading.get_ident()) or real(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grouped_ffn(*_operands([4, 3, 5, 4]), "relu", kernel).sum().backward()
        with torch.no_grad():
            grouped_ffn(*_operands([4, 3, 5, 4]), "relu", kernel)
    finally:
        torch.set_num_threads(threads)
    assert seen and (threading.get_ident() in seen) != workers


def _run_with_grads(kernel, counts, grad_seed=1):
    operands = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in _operands(counts)]
    out = grouped_ffn(*operands, "gelu", kernel)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)))
    return [out] + [operands[i].grad for i in (0, 2, 3, 4, 5)]


@pytest.mark.parametrize("bmm,counts", [(False, [70, 65, 100, 3]), (True, [66, 70, 68, 69])])
def test_where_kernels_compile_per_shape_expert_rows_are_padded_to_buckets_with_the_same_results(
        bmm, counts, monkeypatch):
    """With per-shape kernels (bf16 on a CPU with native bf16; forced here so that fp32 can check the numbers)
    the loop's GEMMs see bucketed row counts (65, 70 → 72; 100 → 104; 3 stays) and the padded bmm a bucketed
    group size, forward and backward; outputs and every gradient equal the exact-row kernel's."""
    kernel = cpu_experts.KERNELS["torch", bmm, False, False]  # the calling thread, where the spy sees GEMMs
    expected = _run_with_grads("loop", counts)
    monkeypatch.setattr(cpu_experts, "compiles_per_shape", lambda x: True)
    with GemmSpy() as spy:
        results = _run_with_grads(kernel, counts)
    for got, want in zip(results, expected):
        assert_close_rel(got, want, rtol=1e-5)
    rows = {shape[-2] for shape in spy.shapes if shape[-1] in (D, F_DIM) and shape[-2] not in (D, F_DIM)}
    assert rows == ({72} if bmm else {72, 104, 3})


def test_only_bf16_on_a_cpu_with_native_bf16_compiles_per_shape():
    assert not cpu_experts.compiles_per_shape(torch.zeros(4, 4))
    assert cpu_experts.compiles_per_shape(torch.zeros(4, 4, dtype=torch.bfloat16)) == cpu_gemm._bf16_supported


def test_a_padded_group_below_the_largest_is_refused():
    with pytest.raises(ValueError, match="rows_per_expert=3 is below the largest group"):
        moe_kernels.bmm_kernel(*_operands([4, 2]), "relu", rows_per_expert=3)
