"""Bad input to `hf-moe-mt train` / MoESeq2SeqTrainer: one-line errors at startup that name the fix."""

import importlib.util
import json
import re
import shutil

import pytest
from transformers import Seq2SeqTrainingArguments

from hf_moe_mt.cli import main
from hf_moe_mt.training.trainer import MoESeq2SeqTrainer
from tests.modeling.conftest import make_model

from .conftest import TINY_CONFIG, train_argv


def _error_line(capsys) -> str:
    """The command's error: exactly one line starting `hf-moe-mt train: error:` (library warnings aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-moe-mt train: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def checkpointed_run(fixture_data, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4 (for the resume errors)."""
    output_dir = tmp_path_factory.mktemp("errors") / "run"
    argv = train_argv(fixture_data, output_dir, "training.max_steps=4", "training.save_steps=2",
                      "training.eval_strategy=no", "evaluation.bleu_steps=0", "evaluation.plots=false",
                      "training.report_to=none")
    assert main(argv) == 0
    return output_dir


def test_label_smoothing_factor_is_refused_with_a_pointer_to_the_model_config(tmp_path):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1 makes the Trainer drop the labels and with "
                                         r"them the MoE aux and z losses.*config.label_smoothing=0.1") as error:
        MoESeq2SeqTrainer(model=make_model(), args=args)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.config.num_experts=6", "model.config.expert_parallel_size=4"],
     r"num_experts=6 is not divisible by expert_parallel_size=4; use an expert_parallel_size that divides"),
    (["model.config.expert_parallel_size=2"], r"expert_parallel_size=2 does not divide the 1 launched process"),
    (["training.label_smoothing_factor=0.1"], r"set label_smoothing_factor=0 and the model's config.label_smoothing"),
    (["training.max_stepz=3"], r"unknown key\(s\) max_stepz in config section 'training'"),
    (["optim.lr=1"], r"override 'optim.lr=1' is not SECTION.KEY=VALUE"),
    (["training.deepspeed=/nonexistent/ds.json"], r"DeepSpeed config /nonexistent/ds.json does not exist"),
    (["model.pretrained=/nonexistent/model"], r"model.pretrained=/nonexistent/model does not exist"),
])
def test_bad_configuration_fails_at_startup_with_one_line(overrides, message, fixture_data, tmp_path, capsys):
    assert main(train_argv(fixture_data, tmp_path / "run", *overrides)) == 2
    assert re.search(message, _error_line(capsys))
    assert not (tmp_path / "run").exists()  # nothing was built


def test_a_pretrained_model_keeps_its_sizes(checkpointed_run, fixture_data, tmp_path, capsys):
    argv = train_argv(fixture_data, tmp_path / "run", f"model.pretrained={checkpointed_run / 'model'}",
                      "model.config.d_model=64")
    assert main(argv) == 2
    assert "model.config.d_model=64 differs from the pretrained model's 32; sizes come from model.pretrained" in \
        _error_line(capsys)


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in _error_line(capsys)


def test_zero3_with_expert_parallelism_is_refused(fixture_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher would set; the check runs before any process group
    argv = train_argv(fixture_data, tmp_path / "run", "model.config.expert_parallel_size=2",
                      f"training.deepspeed={config}")
    assert main(argv) == 2
    assert "ZeRO stage 3 cannot shard expert-parallel experts" in _error_line(capsys)


def test_deepspeed_config_without_deepspeed_installed_is_refused(fixture_data, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "deepspeed" else find_spec(name, *rest))
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert main(train_argv(fixture_data, tmp_path / "run", f"training.deepspeed={config}")) == 2
    assert "deepspeed is not installed; pip install deepspeed" in _error_line(capsys)


def test_resume_without_any_checkpoint_is_refused(fixture_data, tmp_path, capsys):
    assert main(train_argv(fixture_data, tmp_path / "run", resume="last")) == 2
    assert "no complete checkpoint-N in" in _error_line(capsys)


def test_a_second_run_into_a_checkpointed_output_dir_needs_resume(checkpointed_run, fixture_data, capsys):
    assert main(train_argv(fixture_data, checkpointed_run)) == 2
    assert "already holds checkpoints; pass --resume" in _error_line(capsys)


@pytest.mark.parametrize("damage, message", [
    ("rng_state.pth", r"is incomplete for 1 process\(es\) \(missing rng_state.pth\)"),
    ("optimizer.pt", r"\(missing optimizer.pt\); resume with the launch it was saved by"),
    ("model.safetensors", r"\(missing model.safetensors\)"),
])
def test_resume_from_a_checkpoint_with_missing_shards_is_refused(checkpointed_run, fixture_data, tmp_path, capsys,
                                                                 damage, message):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed_run / "checkpoint-2", checkpoint)
    (checkpoint / damage).unlink()
    assert main(train_argv(fixture_data, tmp_path / "run", resume=str(checkpoint))) == 2
    assert re.search(message, _error_line(capsys))


def test_resume_at_another_expert_parallel_size_is_refused(checkpointed_run, fixture_data, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed_run / "checkpoint-2", checkpoint)
    (checkpoint / "optimizer_ep_02_rank_00.safetensors").write_bytes(b"")  # as an EP=2 DDP run writes them
    assert main(train_argv(fixture_data, tmp_path / "run", resume=str(checkpoint))) == 2
    message = "saved with expert_parallel_size=2, this run uses 1; resume with expert_parallel_size=2"
    assert message in _error_line(capsys)


def test_shipped_tiny_config_parses():
    from hf_moe_mt.training.config import load_train_config
    from hf_moe_mt.training.run import model_config_of

    config = load_train_config(TINY_CONFIG)
    assert config.training["learning_rate"] == 2e-3 and config.training["eval_strategy"] == "steps"
    assert model_config_of(config).num_experts == 8
