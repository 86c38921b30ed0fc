"""grouped_ffn called directly: each kernel path equals a per-row FFN in output and in the gradients of
x, W1, b1, W2, b2 (custom backwards included), for every activation and uneven / empty groups."""

import pytest
import torch

from hf_moe_mt import moe_kernels
from hf_moe_mt.moe_kernels import ACTIVATIONS, grouped_ffn

from .conftest import _force_path
from .reference import ACTIVATION_FUNCTIONS, assert_close_rel

D, F_DIM = 8, 12  # multiples of 4 floats: torch._grouped_mm needs 16-byte aligned rows
GROUPINGS = {"uneven_with_empty": [3, 0, 5, 2], "uniform": [4, 4, 4, 4], "one_hot_expert": [0, 11, 0, 1]}


def _operands(counts, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_experts, rows = len(counts), sum(counts)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * 0.7).requires_grad_(True)

    return rand(rows, D), torch.tensor(counts), rand(num_experts, F_DIM, D), rand(num_experts, F_DIM), \
        rand(num_experts, D, F_DIM), rand(num_experts, D)


def _per_row_reference(x, counts, w1, b1, w2, b2, activation):
    """Row r of expert e: W2_e act(W1_e x_r + b1_e) + b2_e, one row at a time."""
    act, rows, row = ACTIVATION_FUNCTIONS[activation], [], 0
    for e, count in enumerate(counts.tolist()):
        for _ in range(count):
            rows.append(w2[e] @ act(w1[e] @ x[row] + b1[e]) + b2[e])
            row += 1
    return torch.stack(rows)


def _grads(fn, operands, grad_out):
    x, counts, w1, b1, w2, b2 = [t.detach().clone().requires_grad_(t.requires_grad) for t in operands]
    out = fn(x, counts, w1, b1, w2, b2)
    out.backward(grad_out)
    return out, [x.grad, w1.grad, b1.grad, w2.grad, b2.grad]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_grouped_ffn_matches_per_row_reference(grouping, activation, kernel_path):
    operands = _operands(GROUPINGS[grouping])
    grad_out = torch.randn(operands[0].shape)
    out, grads = _grads(lambda *a: grouped_ffn(*a, activation), operands, grad_out)
    ref_out, ref_grads = _grads(lambda *a: _per_row_reference(*a, activation), operands, grad_out)
    assert_close_rel(out, ref_out, name="output")
    for name, grad, ref_grad in zip(["x", "w1", "b1", "w2", "b2"], grads, ref_grads):
        assert_close_rel(grad, ref_grad, name=f"grad {name}")
    kernel_path.assert_only(kernel_path.name)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "silu"])
def test_grouped_ffn_custom_backward_passes_gradcheck(activation, float64_kernel_path):
    """Finite differences in float64 (relu is left out: its kink makes finite differences unreliable)."""
    operands = _operands([2, 0, 3], dtype=torch.float64)
    x, counts, w1, b1, w2, b2 = operands
    assert torch.autograd.gradcheck(
        lambda x, w1, b1, w2, b2: grouped_ffn(x, counts, w1, b1, w2, b2, activation), (x, w1, b1, w2, b2)
    )
    float64_kernel_path.assert_only(float64_kernel_path.name)


def test_grouped_ffn_no_rows_gives_zero_gradients_for_every_parameter():
    x, counts, w1, b1, w2, b2 = _operands([0, 0, 0])
    out = grouped_ffn(x, counts, w1, b1, w2, b2, "relu")
    assert out.shape == (0, D)
    out.sum().backward()
    for name, p in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)]:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_grouped_ffn_weight_grads_of_idle_experts_are_zero(kernel_path):
    x, counts, w1, b1, w2, b2 = _operands([0, 5, 0, 3])
    grouped_ffn(x, counts, w1, b1, w2, b2, "gelu").square().sum().backward()
    for p in (w1, b1, w2, b2):
        assert torch.count_nonzero(p.grad[[0, 2]]) == 0
        assert torch.count_nonzero(p.grad[[1, 3]]) > 0


@pytest.mark.parametrize("counts,path", [([4, 4, 4, 4], "bmm"), ([5, 5, 5, 4], "bmm"), ([5, 4, 4, 4], "bmm"),
                                         ([13, 1, 1, 1], "loop"), ([8, 0, 8, 0], "loop")])
def test_auto_runs_the_kernel_its_cost_rule_picks(counts, path, path_spy):
    operands = _operands(counts)
    grouped_ffn(*operands, "relu").sum().backward()
    path_spy.assert_only(path)


@pytest.mark.parametrize("implementation", ["bmm", "loop", "grouped_mm"])
def test_an_explicit_kernel_runs_whatever_the_cost_rule_would_pick(implementation, path_spy):
    grouped_ffn(*_operands([13, 1, 1, 1]), "relu", implementation).sum().backward()
    grouped_ffn(*_operands([4, 4, 4, 4]), "relu", implementation).sum().backward()
    path_spy.assert_only(implementation)


def test_an_unknown_kernel_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"'fast' is not one of \('auto', 'grouped_mm', 'loop', 'bmm'\)"):
        grouped_ffn(*_operands([4, 4]), "relu", "fast")


@pytest.mark.parametrize("counts,padded", [
    ([32] * 128, True), ([40] * 100 + [20] * 28, True),  # 32 rows/expert: waste 1.16 within 1.26
    ([50] + [32] * 127, False),  # waste 1.56
    ([512] * 8, True), ([584, 537, 524, 518, 536, 482, 466, 449], False),  # 512 rows/expert: waste 1.14 > 1.06
    ([4] * 16, True), ([5, 4, 4, 4], True), ([13, 1, 1, 1], False),
])
def test_padded_bmm_is_chosen_only_within_the_waste_budget_for_its_group_size(counts, padded):
    """Padding waste E·max/R is bought only while bmm's per-row advantage over the loop covers it."""
    assert moe_kernels.prefers_padded_bmm(counts, sum(counts)) == padded
    assert moe_kernels.padded_bmm_waste_budget(32) == pytest.approx(1.26)
    assert moe_kernels.padded_bmm_waste_budget(512) == pytest.approx(1.06)
    assert moe_kernels.padded_bmm_waste_budget(4096) == 1.0


@pytest.mark.parametrize("path", ["loop", "threads_torch", "threads_onednn"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_grouped_ffn_without_autograd_matches_per_row_reference(grouping, activation, path, monkeypatch):
    """Translation runs without autograd: the loop's fused per-expert inference pass, not the training kernels;
    on torch's GEMMs, or on the backend's worker threads with torch's or oneDNN's (activation fused) GEMMs."""
    spy = _force_path(monkeypatch, path)
    calls, real = [], moe_kernels._inference_ffn
    monkeypatch.setattr(moe_kernels, "_inference_ffn", lambda *args: calls.append(1) or real(*args))
    operands = _operands(GROUPINGS[grouping])
    with torch.no_grad():
        out = grouped_ffn(*operands, activation)
        ref = _per_row_reference(*operands, activation)
    assert calls == [1]
    busy_experts = sum(count > 0 for count in GROUPINGS[grouping])
    assert spy.onednn == (2 * busy_experts if path == "threads_onednn" else 0)
    assert_close_rel(out, ref, name="output")
