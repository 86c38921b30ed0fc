"""scripts/bench_training.py --quick runs both launches and its all-to-all accounting holds exactly."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.distributed


def test_bench_training_quick_reports_both_runs_and_exact_all_to_all_volume(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_training.py"), "--quick",
                             "--json", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=240,
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    for run in ("ep1", "ep2"):
        assert report[run]["steps_measured"] == 5 and report[run]["median_step_s"] > 0
        assert report[run]["tokens_per_step"] > 100
    assert report["ep1"]["tokens_per_step"] == report["ep2"]["tokens_per_step"]  # the same batches
    volume = report["all_to_all"]
    assert volume["forward_equals_2Tkd_bytes_every_call"] and volume["backward_equals_forward"]
    layers = volume["per_layer_per_step"]
    assert sorted(layers) == ["model.decoder.layers.1.mlp", "model.encoder.layers.1.mlp"]
    for entry in layers.values():
        assert entry["sent_bytes"] == entry["expected_bytes"] > 0 and 0 < entry["off_rank_bytes"] < entry["sent_bytes"]
    assert "step time EP=2 / EP=1" in result.stdout
