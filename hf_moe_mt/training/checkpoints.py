"""Trainer checkpoints that survive `kill -9` and expert parallelism.

Owns: staging a checkpoint under a temporary name and renaming it into place (a crash never leaves a
`checkpoint-N` that `--resume` would pick half written), the per-EP-rank optimizer files of the
accelerate/DDP path (safetensors + JSON metadata, no pickle), reading a checkpoint's full model, and the
completeness check run before resuming. Imports no deepspeed (the engine's own files are only counted).

Layout of `checkpoint-N/` written by MoESeq2SeqTrainer (all paths):

    model.safetensors, config.json, ...           the FULL model (every expert, HF names), rank 0
    trainer_state.json, scheduler.pt               as the stock Trainer writes them
    rng_state.pth | rng_state_{rank}.pth           as the stock Trainer writes them
accelerate/DDP with expert_parallel_size = ep > 1:
    optimizer_ep_{ep:02d}_rank_{i:02d}.safetensors optimizer state of EP rank i (its expert slice + the
                                                   shared params), written by its expert-DP rank 0
single process / DDP without EP:   optimizer.pt   (stock)
DeepSpeed:   latest, global_step{N}/...           the engine's files (+ experts_ep_* under EP)
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..parallel import ExpertParallelGroups

STAGING_PREFIX = ".tmp-"  # hidden, and never matched by transformers' `^checkpoint-(\d+)$`
OPTIMIZER_FILE = "optimizer_ep_{ep_size:02d}_rank_{ep_rank:02d}.safetensors"
_OPTIMIZER_FILE_PATTERN = re.compile(r"optimizer_ep_(\d+)_rank_(\d+)\.safetensors$")
DEEPSPEED_EXPERT_FILE = "experts_ep_{ep_size:02d}_rank_{ep_rank:02d}.safetensors"  # deepspeed_ep.EXPERT_FILE
_DEEPSPEED_EXPERT_FILE_PATTERN = re.compile(r"experts_ep_(\d+)_rank_(\d+)\.safetensors$")
_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


# --------------------------------------------------------------------------- atomic directories

def staging_path(final_dir: str) -> str:
    """Where `final_dir` is assembled before the rename: a hidden sibling on the same file system."""
    parent, name = os.path.split(os.path.abspath(final_dir))
    return os.path.join(parent, f"{STAGING_PREFIX}{name}")


def publish_directory(staging: str, final_dir: str) -> None:
    """Rename a fully written `staging` directory to `final_dir`.

    A new directory appears with one rename. An existing `final_dir` (a re-save of the same step) is moved
    aside first, then deleted; an existing non-checkpoint directory keeps its other files and receives each
    staged file by an atomic per-file replace (e.g. `save_model()` into an output_dir holding checkpoints).
    """
    if not os.path.exists(final_dir):
        os.rename(staging, final_dir)
        return
    if checkpoint_step(final_dir) is not None:
        retired = staging + "-old"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final_dir, retired)
        os.rename(staging, final_dir)
        shutil.rmtree(retired, ignore_errors=True)
        return
    for root, _, files in os.walk(staging):
        target_root = os.path.join(final_dir, os.path.relpath(root, staging))
        os.makedirs(target_root, exist_ok=True)
        for name in files:
            os.replace(os.path.join(root, name), os.path.join(target_root, name))
    shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(output_dir: str) -> None:
    """Delete checkpoints a crash left half written (they were never renamed, so nothing refers to them)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a folder named `checkpoint-N` (as transformers names them), else None."""
    match = _CHECKPOINT_NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoints_by_step(output_dir: str | os.PathLike) -> dict[int, str]:
    """step → `checkpoint-N` folder of `output_dir`, oldest first (staged checkpoints never carry that name)."""
    found = {step: os.path.join(output_dir, name) for name in os.listdir(output_dir)
             if (step := checkpoint_step(name)) is not None and os.path.isdir(os.path.join(output_dir, name))}
    return dict(sorted(found.items()))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` of `output_dir` (staged checkpoints never carry that name), or None."""
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


# --------------------------------------------------------------------------- optimizer slices (DDP + EP)

def optimizer_state_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A torch optimizer state_dict as (tensors named `state.{param}.{key}`, JSON metadata for the rest)."""
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            name = f"state.{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    metadata = {"format": "pt", "param_groups": json.dumps(state_dict["param_groups"]),
                "scalars": json.dumps(scalars)}
    return tensors, metadata


def optimizer_state_from_safetensors(path: str) -> dict:
    """Inverse of optimizer_state_to_safetensors (tuples in param_groups come back as lists)."""
    state: dict[int, dict] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata()
        for name in f.keys():
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = f.get_tensor(name)
    for name, value in json.loads(metadata["scalars"]).items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def save_optimizer_slice(optimizer: torch.optim.Optimizer, output_dir: str, groups: ExpertParallelGroups) -> None:
    """This EP rank's optimizer state (expert-DP replicas hold the same state: only their rank 0 writes)."""
    if groups.edp_rank != 0:
        return
    tensors, metadata = optimizer_state_to_safetensors(optimizer.state_dict())
    metadata.update(expert_parallel_size=str(groups.ep_size), ep_rank=str(groups.ep_rank))
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, OPTIMIZER_FILE.format(ep_size=groups.ep_size, ep_rank=groups.ep_rank)),
              metadata=metadata)


def load_optimizer_slice(optimizer: torch.optim.Optimizer, checkpoint_dir: str, groups: ExpertParallelGroups) -> None:
    path = os.path.join(checkpoint_dir, OPTIMIZER_FILE.format(ep_size=groups.ep_size, ep_rank=groups.ep_rank))
    optimizer.load_state_dict(optimizer_state_from_safetensors(path))


# --------------------------------------------------------------------------- reading the full model

def load_checkpoint_state_dict(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint (model.safetensors, or its sharded index)."""
    single = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        files = [single]
    else:
        index = os.path.join(checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME)
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        files = [os.path.join(checkpoint_dir, name) for name in shards]
    state = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})
    return state


def load_full_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`load_state_dict`, allowing only keys `save_pretrained` leaves out because they are tied to a saved one."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    saved_storages = {tensor.data_ptr() for name, tensor in model.state_dict().items() if name in state}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in saved_storages]
    if untied or unexpected:
        raise ValueError(f"the checkpoint does not match the model (missing {untied[:3]}, unexpected "
                         f"{unexpected[:3]}); resume with the model configuration it was trained with")


# --------------------------------------------------------------------------- completeness

def _saved_sizes(names: list[str], pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for name in names if (m := pattern.match(name))}


def _deepspeed_files(checkpoint_dir: str, world_size: int, ep_size: int) -> list[str]:
    """DeepSpeed ZeRO-1/2 engine files (names as deepspeed 0.19 and deepspeed_ep.py write them)."""
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        return ["latest"]
    with open(latest, encoding="utf-8") as handle:
        tag = handle.read().strip()
    files = ["mp_rank_00_model_states.pt"] + [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
                                              for rank in range(world_size)]
    if ep_size > 1:
        files += [DEEPSPEED_EXPERT_FILE.format(ep_size=ep_size, ep_rank=rank) for rank in range(ep_size)]
    return [os.path.join(tag, name) for name in files]


def required_checkpoint_files(checkpoint_dir: str, world_size: int, ep_size: int, deepspeed: bool,
                              save_only_model: bool = False) -> list[str]:
    """Files a resume at this world size / ep_size / engine reads from `checkpoint_dir` (relative paths)."""
    has_model = os.path.isfile(os.path.join(checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME))
    files = ["trainer_state.json", SAFE_WEIGHTS_INDEX_NAME if has_model else SAFE_WEIGHTS_NAME]
    if save_only_model:
        return files
    files += ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    if deepspeed:
        files += _deepspeed_files(checkpoint_dir, world_size, ep_size)
    elif ep_size > 1:
        files += [OPTIMIZER_FILE.format(ep_size=ep_size, ep_rank=rank) for rank in range(ep_size)] + ["scheduler.pt"]
    else:
        files += ["optimizer.pt", "scheduler.pt"]
    return files


def check_checkpoint_complete(checkpoint_dir: str, world_size: int, ep_size: int, deepspeed: bool,
                              save_only_model: bool = False) -> None:
    """One-line errors (checked on every rank before any state is built) for a checkpoint this run cannot
    resume: missing, another expert_parallel_size, or missing shards (deleted files, another world size)."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} does not exist; pass an existing checkpoint-N "
                                "directory, or --resume alone to continue from the last complete one")
    names = os.listdir(checkpoint_dir)
    tag_dirs = [os.path.join(checkpoint_dir, n) for n in names if os.path.isdir(os.path.join(checkpoint_dir, n))]
    saved = _saved_sizes(names, _OPTIMIZER_FILE_PATTERN) | {
        size for d in tag_dirs for size in _saved_sizes(os.listdir(d), _DEEPSPEED_EXPERT_FILE_PATTERN)}
    if saved and saved != {ep_size}:
        raise ValueError(f"checkpoint {checkpoint_dir} was saved with expert_parallel_size={sorted(saved)[0]}, this "
                         f"run uses {ep_size}; resume with expert_parallel_size={sorted(saved)[0]}, or start a new run "
                         f"from its full model (model.pretrained={checkpoint_dir})")
    missing = [f for f in required_checkpoint_files(checkpoint_dir, world_size, ep_size, deepspeed, save_only_model)
               if not os.path.isfile(os.path.join(checkpoint_dir, f))]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} is incomplete for {world_size} process(es) (missing "
                                f"{shown}); resume with the launch it was saved by, or from another checkpoint")
