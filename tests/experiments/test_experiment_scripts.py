"""Every experiment script runs end to end for a few steps on the fixture corpus (the real runs take an hour
each): arms train through `hf-moe-mt train`'s code, get scored, and land in results.json + PNG; a rerun reads
finished arms back instead of training them again."""

import json
import os
import subprocess
import sys

import pytest

from tests.training.conftest import FAST, REPO, TINY_CONFIG

SCRIPTS = os.path.join(REPO, "scripts", "experiments")
EXPECTED_ARMS = {"moe_vs_dense": ["dense", "moe8", "moe16"], "rts_vs_position": ["rts", "position"],
                 "multitask": ["translation", "multitask"],
                 "topk_capacity": ["top1-cf1.0", "top1-cf1.25", "top1-dropless", "top2-cf1.0", "top2-cf1.25",
                                   "top2-dropless"]}


def _run(name, fixture_data, tmp_path):
    argv = [sys.executable, os.path.join(SCRIPTS, f"{name}.py"), "--config", TINY_CONFIG, "--steps", "2",
            "--eval-every", "1", "--test-sentences", "1", "--work-dir", str(tmp_path / "work"),
            "--results-dir", str(tmp_path / "results"), f"data.corpus={fixture_data['corpus']}",
            f"data.tokenizer={fixture_data['tokenizer']}", *FAST, "training.logging_steps=1",
            "evaluation.plots=false", "training.report_to=none", "data.eval_examples=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": REPO}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.parametrize("name", sorted(EXPECTED_ARMS))
def test_experiment_script_runs_every_arm_and_writes_results(name, fixture_data, tmp_path):
    result = _run(name, fixture_data, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "results" / name / "results.json").read_text())
    assert [run["arm"] for run in report["runs"]] == EXPECTED_ARMS[name]
    for run in report["runs"]:
        assert [point["step"] for point in run["curve"]] == [1, 2], run["arm"]
        assert run["curve"][-1]["cpu"] > 0 and run["scores"]["averages"], run["arm"]
    assert report["machine"]["cpu"] and (tmp_path / "results" / name / "curves.png").is_file()
    if name == "rts_vs_position":
        profiles = {run["arm"]: run["drops_by_position"] for run in report["runs"]}
        assert all(len(profile) == 10 for profile in profiles.values())
        assert (tmp_path / "results" / name / "drops_by_position.png").is_file()
    if name == "topk_capacity":  # the capacity's effect: dropless arms drop nothing, the others report a share
        dropped = {run["arm"]: run["dropped_fraction"] for run in report["runs"]}
        assert dropped["top1-dropless"] == dropped["top2-dropless"] == 0.0, dropped
        assert all(0.0 <= value < 1.0 for value in dropped.values()), dropped
    if name == "moe_vs_dense":
        assert set(report["steps_to_dense_final_loss"]) == {"moe8-seed0", "moe16-seed0"}
    # docs/RESULTS.md quotes scripts/experiments/tables.py: one row per arm, with its final dev loss
    tables = subprocess.run([sys.executable, os.path.join(SCRIPTS, "tables.py"), "--results", str(tmp_path / "results"),
                             "--only", name], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert tables.returncode == 0, tables.stderr[-2000:]
    summary, curves = [[line for line in block.splitlines() if line.startswith("| ")]
                       for block in tables.stdout.split("\n\n")[1:3]]
    assert summary[0].startswith("| arm") and len(summary) == len(EXPECTED_ARMS[name]) + 1
    assert all(f"{run['curve'][-1]['dev_loss']:.3f}" in row for run, row in zip(report["runs"], summary[1:]))
    # and the dev-loss curve of every arm, one column per evaluated step
    assert curves[0].split("|")[2:4] == [" 1 ", " 2 "] and len(curves) == len(EXPECTED_ARMS[name]) + 1
    for run, row in zip(report["runs"], curves[1:]):
        assert row.split("|")[2:4] == [f" {point['dev_loss']:.3f} " for point in run["curve"]], run["arm"]


def test_a_rerun_reads_finished_arms_back(fixture_data, tmp_path):
    first = _run("multitask", fixture_data, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "results" / "multitask" / "results.json").read_text()
    summaries = sorted((tmp_path / "work").glob("multitask/*/train_summary.json"))
    written = [path.stat().st_mtime_ns for path in summaries]
    second = _run("multitask", fixture_data, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(summaries) == 2 and [path.stat().st_mtime_ns for path in summaries] == written  # not retrained
    assert json.loads((tmp_path / "results" / "multitask" / "results.json").read_text()) == json.loads(before)
