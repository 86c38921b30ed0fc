"""Checkpoint averaging at export: the exported weights are the exact mean of the chosen checkpoints."""

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration
from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.average import average_checkpoints, checkpoints_to_average


@pytest.fixture(scope="module")
def checkpoints_run(run_dir, tmp_path_factory):
    """A run directory with checkpoint-100/200/300: the fixture model with different random weights each."""
    root = tmp_path_factory.mktemp("averaged_run")
    config = MoEMTConfig.from_pretrained(run_dir / "model")
    for seed, step in enumerate((100, 200, 300)):
        torch.manual_seed(seed)
        MoEMTForConditionalGeneration(config).save_pretrained(root / f"checkpoint-{step}")
    return root


def test_checkpoints_up_to_the_given_one_newest_last(checkpoints_run):
    names = lambda paths: [path.name for path in paths]  # noqa: E731
    assert names(checkpoints_to_average(checkpoints_run / "checkpoint-200", 2)) == ["checkpoint-100", "checkpoint-200"]
    assert names(checkpoints_to_average(checkpoints_run, 2)) == ["checkpoint-200", "checkpoint-300"]
    assert names(checkpoints_to_average(checkpoints_run, 1)) == ["checkpoint-300"]


def test_too_few_checkpoints_is_a_one_line_error_naming_the_fix(checkpoints_run):
    with pytest.raises(ValueError, match=r"--average-last 3 needs 3 checkpoints but .* has 2 up to checkpoint-200.*"
                                         r"save_total_limit") as error:
        checkpoints_to_average(checkpoints_run / "checkpoint-200", 3)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="at least 1"):
        checkpoints_to_average(checkpoints_run, 0)


def test_average_is_the_elementwise_mean_of_every_floating_tensor(checkpoints_run):
    paths = checkpoints_to_average(checkpoints_run, 3)
    states = [AutoModelForSeq2SeqLM.from_pretrained(path).state_dict() for path in paths]
    averaged = average_checkpoints(paths).state_dict()
    checked = 0
    for name, tensor in averaged.items():
        expected = sum(state[name].double() for state in states) / 3
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=0, atol=1e-7)
        checked += ".mlp.experts." in name or ".mlp.gate." in name
    assert checked > 0  # experts and routers are averaged too
    assert not torch.equal(averaged["model.shared.weight"], states[-1]["model.shared.weight"])


def test_checkpoints_of_another_shape_are_refused(checkpoints_run, tmp_path):
    config = MoEMTConfig.from_pretrained(checkpoints_run / "checkpoint-100")
    config.num_experts = config.num_experts * 2
    MoEMTForConditionalGeneration(config).save_pretrained(tmp_path / "checkpoint-1")
    with pytest.raises(ValueError, match=r"cannot average .*checkpoint-1 with .*checkpoint-100: .* of shape"):
        average_checkpoints([tmp_path / "checkpoint-1", checkpoints_run / "checkpoint-100"])


def test_export_average_last_writes_the_mean_and_says_so_in_the_card(checkpoints_run, run_dir, tmp_path):
    output = tmp_path / "averaged"
    assert cli_main(["export", "--checkpoint", str(checkpoints_run / "checkpoint-300"), "--output", str(output),
                     "--tokenizer", str(run_dir / "tokenizer"), "--average-last", "2"]) == 0
    exported = AutoModelForSeq2SeqLM.from_pretrained(output).state_dict()
    expected = average_checkpoints([checkpoints_run / "checkpoint-200", checkpoints_run / "checkpoint-300"]).state_dict()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    assert "mean of 2 checkpoints (checkpoint-200, checkpoint-300)" in (output / "README.md").read_text()
