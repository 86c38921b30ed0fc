"""`hf-moe-mt train` end to end in one process on the fixture corpus: checkpoints, router metrics through the
Trainer's loggers (TensorBoard), dev loss and BLEU, the plots, and a final model holding every expert."""

import json
import os

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_moe_mt.cli import main
from hf_moe_mt.training.checkpoints import check_checkpoint_complete

from .conftest import TINY_CONFIG, log_history, train_argv, training_logs

STEPS = 40


@pytest.fixture(scope="module")
def finished_run(fixture_data, tmp_path_factory):
    """One 40-step run: checkpoints at 20 and 40, logs every 10, dev loss and BLEU at 20 and 40."""
    output_dir = tmp_path_factory.mktemp("train") / "run"
    argv = train_argv(fixture_data, output_dir, f"training.max_steps={STEPS}", "training.save_steps=20",
                      "training.eval_steps=20", "training.logging_steps=10", "evaluation.bleu_steps=20",
                      "evaluation.bleu_examples=8", "training.report_to=[tensorboard]")
    assert main(argv) == 0
    return output_dir


def test_checkpoints_are_complete_and_nothing_is_left_staged(finished_run):
    names = sorted(os.listdir(finished_run))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-20", "checkpoint-40"]
    assert not [n for n in names if n.startswith(".tmp-")], names
    for step in (20, 40):
        check_checkpoint_complete(str(finished_run / f"checkpoint-{step}"), world_size=1, ep_size=1, deepspeed=False)
    assert json.loads((finished_run / "checkpoint-40" / "trainer_state.json").read_text())["global_step"] == 40


def test_training_logs_carry_router_metrics_dev_loss_and_bleu(finished_run):
    history = log_history(finished_run / "checkpoint-40")
    logs = training_logs(finished_run / "checkpoint-40")
    assert sorted(logs) == [10, 20, 30, 40]
    for entry in logs.values():
        for layer in ("encoder.1", "decoder.1"):
            assert entry[f"router/{layer}/load_cv"] >= 0 and 1 <= entry[f"router/{layer}/max_load"] <= 4
            assert 0 <= entry[f"router/{layer}/dropped_fraction"] < 1
        assert entry["router/aux_loss"] > 0 and entry["router/z_loss"] > 0
    assert [e["step"] for e in history if "eval_loss" in e] == [20, 40]
    assert [e["step"] for e in history if "eval_bleu" in e] == [20, 40]
    assert all(0 <= e["eval_bleu"] <= 100 for e in history if "eval_bleu" in e)
    assert logs[40]["loss"] < logs[10]["loss"] - 0.5, logs  # it learns


def test_router_metrics_reach_tensorboard(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [finished_run / "runs" / name for name in os.listdir(finished_run / "runs")]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/router/aux_loss", "train/router/encoder.1/load_cv", "train/loss", "eval/loss", "eval/bleu"} <= tags
    logged = [event.value for event in events.Scalars("train/router/aux_loss")]
    expected = [entry["router/aux_loss"] for entry in training_logs(finished_run / "checkpoint-40").values()]
    assert logged == pytest.approx(expected, rel=1e-6)


def test_plots_are_pngs_of_the_run(finished_run):
    load = matplotlib.image.imread(str(finished_run / "expert_load.png"))
    curve = matplotlib.image.imread(str(finished_run / "loss_curve.png"))
    assert load.ndim == 3 and load.shape[0] > 50 and curve.ndim == 3 and curve.shape[1] > 200
    assert not [n for n in os.listdir(finished_run) if n.endswith(".tmp.png")]


def test_final_model_is_the_last_checkpoint_with_every_expert_and_its_tokenizer(finished_run):
    final = load_file(str(finished_run / "model" / "model.safetensors"))
    last = load_file(str(finished_run / "checkpoint-40" / "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert final["model.encoder.layers.1.mlp.experts.up_proj"].shape[0] == 4
    model = AutoModelForSeq2SeqLM.from_pretrained(str(finished_run / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(finished_run / "model"))
    torch.testing.assert_close(model.state_dict()["model.shared.weight"], final["model.shared.weight"])
    assert len(tokenizer) <= model.config.vocab_size
    summary = json.loads((finished_run / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["model_dir"] == str(finished_run / "model")


def test_training_starts_from_a_pretrained_model_and_its_tokenizer(finished_run, fixture_data, tmp_path):
    output_dir = tmp_path / "finetune"
    argv = ["train", "--config", TINY_CONFIG, f"data.corpus={fixture_data['corpus']}",
            f"model.pretrained={finished_run / 'model'}", "model.config={}", "model.config.dropout=0.0",
            f"training.output_dir={output_dir}",
            "training.max_steps=2", "training.logging_steps=1", "training.per_device_train_batch_size=4",
            "training.eval_strategy=no", "evaluation.bleu_steps=0", "evaluation.plots=false", "training.report_to=none"]
    assert main(argv) == 0
    first_step = training_logs(output_dir / "checkpoint-2")[1]["loss"]
    assert first_step < training_logs(finished_run / "checkpoint-40")[10]["loss"] - 0.5  # trained weights, not new ones
    model = AutoModelForSeq2SeqLM.from_pretrained(str(output_dir / "model"))
    assert model.config.dropout == 0.0 and model.config.d_model == 32
    tokenizer_file = (output_dir / "model" / "tokenizer.json").read_text()
    assert tokenizer_file == (finished_run / "model" / "tokenizer.json").read_text()


def test_export_of_the_run_reports_its_config_corpus_and_summary(finished_run, tmp_path):
    from huggingface_hub import ModelCard

    from hf_moe_mt.tools.export import export_model

    config = json.loads((finished_run / "train_config.json").read_text())
    assert config["training"]["max_steps"] == STEPS and config["model"]["config"]["num_experts"] == 4
    export_model(finished_run / "model", tmp_path / "export")
    card = ModelCard.load(tmp_path / "export" / "README.md", ignore_metadata_errors=False)
    assert f"max_steps: {STEPS}" in card.text and f"global_step {STEPS}" in card.text
    assert "| de-en |" in card.text  # the corpus's pair counts, from its build_info.json
    info = json.loads((tmp_path / "export" / "training_info.json").read_text())
    assert info["corpus"]["counts"]["train"] and info["train_summary"]["global_step"] == STEPS
