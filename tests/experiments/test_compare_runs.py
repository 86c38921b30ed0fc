"""scripts/experiments/compare_runs.py on two tiny `hf-moe-mt train` runs (one with a time budget): dev-loss
curves from the checkpoints, training minutes where the budget recorded them, test scores of a chosen step
(exported and scored once, then read from the cache), results.json + PNG."""

import json
import os
import subprocess
import sys

from tests.training.conftest import REPO, check_ok, run_cli, train_argv

SCRIPT = os.path.join(REPO, "scripts", "experiments", "compare_runs.py")
STEPS = ["training.max_steps=4", "training.save_steps=2", "training.eval_steps=2", "training.eval_strategy=steps",
         "training.save_total_limit=null", "evaluation.bleu_steps=0", "evaluation.plots=false",
         "training.report_to=none", "data.eval_examples=8"]


def _compare(tmp_path, *extra):
    argv = [sys.executable, SCRIPT, "--name", "pair", "--results-dir", str(tmp_path / "results"), "--test-steps", "4",
            "--test-sentences", "1", "--run", f"MoE={tmp_path / 'moe'}", "--run", f"dense={tmp_path / 'dense'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def test_two_runs_compared_at_equal_steps_with_cached_test_scores(fixture_data, tmp_path):
    check_ok(run_cli(train_argv(fixture_data, tmp_path / "moe", *STEPS) + ["--time-budget", "10"]))
    check_ok(run_cli(train_argv(fixture_data, tmp_path / "dense", *STEPS, "model.config.encoder_sparse_step=0",
                                "model.config.decoder_sparse_step=0")))
    first = _compare(tmp_path, "--corpus", fixture_data["corpus"])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    report = json.loads((tmp_path / "results" / "pair" / "results.json").read_text())
    moe, dense = report["runs"]
    assert (moe["label"], dense["label"]) == ("MoE", "dense") and moe["seed"] == dense["seed"] == 0
    for run in (moe, dense):
        assert [point["step"] for point in run["curve"]] == [2, 4]
        assert [scores["step"] for scores in run["scores"]] == [4] and run["scores"][0]["averages"]
    assert 0 < moe["curve"][0]["wall"] < moe["curve"][1]["wall"]  # the time budget's record, per checkpoint
    assert all("wall" not in point for point in dense["curve"])  # no budget, no time axis
    assert moe["curve"][-1]["dev_loss"] != dense["curve"][-1]["dev_loss"]
    assert (tmp_path / "results" / "pair" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "MoE step 4:" in first.stdout and "dense step 4:" in first.stdout
    cached = tmp_path / "moe" / "compare" / "step-4" / "test_scores_1.json"
    written = cached.stat().st_mtime_ns
    second = _compare(tmp_path, "--corpus", fixture_data["corpus"])
    assert second.returncode == 0 and cached.stat().st_mtime_ns == written  # scored once
    assert json.loads((tmp_path / "results" / "pair" / "results.json").read_text()) == report


def test_a_step_without_checkpoint_or_a_bad_run_is_refused_in_one_line(fixture_data, tmp_path):
    check_ok(run_cli(train_argv(fixture_data, tmp_path / "moe", *STEPS)))
    (tmp_path / "dense").mkdir()
    result = _compare(tmp_path, "--corpus", fixture_data["corpus"])
    assert result.returncode != 0 and "no checkpoint-N with a trainer_state.json in" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    argv = [sys.executable, SCRIPT, "--name", "one", "--results-dir", str(tmp_path / "results"), "--test-steps", "3",
            "--run", f"MoE={tmp_path / 'moe'}", "--corpus", fixture_data["corpus"]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0 and "has no checkpoint-3; pick --test-steps among 2, 4" in result.stderr
