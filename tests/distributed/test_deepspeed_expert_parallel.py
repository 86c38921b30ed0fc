"""DeepSpeed ZeRO-1/2 (+ CPU offload) and DDP training our expert-parallel model ≡ one process; engine
checkpoints resume exactly; unsupported settings fail with one-line errors.

The multi-process tests run real processes (torch.distributed.run, gloo, CPU); the others check the
single-process pieces (config validation, optimizer groups, expert-slice files) without collectives.
"""

import pytest
import torch

pytest.importorskip("deepspeed")

from hf_moe_mt.moe import SparseMoE  # noqa: E402
from hf_moe_mt.parallel import ExpertParallelGroups, parallelize_experts  # noqa: E402
from hf_moe_mt.training.deepspeed_ep import (EXPERT_FILE, load_expert_slice, load_full_state_dict,  # noqa: E402
                                             moe_optimizer_param_groups, prepare_model_for_deepspeed,
                                             save_expert_slice, validate_deepspeed_config)

from .launch import torchrun  # noqa: E402


# --------------------------------------------------------------------------- single process

def _fake_groups(ep_size: int, ep_rank: int, edp_rank: int = 0) -> ExpertParallelGroups:
    """Groups for slicing and file naming only: no collective runs in these tests."""
    return ExpertParallelGroups(ep_size=ep_size, ep_rank=ep_rank, ep_group=None, edp_size=1, edp_rank=edp_rank,
                                edp_group=None, world_size=ep_size)


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.layer_norm = torch.nn.LayerNorm(8)
        self.mlp = SparseMoE(8, 12, num_experts=4, top_k=1, drop_tokens=False)


def _parallel_model(ep_size: int = 2, ep_rank: int = 0, seed: int = 0) -> _TinyModel:
    torch.manual_seed(seed)
    return parallelize_experts(_TinyModel(), _fake_groups(ep_size, ep_rank))


def test_zero3_with_expert_parallelism_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"ZeRO stage 3 .*set zero_optimization.stage to 1 or 2") as error:
        prepare_model_for_deepspeed(_TinyModel(), 2, {"zero_optimization": {"stage": 3}})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("config, match", [
    ({}, r"zero_optimization.stage=0 is not supported"),
    ({"zero_optimization": {"stage": 2}, "use_data_before_expert_parallel_": True}, r"remove it"),
])
def test_unsupported_deepspeed_settings_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        validate_deepspeed_config(config, 2)


def test_deepspeed_config_path_is_read_and_a_missing_one_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        validate_deepspeed_config(str(path), 2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_deepspeed_config(str(tmp_path / "missing.json"), 2)
    validate_deepspeed_config({"zero_optimization": {"stage": 1}}, 2)


def test_optimizer_groups_split_experts_into_named_moe_groups_with_trainer_decay_rule():
    model = _parallel_model()
    groups = moe_optimizer_param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {(g["name"], g["weight_decay"], g.get("moe", False)): sorted(names[id(p)] for p in g["params"])
                for g in groups}
    assert by_group == {
        ("decay", 0.1, False): ["mlp.gate.weight", "proj.weight"],
        ("no_decay", 0.0, False): ["layer_norm.bias", "layer_norm.weight", "proj.bias"],
        ("ep_size_2", 0.1, True): ["mlp.experts.down_proj", "mlp.experts.up_proj"],
        ("ep_size_2", 0.0, True): ["mlp.experts.down_proj_bias", "mlp.experts.up_proj_bias"],
    }
    # Every trainable parameter exactly once.
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(names.values())


def test_expert_slice_round_trips_exactly_and_only_expert_dp_rank_0_writes(tmp_path):
    for ep_rank in range(2):
        save_expert_slice(_parallel_model(ep_rank=ep_rank), str(tmp_path), _fake_groups(2, ep_rank))
    save_expert_slice(_parallel_model(seed=1), str(tmp_path / "nowhere"), _fake_groups(2, 0, edp_rank=1))
    for ep_rank in range(2):
        saved = _parallel_model(ep_rank=ep_rank)
        loaded = load_expert_slice(str(tmp_path), _parallel_model(ep_rank=ep_rank, seed=5), _fake_groups(2, ep_rank))
        for name, tensor in loaded.items():
            assert torch.equal(tensor, saved.get_parameter(name)), name
    assert not (tmp_path / "nowhere").exists()


def test_expert_slice_refuses_another_ep_size_and_missing_files(tmp_path):
    for ep_rank in range(2):
        save_expert_slice(_parallel_model(ep_rank=ep_rank), str(tmp_path), _fake_groups(2, ep_rank))
    with pytest.raises(ValueError, match=r"expert_parallel_size=2, this run uses 4.*consolidate"):
        load_expert_slice(str(tmp_path), _parallel_model(ep_size=4), _fake_groups(4, 0))
    (tmp_path / EXPERT_FILE.format(ep_size=2, ep_rank=1)).unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete \(missing experts_ep_02_rank_01.safetensors\)"):
        load_expert_slice(str(tmp_path), _parallel_model(), _fake_groups(2, 0))


def test_offline_consolidation_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="latest does not exist; pass tag="):
        load_full_state_dict(tmp_path)
    (tmp_path / "step3").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a ZeRO-1/2 DeepSpeed checkpoint"):
        load_full_state_dict(tmp_path, tag="step3")


# --------------------------------------------------------------------------- real processes
# `tiny`: embedding → SparseMoE → SparseMoE → head; `moe_mt`: a tiny MoEMTForConditionalGeneration.

@pytest.mark.distributed
@pytest.mark.parametrize("stage, model", [(1, "tiny"), (2, "moe_mt")])
def test_zero_ep2_with_trainer_style_optimizer_matches_single_process(stage, model):
    assert f"OK ep=2 world=2 stage={stage} optimizer=client model={model} offload=False" in torchrun(
        "deepspeed_ep_train.py", "2", str(stage), "client", model)


@pytest.mark.distributed
def test_zero2_ep2_with_deepspeed_config_optimizer_matches_single_process():
    assert "OK ep=2 world=2 stage=2 optimizer=config model=tiny" in torchrun(
        "deepspeed_ep_train.py", "2", "2", "config", "tiny")


@pytest.mark.distributed
def test_zero2_checkpoint_ep2_by_edp2_resumes_exactly_and_refuses_other_ep_size(tmp_path):
    """4 processes: expert optimizer state sharded over expert-DP; run A also ≡ one process."""
    out = torchrun("deepspeed_ep_checkpoint.py", "2", "2", "moe_mt", str(tmp_path), nproc=4)
    assert "OK checkpoint ep=2 world=4 stage=2 model=moe_mt offload=False" in out


@pytest.mark.distributed
def test_zero2_cpu_offload_ep2_matches_single_process_and_resumes_exactly(tmp_path):
    out = torchrun("deepspeed_ep_checkpoint.py", "2", "2", "tiny", str(tmp_path), "offload")
    assert "OK checkpoint ep=2 world=2 stage=2 model=tiny offload=True" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_offload_with_deepspeed_cpu_adam_ep2_matches_single_process():
    """DeepSpeed's own CPU Adam (the paper's E+Z-Off); its first use JIT-builds a C++ op (~70 s)."""
    assert "OK ep=2 world=2 stage=2 optimizer=cpu_adam model=tiny offload=True" in torchrun(
        "deepspeed_ep_train.py", "2", "2", "cpu_adam", "tiny", "offload", timeout=600)


@pytest.mark.distributed
def test_seq2seq_trainer_builds_moe_optimizer_groups_under_zero2_ep2_and_resumes_exactly(tmp_path):
    """DeepSpeed config without an "optimizer" section: the Trainer's optimizer must carry MoE groups."""
    assert "OK trainer zero2 ep=2" in torchrun("trainer_deepspeed_ep.py", str(tmp_path))


@pytest.mark.distributed
def test_ddp_ep2_with_expert_gradient_reduction_matches_single_process():
    assert "OK ddp ep=2 world=2 model=moe_mt" in torchrun("ddp_ep_train.py", "2", "moe_mt")
