"""scripts/experiments/model_tools.py on tiny models: every section runs through the project's own training,
prune, merge, upcycle and evaluate code, writes its JSON and PNG, and a rerun resumes instead of recomputing."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.training.conftest import FAST, TINY_CONFIG

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "model_tools.py"
PNG = b"\x89PNG\r\n\x1a\n"


def load_script():
    spec = importlib.util.spec_from_file_location("model_tools", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def argv(exported_dir, run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("model_tools")
    return ["--corpus", str(run_dir / "corpus"), "--moe", str(exported_dir), "--output", str(root / "results"),
            "--work-dir", str(root / "work"), "--config", TINY_CONFIG, "--directions", "de-en,en-de",
            "--keep", "1.0,0.5,1", "--test-sentences", "2", "--dev-sentences", "3", "--num-beams", "1",
            "--max-new-tokens", "4", "--no-isolate", "--aoe-steps", "2", "--aoe-finetune-steps", "1",
            "--dense-steps", "2", "--upcycle-steps", "1", "--upcycle-experts", "2",
            *FAST, "training.eval_strategy=no", "evaluation.bleu_steps=0", "evaluation.plots=false",
            "training.report_to=none", "training.save_steps=100"]


@pytest.fixture(scope="module")
def results(argv):
    assert load_script().main(argv) == 0
    output = Path(argv[argv.index("--output") + 1])
    return output, {name: json.loads((output / f"{name}.json").read_text())["result"]
                    for name in ("pruning", "aoe", "upcycling")}


def test_pruning_table_has_every_keep_and_method(results):
    output, result = results
    rows = result["pruning"]
    assert [(r["keep"], r["method"], r["experts"]) for r in rows] == [
        ("100%", "all (no pruning)", 4), ("0.5", "utilization", 2), ("0.5", "random", 2), ("0.5", "per-language", 2),
        ("1", "utilization", 1), ("1", "random", 1), ("1", "per-language", 1)]
    assert rows[0]["parameters"] > rows[1]["parameters"] > rows[4]["parameters"]
    assert all(set(r["directions"]) == {"de-en", "en-de"} and r["sentences_per_second"] > 0 for r in rows)
    assert rows[3]["models"] == 2  # per-language: one model for en (de-en) and one for de (en-de)
    assert (output / "pruning.png").read_bytes()[:8] == PNG


def test_aoe_merges_two_models_trained_here_and_compares_with_scratch(results):
    output, result = results
    aoe = result["aoe"]
    assert aoe["merged_experts"] == 8 and aoe["steps"] == {"A": 2, "B": 2, "finetune": 1, "scratch": 5}
    assert len(aoe["dev_loss"]) == 5 and all(0 < loss < 20 for loss in aoe["dev_loss"].values())
    assert (output / "aoe.png").read_bytes()[:8] == PNG


def test_aoe_branch_resumes_a_from_its_checkpoint_and_counts_the_trunk_once(argv, tmp_path, monkeypatch):
    import hf_moe_mt.training.run

    module = load_script()
    resumes = {}
    real_run_training = hf_moe_mt.training.run.run_training

    def recording(config, resume=None, **kwargs):
        resumes[Path(config.output_dir).name] = resume
        return real_run_training(config, resume=resume, **kwargs)

    monkeypatch.setattr(hf_moe_mt.training.run, "run_training", recording)
    branch_argv = [*argv, "--sections", "aoe", "--aoe-steps", "3", "--aoe-branch-step", "2",
                   "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "results")]
    assert module.main(branch_argv) == 0
    aoe = json.loads((tmp_path / "results" / "aoe.json").read_text())["result"]
    trunk = tmp_path / "work" / "runs" / "aoe-a" / "checkpoint-2"
    assert resumes["aoe-b-branch2"] == str(trunk) and resumes["aoe-a"] is None
    assert aoe["branch_step"] == 2 and aoe["steps"] == {"A": 3, "B": 3, "finetune": 1, "scratch": 5}
    assert "B (A's step 2 + 1 steps, seed 1)" in aoe["dev_loss"] and aoe["merged_experts"] == 8
    with pytest.raises(SystemExit, match="--aoe-branch-step 3 trains A and B here"):
        module.main([*branch_argv, "--aoe-branch-step", "3"])


def test_upcycled_top2_model_starts_at_the_dense_models_dev_loss(results):
    output, result = results
    points = result["upcycling"]["points"]
    dense, upcycled = points["dense (step 0)"], points["upcycled (step 0)"]
    assert upcycled["dev_loss"] == pytest.approx(dense["dev_loss"], rel=1e-5)  # top-2, 2 experts: no token dropped
    assert upcycled["parameters"] > dense["parameters"]
    assert len(points) == 4 and (output / "upcycling.png").read_bytes()[:8] == PNG


def test_rerun_resumes_from_the_finished_steps(results, argv, monkeypatch):
    output, before = results
    module = load_script()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    import hf_moe_mt.tools.evaluate
    import hf_moe_mt.training.run

    monkeypatch.setattr(hf_moe_mt.training.run, "run_training", refuse)
    monkeypatch.setattr(hf_moe_mt.tools.evaluate, "evaluate_model", refuse)
    monkeypatch.setattr(hf_moe_mt.tools.evaluate, "teacher_forced_loss", refuse)
    assert module.main(argv) == 0
    after = {name: json.loads((output / f"{name}.json").read_text())["result"] for name in before}
    assert after == before


@pytest.mark.slow  # a fresh Python process with torch: ~10 s
def test_isolated_evaluation_reports_the_peak_memory_of_a_fresh_process(exported_dir, run_dir):
    module = load_script()
    args = module.parse_args(["--corpus", str(run_dir / "corpus"), "--directions", "de-en", "--test-sentences", "1",
                              "--num-beams", "1", "--max-new-tokens", "2"])
    result = module.evaluate(args, exported_dir, [("de", "en")])
    assert list(result["directions"]) == ["de-en"]
    assert 50 < result["peak_memory_mib"] < 4096  # a Python process with torch and a tiny model
