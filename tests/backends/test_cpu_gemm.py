"""backends/cpu_gemm: GEMMs on oneDNN equal torch's F.linear in output and in all three gradients, fall back to
exactly F.linear wherever oneDNN must not or should not run, and reach an nn.Linear without changing its type."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import copy

from hf_moe_mt.backends import cpu_gemm
from hf_moe_mt.moe_kernels import ACTIVATIONS, activation_forward

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    calls, real = [], torch.ops.mkldnn._linear_pointwise

    class Spy:  # stands in for the torch.ops.mkldnn namespace, counting _linear_pointwise calls
        def __getattr__(self, name):
            return (lambda *args: calls.append(args[0].shape) or real(*args)) if name == "_linear_pointwise" else \
                getattr(torch.ops.mkldnn, name)

    monkeypatch.setattr(cpu_gemm.torch.ops, "mkldnn", Spy(), raising=False)
    return calls


def _operands(rows=64, d_in=512, d_out=256, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(d_out, generator=gen).to(dtype).requires_grad_(requires_grad)
    return x, w, b


def test_linear_runs_on_onednn_without_grad_and_matches_f_linear():
    x, w, b = _operands()
    assert cpu_gemm.takes_onednn(x, w, b)
    with torch.no_grad():
        out = cpu_gemm.linear(x, w, b)
        expected = F.linear(x, w, b)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_activation_matches_activation_after_f_linear(activation):
    assert set(cpu_gemm.FUSED_ACTIVATIONS) == set(ACTIVATIONS)
    x, w, b = _operands()
    with torch.no_grad():
        out = cpu_gemm.onednn_linear(x, w, b, activation)
        expected = activation_forward(activation, F.linear(x, w, b))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_any_leading_shape_and_non_contiguous_input():
    x, w, b = _operands(rows=96)
    x3 = x.view(4, 24, 512).transpose(0, 1)  # [24, 4, 512], not contiguous
    with torch.inference_mode():
        out = cpu_gemm.linear(x3, w, b)
    assert out.shape == (24, 4, 256)
    torch.testing.assert_close(out, F.linear(x3, w, b), rtol=1e-5, atol=1e-5)


def test_bf16_runs_and_stays_bf16():
    x, w, b = _operands(dtype=torch.bfloat16)
    with torch.no_grad():
        out = cpu_gemm.linear(x, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["small", "float64", "autocast"])
def test_falls_back_to_f_linear_exactly(case, onednn_calls):
    x, w, b = _operands(rows=2 if case == "small" else 64, dtype=torch.float64 if case == "float64" else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert not cpu_gemm.takes_onednn(x, w, b)
        out = cpu_gemm.linear(x, w, b)
        expected = F.linear(x, w, b)
    assert onednn_calls == []
    assert out.dtype == (torch.bfloat16 if case == "autocast" else x.dtype)  # autocast keeps its say
    assert torch.equal(out, expected)


def test_mixed_dtypes_or_other_devices_are_not_taken():
    x, w, b = _operands()
    assert not cpu_gemm.takes_onednn(x, w, b.double())
    assert not cpu_gemm.takes_onednn(x.bfloat16(), w, b)
    assert not cpu_gemm.takes_onednn(x.to("meta"), w.to("meta"), b.to("meta"))


def test_bucketed_rows_pads_at_most_an_eighth_onto_few_shapes():
    assert [cpu_gemm.bucketed_rows(m) for m in (1, 17, 64)] == [1, 17, 64]  # decode sizes stay exact
    assert [cpu_gemm.bucketed_rows(m) for m in (65, 96, 97, 1000, 1025)] == [72, 96, 104, 1024, 1152]
    buckets = {cpu_gemm.bucketed_rows(m) for m in range(65, 4097)}
    assert all(m <= cpu_gemm.bucketed_rows(m) <= m * 1.125 for m in range(1, 5000))
    assert len(buckets) == 48  # 8 shapes per doubling of the row count, instead of 4032


@pytest.mark.parametrize("wanted", ["all", "weight_only", "input_only"])
@pytest.mark.parametrize("rows", [96, 97])  # 4·97 = 388 rows run padded to 416
def test_training_gradients_match_f_linear_and_run_on_onednn(wanted, rows, onednn_calls):
    """Forward, dx and dW are three oneDNN GEMMs; the results match F.linear's autograd to float rounding."""
    x, w, b = _operands(rows=4 * rows)
    x = x.view(4, rows, 512).requires_grad_(wanted in ("all", "input_only"))
    w.requires_grad_(wanted in ("all", "weight_only"))
    b.requires_grad_(wanted == "all")
    grad_out = torch.randn(4, rows, 256)
    inputs = [t for t in (x, w, b) if t.requires_grad]
    out = cpu_gemm.linear(x, w, b)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_out = F.linear(x, w, b)
    expected_grads = torch.autograd.grad(expected_out, inputs, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(grads, expected_grads):
        assert grad.shape == expected.shape
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=2e-4)
    gemms = 1 + (wanted in ("all", "input_only")) + (wanted in ("all", "weight_only"))
    assert len(onednn_calls) == gemms


def test_double_backward_is_refused_not_wrong():
    x, w, b = _operands()
    x.requires_grad_(True)
    w.requires_grad_(True)
    (grad_x,) = torch.autograd.grad(cpu_gemm.linear(x, w, b).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def test_frozen_weight_keeps_no_activation_for_the_backward():
    """Like F.linear: x is saved only when W needs a gradient (frozen-weight fine-tuning saves memory)."""
    x, w, b = _operands()
    out = cpu_gemm.linear(x.requires_grad_(True), w, b)
    saved_x, saved_w = out.grad_fn.saved_tensors
    assert saved_x is None and saved_w is w


def test_a_routed_nn_linear_keeps_its_type_and_state_and_trains_like_one(onednn_calls):
    torch.manual_seed(0)
    ours = nn.Linear(512, 256)
    reference = copy.deepcopy(ours)
    cpu_gemm.route_linear(ours, True)
    assert type(ours) is nn.Linear and list(ours.state_dict()) == ["weight", "bias"]
    assert cpu_gemm.routes_to_onednn(ours) and not cpu_gemm.routes_to_onednn(reference)
    x = torch.randn(64, 512)
    ours(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert len(onednn_calls) == 2  # forward and dW (x needs no gradient)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-4)


def test_a_deep_copy_of_a_routed_linear_computes_with_its_own_weights():
    """The forward is bound to its module: a copy (e.g. Trainer/PEFT deep copies) must not use the original's."""
    ours = nn.Linear(512, 256)
    cpu_gemm.route_linear(ours, True)
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.weight.mul_(2)
        x = torch.randn(64, 512)
        torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias), rtol=1e-5, atol=1e-4)
    assert cpu_gemm.routes_to_onednn(twin)


def test_routing_back_restores_the_plain_forward(onednn_calls):
    module = nn.Linear(512, 256)
    cpu_gemm.route_linear(module, True)
    cpu_gemm.route_linear(module, False)
    assert "forward" not in module.__dict__ and not cpu_gemm.routes_to_onednn(module)
    with torch.no_grad():
        module(torch.randn(64, 512))
    assert onednn_calls == []


def test_under_an_accelerate_hook_the_hooked_forward_is_routed(onednn_calls):
    """accelerate's device hooks replace `forward` and call `_old_forward`: routing must keep the hook."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    module = add_hook_to_module(nn.Linear(512, 256), Counting())
    cpu_gemm.route_linear(module, True)
    with torch.no_grad():
        module(torch.randn(64, 512))
    assert calls == [1] and len(onednn_calls) == 1
    cpu_gemm.route_linear(module, False)
    assert not cpu_gemm.routes_to_onednn(module)
