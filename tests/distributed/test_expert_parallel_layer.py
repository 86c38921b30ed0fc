"""Expert-parallel SparseMoE on real processes equals one process holding every expert."""

import pytest

from .launch import torchrun

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("top_k", [1, 2])
def test_ep2_layer_matches_single_process_outputs_and_gradients(top_k):
    assert f"OK ep=2 world=2 top_k={top_k}" in torchrun("ep_layer.py", "2", str(top_k))


def test_ep2_by_edp2_on_four_processes_matches_single_process():
    assert "OK ep=2 world=4 top_k=2" in torchrun("ep_layer.py", "2", "2", nproc=4)
