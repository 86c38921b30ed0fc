"""Checkpoint pieces: per-EP-rank optimizer state through safetensors (exact, no pickle), publishing a staged
directory, the completeness check."""

import os

import pytest
import torch
from safetensors import safe_open

from hf_moe_mt.parallel import ExpertParallelGroups
from hf_moe_mt.training.checkpoints import (OPTIMIZER_FILE, check_checkpoint_complete, load_optimizer_slice,
                                            publish_directory, save_optimizer_slice, staging_path)


def _groups(ep_rank: int = 0, edp_rank: int = 0) -> ExpertParallelGroups:
    return ExpertParallelGroups(ep_size=2, ep_rank=ep_rank, ep_group=None, edp_size=2, edp_rank=edp_rank,
                                edp_group=None, world_size=4)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.1, "name": "decay"},
                                   {"params": model[1].parameters(), "weight_decay": 0.0}], lr=1e-2, betas=(0.8, 0.9))
    return model, optimizer


def _step(model, optimizer, seed: int):
    torch.manual_seed(seed)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_optimizer_state_round_trips_exactly_and_training_continues_identically(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for seed in range(3):
        _step(model, optimizer, seed)
    save_optimizer_slice(optimizer, str(tmp_path), _groups(ep_rank=1))
    path = tmp_path / OPTIMIZER_FILE.format(ep_size=2, ep_rank=1)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["expert_parallel_size"] == "2" and "state.0.exp_avg" in f.keys()
    restored_model, restored = _model_and_optimizer(0)
    restored_model.load_state_dict(model.state_dict())
    load_optimizer_slice(restored, str(tmp_path), _groups(ep_rank=1))
    assert restored.param_groups[0]["name"] == "decay" and tuple(restored.param_groups[0]["betas"]) == (0.8, 0.9)
    for seed in (3, 4):
        _step(model, optimizer, seed)
        _step(restored_model, restored, seed)
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)


def test_only_expert_data_parallel_rank_zero_writes(tmp_path):
    _, optimizer = _model_and_optimizer(0)
    save_optimizer_slice(optimizer, str(tmp_path), _groups(ep_rank=0, edp_rank=1))
    assert os.listdir(tmp_path) == []


def test_publish_renames_a_new_directory_and_replaces_a_checkpoint(tmp_path):
    final = tmp_path / "checkpoint-4"
    for content in ("first", "second"):
        staging = staging_path(str(final))
        os.makedirs(staging)
        (tmp_path / os.path.basename(staging) / "file").write_text(content)
        publish_directory(staging, str(final))
        assert (final / "file").read_text() == content
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]


def test_publish_into_an_existing_output_dir_keeps_its_other_files(tmp_path):
    final = tmp_path / "output"
    (final / "checkpoint-2").mkdir(parents=True)
    (final / "config.json").write_text("old")
    staging = staging_path(str(final))
    os.makedirs(os.path.join(staging, "sub"))
    for name in ("config.json", os.path.join("sub", "x")):
        with open(os.path.join(staging, name), "w") as handle:
            handle.write("new")
    publish_directory(staging, str(final))
    assert sorted(os.listdir(final)) == ["checkpoint-2", "config.json", "sub"]
    assert (final / "config.json").read_text() == "new" and (final / "sub" / "x").read_text() == "new"
    assert not os.path.exists(staging)


def _touch(directory, *names):
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
        open(os.path.join(directory, name), "w").close()


def test_completeness_lists_the_missing_per_rank_files(tmp_path):
    _touch(tmp_path, "trainer_state.json", "model.safetensors", "rng_state_0.pth", "scheduler.pt",
           OPTIMIZER_FILE.format(ep_size=2, ep_rank=0))
    with pytest.raises(FileNotFoundError, match=r"incomplete for 2 process\(es\) \(missing rng_state_1.pth, "
                                                r"optimizer_ep_02_rank_01.safetensors\)"):
        check_checkpoint_complete(str(tmp_path), world_size=2, ep_size=2, deepspeed=False)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        check_checkpoint_complete(str(tmp_path / "nope"), world_size=1, ep_size=1, deepspeed=False)


def test_completeness_of_a_deepspeed_expert_parallel_checkpoint(tmp_path):
    _touch(tmp_path, "trainer_state.json", "model.safetensors", "rng_state_0.pth", "rng_state_1.pth")
    with pytest.raises(FileNotFoundError, match=r"missing latest\)"):
        check_checkpoint_complete(str(tmp_path), world_size=2, ep_size=2, deepspeed=True)
    (tmp_path / "latest").write_text("global_step4")
    _touch(tmp_path / "global_step4", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
           "zero_pp_rank_1_mp_rank_00_optim_states.pt", "experts_ep_02_rank_00.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing global_step4/experts_ep_02_rank_01.safetensors\)"):
        check_checkpoint_complete(str(tmp_path), world_size=2, ep_size=2, deepspeed=True)
    with pytest.raises(ValueError, match=r"saved with expert_parallel_size=2, this run uses 1"):
        check_checkpoint_complete(str(tmp_path), world_size=2, ep_size=1, deepspeed=True)
    _touch(tmp_path, "global_step4/experts_ep_02_rank_01.safetensors")
    check_checkpoint_complete(str(tmp_path), world_size=2, ep_size=2, deepspeed=True)
