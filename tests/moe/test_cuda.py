"""The CUDA path (torch._grouped_mm, custom backward, no host sync) against the CPU layer.

Skipped without a GPU (CI has none); run on a CUDA machine with `pytest tests/moe/test_cuda.py`.
"""

import pytest
import torch

from hf_moe_mt.moe import SparseMoE
from hf_moe_mt.moe_kernels import grouped_ffn

from ..dispatch_spy import GemmSpy
from .reference import assert_close_rel, clone_layer, parameter_grads, randomize_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D, F_DIM = 16, 32  # 16-byte aligned rows in bf16 and fp32: the grouped_mm kernels' requirement


def _operands(counts, d=D, f=F_DIM, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_experts, rows = len(counts), sum(counts)
    return [torch.randn(rows, d, generator=gen), torch.tensor(counts), torch.randn(num_experts, f, d, generator=gen) * 0.3,
            torch.randn(num_experts, f, generator=gen) * 0.3, torch.randn(num_experts, d, f, generator=gen) * 0.3,
            torch.randn(num_experts, d, generator=gen) * 0.3]


def _forward_backward(operands, grad_out, device, dtype):
    moved = [t.to(device, dtype if t.is_floating_point() else t.dtype, copy=True) for t in operands]
    moved = [t.requires_grad_(t.is_floating_point()) for t in moved]
    out = grouped_ffn(*moved, "gelu")
    out.backward(grad_out.to(device, out.dtype))
    return out, [moved[i].grad for i in (0, 2, 3, 4, 5)]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_grouped_mm_path_matches_cpu_in_output_and_every_gradient(dtype, rtol, path_spy):
    counts = [16, 0, 37, 48, 3]
    operands = _operands(counts)
    grad_out = torch.randn(sum(counts), D)
    ref_out, ref_grads = _forward_backward(operands, grad_out, "cpu", torch.float32)
    out, grads = _forward_backward(operands, grad_out, "cuda", dtype)
    assert path_spy.grouped_mm == 1 and out.dtype == dtype  # the CPU reference ran another path
    assert_close_rel(out.cpu(), ref_out, rtol=rtol, name="output")
    for name, grad, ref_grad in zip(["x", "w1", "b1", "w2", "b2"], grads, ref_grads):
        assert grad.dtype == dtype
        assert_close_rel(grad.cpu(), ref_grad, rtol=rtol, name=f"grad {name}")


def test_grouped_mm_under_cuda_autocast_runs_bf16_and_sends_fp32_gradients(path_spy):
    """fp32 operands (LayerNorm's output, fp32 weights) under autocast: torch._grouped_mm is not an autocast op,
    so grouped_ffn casts; all six GEMMs must run in bf16 and the fp32 leaves still get fp32 gradients."""
    counts = [16, 0, 37, 48, 3]
    operands = _operands(counts)
    grad_out = torch.randn(sum(counts), D)
    ref_out, ref_grads = _forward_backward(operands, grad_out, "cpu", torch.float32)
    spy = GemmSpy()
    with torch.autocast("cuda", dtype=torch.bfloat16), spy:
        out, grads = _forward_backward(operands, grad_out, "cuda", torch.float32)
    assert path_spy.grouped_mm == 1 and out.dtype == torch.bfloat16
    assert len(spy.calls) >= 6 and spy.dtypes() == {torch.bfloat16}, spy.calls
    assert_close_rel(out.float().cpu(), ref_out, rtol=3e-2, name="output")
    for name, grad, ref_grad in zip(["x", "w1", "b1", "w2", "b2"], grads, ref_grads):
        assert grad.dtype == torch.float32, name
        assert_close_rel(grad.cpu(), ref_grad, rtol=3e-2, name=f"grad {name}")


def test_unaligned_sizes_fall_back_to_the_loop_on_cuda(path_spy):
    counts = [5, 0, 7]
    operands = _operands(counts, d=6, f=10)
    grad_out = torch.randn(sum(counts), 6)
    ref_out, ref_grads = _forward_backward(operands, grad_out, "cpu", torch.float32)
    out, grads = _forward_backward(operands, grad_out, "cuda", torch.bfloat16)
    assert path_spy.grouped_mm == 0
    assert_close_rel(out.cpu(), ref_out, rtol=3e-2, name="output")
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close_rel(grad.cpu(), ref_grad, rtol=3e-2, name="grad")


def test_idle_experts_get_exactly_zero_weight_gradients_even_from_dirty_memory():
    """The grouped GEMMs must write zeros for empty groups, not leave what the allocator handed out."""
    for _ in range(3):  # leave NaN-filled blocks in the caching allocator for the next allocations
        torch.full((1 << 22,), float("nan"), device="cuda")
    counts = [0, 24, 0, 8, 0]
    _, grads = _forward_backward(_operands(counts), torch.randn(sum(counts), D), "cuda", torch.bfloat16)
    for grad in grads[1:]:
        assert torch.isfinite(grad).all()
        assert torch.count_nonzero(grad[[0, 2, 4]]) == 0
        assert torch.count_nonzero(grad[[1, 3]]) > 0


def _layer_step(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out, info = layer(x)
    (out * grad_out).sum().backward()
    return out, info, x.grad


@pytest.mark.parametrize("regime", ["drops_by_position", "dropless"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_moe_on_cuda_equals_the_cpu_layer(top_k, regime):
    kwargs = dict(capacity_factor=0.75, use_rts=False) if regime == "drops_by_position" else dict(drop_tokens=False)
    torch.manual_seed(0)
    cpu_layer = randomize_(SparseMoE(D, F_DIM, 8, top_k=top_k, activation="gelu", **kwargs))
    cuda_layer = clone_layer(cpu_layer).cuda()
    x, grad_out = torch.randn(2, 96, D), torch.randn(2, 96, D)
    out, info, x_grad = _layer_step(cpu_layer, x, grad_out)
    cuda_out, cuda_info, cuda_x_grad = _layer_step(cuda_layer, x.cuda(), grad_out.cuda())
    assert cuda_info.tokens_per_expert.tolist() == info.tokens_per_expert.tolist()
    assert (float(info.dropped_fraction) > 0) == (regime == "drops_by_position")
    assert_close_rel(cuda_out.cpu(), out, rtol=1e-4, name="output")
    assert_close_rel(cuda_x_grad.cpu(), x_grad, rtol=1e-4, name="grad x")
    cpu_grads = parameter_grads(cpu_layer)
    for name, grad in parameter_grads(cuda_layer).items():
        assert_close_rel(grad.cpu(), cpu_grads[name], rtol=1e-4, name=f"grad {name}")


def _bf16_rts_step(seed: int, top_k: int):
    torch.manual_seed(seed)
    layer = SparseMoE(64, 128, 16, top_k=top_k, capacity_factor=0.5, use_rts=True, jitter_noise=0.1).cuda().bfloat16()
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, info = layer(x)
    (out.float().square().sum() + info.aux_loss + info.z_loss).backward()
    return [out, x.grad, info.tokens_per_expert] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("top_k", [1, 2])
def test_fixed_seed_reproduces_a_bf16_rts_step_bitwise_on_cuda(top_k):
    first, second, other = _bf16_rts_step(5, top_k), _bf16_rts_step(5, top_k), _bf16_rts_step(6, top_k)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_forward_and_backward_never_wait_for_the_gpu(top_k):
    """No host sync: the CPU keeps queueing kernels (torch raises on any synchronizing call)."""
    layer = SparseMoE(64, 128, 16, top_k=top_k, drop_tokens=False).cuda().bfloat16()
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    layer(x)[0].backward(grad_out)  # warm-up: first calls may initialise cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, info = layer(x)
        (out.backward(grad_out), info.aux_loss + info.z_loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(info.tokens_per_expert.sum()) == 512 * top_k
