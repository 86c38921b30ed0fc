"""cpu_gemm: inference GEMMs on oneDNN equal torch's F.linear, and only run where no gradient is wanted."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_moe_mt import cpu_gemm
from hf_moe_mt.moe_kernels import ACTIVATIONS, activation_forward

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_enabled(), reason="torch built without oneDNN")


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


@pytest.mark.parametrize("case", ["grad_wanted", "small", "float64", "switched_off"])
def test_falls_back_to_f_linear_exactly(case, onednn_calls):
    x, w, b = _operands(rows=2 if case == "small" else 64, requires_grad=case == "grad_wanted",
                        dtype=torch.float64 if case == "float64" else torch.float32)
    with cpu_gemm.use_onednn(case != "switched_off"):
        assert not cpu_gemm.takes_onednn(x, w, b)
        out = cpu_gemm.linear(x, w, b)
    assert onednn_calls == []
    assert torch.equal(out, F.linear(x, w, b))
    if case == "switched_off":
        assert cpu_gemm.takes_onednn(x, w, b)  # the switch is restored on leaving the block


def test_mixed_dtypes_or_other_devices_are_not_taken():
    x, w, b = _operands()
    assert not cpu_gemm.takes_onednn(x, w, b.double())
    assert not cpu_gemm.takes_onednn(x.bfloat16(), w, b)
    assert not cpu_gemm.takes_onednn(x.to("meta"), w.to("meta"), b.to("meta"))


def test_linear_module_is_an_nn_linear_with_identical_training_gradients(onednn_calls):
    torch.manual_seed(0)
    ours = cpu_gemm.Linear(512, 256)
    reference = nn.Linear(512, 256)
    reference.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(64, 512)
    ours(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert onednn_calls == []  # training never goes to oneDNN (no autograd formula there)
    assert torch.equal(ours.weight.grad, reference.weight.grad) and torch.equal(ours.bias.grad, reference.bias.grad)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    assert onednn_calls == [(64, 512)]
