"""No tensor whose size grows with T·E·C: every tensor created during forward+backward (recorded at the
dispatcher, so autograd's backward ops are included) stays within c·T·K·max(D, F) or a parameter's size."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_moe_mt import moe_kernels
from hf_moe_mt.moe import SparseMoE


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (outputs include every fresh allocation)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), f"{func} {tuple(t.shape)}"
        return out


T, D, F_DIM, E = 512, 8, 16, 32


@pytest.mark.parametrize("path", ["auto", "loop"])
@pytest.mark.parametrize("regime", ["capacity", "dropless", "rts_overflow"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_no_intermediate_scales_with_tokens_times_experts_times_capacity(top_k, regime, path, path_spy, monkeypatch):
    """`auto` is the shipped path choice (padded bmm only when its padding waste is small); forcing the
    padded bmm on skewed groups is allowed to cost E·max_count rows, so it is not forced here."""
    if path == "loop":
        monkeypatch.setattr(moe_kernels, "prefers_padded_bmm", lambda counts, rows: False)
    kwargs = {"capacity": dict(capacity_factor=1.25, use_rts=False), "dropless": dict(drop_tokens=False),
              "rts_overflow": dict(capacity_factor=0.5, use_rts=True)}[regime]
    layer = SparseMoE(D, F_DIM, E, top_k=top_k, **kwargs)
    x = torch.randn(T, D, requires_grad=True)
    capacity = layer.capacity(T) or T
    bound = 2 * T * top_k * max(D, F_DIM) + max(p.numel() for p in layer.parameters())
    assert T * E * capacity > 3 * bound and T * E * D > bound  # a dispatch/combine tensor would be caught
    with LargestTensor() as probe:
        out, info = layer(x)
        (out.square().sum() + info.aux_loss + info.z_loss).backward()
    ran = "padded" if path_spy.padded else "loop"
    assert probe.numel <= bound, f"largest tensor {probe.numel} > {bound}: {probe.op} ({ran} path)"
    if path == "loop":
        path_spy.assert_only("loop")


def test_probe_detects_a_dense_dispatch_tensor():
    """The probe itself works: a GShard-style [T, E, C] one-hot would exceed the bound."""
    with LargestTensor() as probe:
        torch.zeros(T, E, 40)
    assert probe.numel == T * E * 40
