"""DeepSpeed's engine training our expert-parallel SparseMoE: ZeRO-1/2 and ZeRO-2 + CPU optimizer offload.

Owns: DeepSpeed's distributed init and its EP / expert-DP group registry (the engine and our layer use
the same groups), making the engine treat every SparseMoE as a DeepSpeed MoE layer, MoE-aware optimizer
param groups, and engine checkpoints of our stacked experts. Imports deepspeed; never imported by
modeling/configuration code or by parallel.py.

Call order (a `Seq2SeqTrainer` subclass or any script; the model is built world-size independent):

    1. model = MoEMTForConditionalGeneration.from_pretrained(...)  # every expert, on every rank
    2. groups = prepare_model_for_deepspeed(model, ep_size, ds_config)  # before Trainer/engine exist
    3. trainer = Trainer(model, TrainingArguments(deepspeed=ds_config), ...)
    4. Trainer.create_optimizer (DS config without "optimizer"):
           optimizer_cls(moe_optimizer_param_groups(model, args.weight_decay,
                                                    self.get_decay_parameter_names(model)), **kwargs)
       With an "optimizer" section DeepSpeed builds the optimizer and splits the groups itself.
    5. engine.save_checkpoint / engine.load_checkpoint (the Trainer's checkpoint / resume) write and
       read this rank's expert slice next to DeepSpeed's files, resuming at the same ep_size.
    6. Portable model: gather_full_state_dict(model, groups) on every rank (parallel.py), rank 0 saves
       it (HF names, all experts); `load_full_state_dict` does the same offline from a checkpoint.
       The stock `Trainer.save_model` would write rank 0's expert *slice* to model.safetensors: a
       Trainer subclass overrides it to gather first (a collective: every rank calls it).

Engine checkpoint layout (`save_dir/tag/`), ZeRO-1/2:

    mp_rank_00_model_states.pt                    DeepSpeed, written by rank 0: non-expert weights,
                                                  scheduler, step counters, config, num_experts
    zero_pp_rank_{r}_mp_rank_00_optim_states.pt   DeepSpeed, one per rank: ZeRO optimizer shard (shared
                                                  params over DP, expert params over expert-DP)
    experts_ep_{ep:02d}_rank_{i:02d}.safetensors  ours, one per EP rank i (written by its expert-DP
                                                  rank 0): the experts [i·E/ep, (i+1)·E/ep) of every
                                                  MoE layer under their HF names, shapes [E/ep, ...]
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

try:
    import deepspeed
except ImportError as error:  # an optional dependency: say what to do, in one line
    raise ImportError("DeepSpeed training needs the deepspeed package; pip install deepspeed, or train without "
                      "a DeepSpeed config") from error
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import groups as ds_groups
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..moe import SparseMoE
from ..parallel import (ExpertParallelExperts, ExpertParallelGroups, expert_parameter_names, moe_layers,
                        parallelize_experts)

EXPERT_FILE = "experts_ep_{ep_size:02d}_rank_{ep_rank:02d}.safetensors"
_EXPERT_FILE_PATTERN = re.compile(r"experts_ep_(\d+)_rank_(\d+)\.safetensors$")
SUPPORTED_ZERO_STAGES = (1, 2)


# --------------------------------------------------------------------------- config and process groups

def validate_deepspeed_config(deepspeed_config: dict | str | os.PathLike, ep_size: int) -> None:
    """Refuse DeepSpeed settings that cannot train our expert-parallel layer (one-line ValueErrors).

    ZeRO-3 partitions every parameter over the whole data-parallel world, which would tear experts
    apart across EP ranks (DeepSpeed itself refuses native MoE with stage 3). ZeRO-0 clips by the
    average of per-rank norms instead of the global norm under EP (measured 1e-3 off) and keeps
    optimizer state in per-EP-rank files our checkpoints do not write.
    """
    if not isinstance(deepspeed_config, dict):
        path = Path(deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} does not exist; pass a dict or an existing JSON file")
        deepspeed_config = json.loads(path.read_text())
    zero = deepspeed_config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ValueError(f"ZeRO stage 3 cannot shard expert-parallel experts (expert_parallel_size={ep_size}); "
                         "set zero_optimization.stage to 1 or 2 (experts are already sharded by expert parallelism)")
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage={stage} is not supported with expert parallelism "
                         "(gradient clipping would use per-rank norms); set zero_optimization.stage to 1 or 2")
    if deepspeed_config.get("use_data_before_expert_parallel_", False):
        raise ValueError("use_data_before_expert_parallel_=true changes DeepSpeed's EP rank layout after our "
                         "experts were sliced; remove it from the DeepSpeed config")


def init_deepspeed_distributed(dist_backend: str | None = None) -> None:
    """Initialise DeepSpeed's communication backend once (reuses a torchrun/accelerate process group).

    The backend defaults to the accelerator's (nccl on GPU; gloo, or ccl if installed, on CPU).
    """
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist_backend)


def create_deepspeed_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """EP and expert-DP groups created in (or taken from) DeepSpeed's registry, as ExpertParallelGroups.

    Registering them under DeepSpeed's name `ep_size_{ep}` is what makes the engine reduce expert
    gradients, shard expert optimizer state and broadcast experts over the same groups our all-to-all
    uses. Collective call: every rank, same order.
    """
    world = torch.distributed.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"world size {world} is not divisible by expert_parallel_size={ep_size}; "
                         f"use an ep size that divides {world}")
    name = f"ep_size_{ep_size}"
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ep_size)
    ep_group = ds_groups._get_expert_parallel_group(name)
    edp_group = ds_groups._get_expert_data_parallel_group(name)
    return ExpertParallelGroups(ep_size=ep_size, ep_rank=torch.distributed.get_rank(ep_group), ep_group=ep_group,
                                edp_size=world // ep_size, edp_rank=torch.distributed.get_rank(edp_group),
                                edp_group=edp_group, world_size=world)


# --------------------------------------------------------------------------- the engine's view of our layer

class DeepSpeedMoEMixin(MoE):
    """What DeepSpeed's engine reads from a MoE layer, added to a SparseMoE instance by class swap.

    The engine recognises MoE layers only by `isinstance(module, deepspeed.moe.layer.MoE)`; it reads
    `num_experts` (SparseMoE's, global), `ep_size`, `num_local_experts`, `expert_group_name`, and calls
    `set_deepspeed_parallelism`, which here only checks that our groups are DeepSpeed's. MoE.__init__
    never runs: forward, parameters and names stay SparseMoE's.
    """

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        self._create_process_groups(use_data_before_expert_parallel_)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_=true changes DeepSpeed's EP rank layout after our "
                             "experts were sliced; remove it from the DeepSpeed config")
        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            raise ValueError(f"DeepSpeed has no process group {self.expert_group_name}; call "
                             "prepare_model_for_deepspeed in this process before creating the engine")


_DEEPSPEED_CLASSES: dict[type, type] = {}


def _deepspeed_moe_class(cls: type) -> type:
    """`DeepSpeed<cls>`: cls first in the MRO (its forward wins), then the MoE mixin. One per class."""
    if cls not in _DEEPSPEED_CLASSES:
        name = f"DeepSpeed{cls.__name__}"
        klass = type(name, (cls, DeepSpeedMoEMixin), {"__module__": __name__, "__doc__": cls.__doc__})
        globals().setdefault(name, klass)  # picklable by qualified name (torch.save of a whole model)
        _DEEPSPEED_CLASSES[cls] = klass
    return _DEEPSPEED_CLASSES[cls]


def mark_moe_layer_for_deepspeed(module: SparseMoE, groups: ExpertParallelGroups) -> None:
    """Swap the instance's class to its DeepSpeed MoE variant and set the attributes the engine reads."""
    module.__class__ = _deepspeed_moe_class(type(module))
    module.ep_size = groups.ep_size
    module.num_local_experts = module.num_experts // groups.ep_size
    module.expert_group_name = groups.group_name
    module.enable_expert_tensor_parallelism = False  # read by DeepSpeed's flops profiler
    module.use_residual = False


def prepare_model_for_deepspeed(model: nn.Module, ep_size: int, deepspeed_config: dict | str | os.PathLike,
                                dist_backend: str | None = None) -> ExpertParallelGroups:
    """Make a full single-device model train expert-parallel under DeepSpeed's engine (collective call).

    1. refuse unsupported DeepSpeed settings  2. init DeepSpeed's distributed backend  3. EP / expert-DP
    groups in DeepSpeed's registry  4. slice experts onto this rank (all-to-all around them)
    5. every SparseMoE becomes a DeepSpeed MoE layer for the engine  6. install the checkpoint hooks.
    Call before the Trainer / `deepspeed.initialize`; returns the groups (for gather_full_state_dict).
    """
    # 1.
    validate_deepspeed_config(deepspeed_config, ep_size)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no SparseMoE layer; expert parallelism needs at least one MoE layer")
    # 2. + 3.
    init_deepspeed_distributed(dist_backend)
    groups = create_deepspeed_expert_parallel_groups(ep_size)
    # 4.
    parallelize_experts(model, groups)
    # 5.
    for _, module in layers:
        mark_moe_layer_for_deepspeed(module, groups)
    # 6.
    install_engine_checkpoint_hooks()
    return groups


def expert_parallel_groups_of(model: nn.Module) -> ExpertParallelGroups | None:
    """The groups a prepared model's experts use (None if the model is not expert-parallel)."""
    for _, module in moe_layers(model):
        if isinstance(module.experts, ExpertParallelExperts):
            return module.experts.groups
    return None


# --------------------------------------------------------------------------- optimizer groups

def moe_optimizer_param_groups(model: nn.Module, weight_decay: float,
                               decay_parameter_names: list[str] | None = None) -> list[dict]:
    """Trainer-style decay / no-decay groups, each with a 'name', experts split into 'moe': True groups.

    DeepSpeed's ZeRO-1/2 optimizer refuses a MoE model whose optimizer has no 'moe' group ("None of the
    param groups are marked as MoE"): the HF Trainer builds such an optimizer unless the DeepSpeed
    config has an "optimizer" section. `decay_parameter_names` defaults to the Trainer's rule
    (`Trainer.get_decay_parameter_names`: no decay for biases and norms).
    """
    if decay_parameter_names is None:
        from transformers import Trainer

        decay_parameter_names = Trainer.get_decay_parameter_names(None, model)  # uses no Trainer state
    decay = set(decay_parameter_names)
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    param_groups = [
        {"name": "decay", "params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    # Expert groups are named after DeepSpeed's group name ('ep_size_2'); the engine looks up the
    # expert-DP process group by that name.
    return [group for group in split_params_into_different_moe_groups_for_optimizer(param_groups)
            if group["params"]]


# --------------------------------------------------------------------------- engine checkpoints

def _is_ours(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(m, DeepSpeedMoEMixin) for m in model.modules())


def _expert_file(checkpoint_dir: str, groups: ExpertParallelGroups) -> str:
    return os.path.join(checkpoint_dir, EXPERT_FILE.format(ep_size=groups.ep_size, ep_rank=groups.ep_rank))


def save_expert_slice(model: nn.Module, checkpoint_dir: str, groups: ExpertParallelGroups) -> None:
    """Write this EP rank's experts (HF names, [E/ep, ...]) to a temp name, then rename (never half written).

    Only expert-DP rank 0 writes: its expert-DP replicas hold identical experts.
    """
    if groups.edp_rank != 0:
        return
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().contiguous().cpu() for name in expert_parameter_names(model)}
    path = _expert_file(checkpoint_dir, groups)
    metadata = {"format": "pt", "expert_parallel_size": str(groups.ep_size), "ep_rank": str(groups.ep_rank)}
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def saved_expert_parallel_size(checkpoint_dir: str) -> int | None:
    """The ep_size a checkpoint directory was saved with (from its expert file names), None if none."""
    sizes = {int(m.group(1)) for f in os.listdir(checkpoint_dir) if (m := _EXPERT_FILE_PATTERN.match(f))}
    if len(sizes) > 1:
        raise ValueError(f"{checkpoint_dir} mixes expert files of expert_parallel_size {sorted(sizes)}; "
                         "it is corrupt: resume from another checkpoint")
    return sizes.pop() if sizes else None


def _check_expert_files_complete(checkpoint_dir: str | os.PathLike, ep_size: int) -> None:
    missing = [EXPERT_FILE.format(ep_size=ep_size, ep_rank=r) for r in range(ep_size)
               if not os.path.isfile(os.path.join(checkpoint_dir, EXPERT_FILE.format(ep_size=ep_size, ep_rank=r)))]
    if missing:
        raise FileNotFoundError(f"{checkpoint_dir} is incomplete (missing {', '.join(missing)}); "
                                "resume from another checkpoint")


def load_expert_slice(checkpoint_dir: str, model: nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """This rank's expert tensors from `checkpoint_dir`, refusing another ep_size with the fix."""
    saved = saved_expert_parallel_size(checkpoint_dir)
    if saved is None:
        raise ValueError(f"checkpoint {checkpoint_dir} has no expert files (saved without expert parallelism); "
                         "resume it without prepare_model_for_deepspeed, or start from its full model "
                         "(load_full_state_dict -> save_pretrained)")
    if saved != groups.ep_size:
        raise ValueError(
            f"checkpoint {checkpoint_dir} holds experts for expert_parallel_size={saved}, this run uses "
            f"{groups.ep_size}; resume with expert_parallel_size={saved}, or consolidate it "
            "(load_full_state_dict / gather_full_state_dict -> save_pretrained) and start from that model")
    # Every rank checks every EP rank's file, so all ranks fail together instead of some hanging.
    _check_expert_files_complete(checkpoint_dir, saved)
    path = _expert_file(checkpoint_dir, groups)
    params = dict(model.named_parameters())
    with safe_open(path, framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    expected = set(expert_parameter_names(model))
    if set(tensors) != expected or any(tensors[n].shape != params[n].shape for n in expected):
        raise ValueError(f"{path} does not match this model's experts (different architecture or num_experts); "
                         "resume with the model configuration the checkpoint was trained with")
    return tensors


def _save_expert_parallel_checkpoint(engine: DeepSpeedEngine, save_dir: str, tag: str,
                                     client_state: dict, exclude_frozen_parameters: bool) -> None:
    """Replaces DeepSpeedEngine._save_moe_checkpoint for our layers (its per-expert regex on
    `.deepspeed_moe.experts.deepspeed_experts.N` keys cannot split stacked experts).

    1. each EP rank's expert slice  2. rank 0: DeepSpeed's model-states file without the experts.
    The ZeRO optimizer shards are saved by the engine afterwards, as for any model.
    """
    if not engine.zero_optimization() or engine.zero_optimization_partition_weights():
        raise ValueError("expert-parallel checkpoints need ZeRO stage 1 or 2; set zero_optimization.stage "
                         "and pass the DeepSpeed config to prepare_model_for_deepspeed")
    groups = expert_parallel_groups_of(engine.module)
    checkpoint_dir = os.path.join(save_dir, str(tag))
    engine._curr_ckpt_path = checkpoint_dir
    # 1.
    save_expert_slice(engine.module, checkpoint_dir, groups)
    # 2. Same content as DeepSpeed's native MoE path (engine internals of deepspeed 0.19).
    if ds_groups._get_data_parallel_rank() != 0:
        return
    experts = set(expert_parameter_names(engine.module))
    module_state = DeepSpeedEngine.module_state_dict(engine, exclude_frozen_parameters=exclude_frozen_parameters)
    module_state = {name: tensor for name, tensor in module_state.items() if name not in experts}
    save_frozen = engine.zero_optimization_partition_gradients() and not exclude_frozen_parameters
    state = engine._common_checkpoint_state(module_state, engine.zero_optimization(), save_frozen)
    state["num_experts"] = engine.num_experts
    state["expert_parallel_size"] = groups.ep_size
    state.update(client_state)
    engine.checkpoint_engine.save(state, engine._get_ckpt_name(save_dir, tag))


def install_engine_checkpoint_hooks() -> None:
    """Route DeepSpeedEngine's MoE checkpoint save/load to ours for models with our layers (idempotent).

    A class-level hook, because the engine calls `DeepSpeedEngine.load_moe_state_dict` by class name
    and the HF Trainer / accelerate create the engine themselves. Models without our layers keep
    DeepSpeed's behaviour unchanged.
    """
    if getattr(DeepSpeedEngine, "_hf_moe_mt_hooks", False):
        return
    native_save = DeepSpeedEngine._save_moe_checkpoint
    native_load = DeepSpeedEngine.load_moe_state_dict

    def _save_moe_checkpoint(self, save_dir, tag, client_state=None, exclude_frozen_parameters=False):
        if not _is_ours(self.module):
            return native_save(self, save_dir, tag, client_state=client_state or {},
                               exclude_frozen_parameters=exclude_frozen_parameters)
        return _save_expert_parallel_checkpoint(self, save_dir, tag, client_state or {}, exclude_frozen_parameters)

    def load_moe_state_dict(checkpoint_path, tag, state_dict, old_moe_load, model=None, **kwargs):
        if not _is_ours(model):
            return native_load(checkpoint_path, tag, state_dict, old_moe_load, model=model, **kwargs)
        groups = expert_parallel_groups_of(model)
        state_dict.update(load_expert_slice(os.path.join(checkpoint_path, str(tag)), model, groups))

    DeepSpeedEngine._save_moe_checkpoint = _save_moe_checkpoint
    DeepSpeedEngine.load_moe_state_dict = staticmethod(load_moe_state_dict)
    DeepSpeedEngine._hf_moe_mt_hooks = True


def load_full_state_dict(save_dir: str | os.PathLike, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Consolidate an engine checkpoint offline: every expert, HF names (the portable single-device
    state dict, any ep_size). Weights as the module held them (bf16 under bf16 training; the fp32
    masters live in the ZeRO shards). `tag` defaults to the one in `save_dir/latest`."""
    save_dir = Path(save_dir)
    if tag is None:
        latest = save_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{latest} does not exist; pass tag= (a sub-directory of {save_dir})")
        tag = latest.read_text().strip()
    checkpoint_dir = save_dir / tag
    main = checkpoint_dir / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise FileNotFoundError(f"{main} does not exist; {checkpoint_dir} is not a ZeRO-1/2 DeepSpeed checkpoint")
    state = dict(torch.load(main, map_location="cpu", weights_only=True)["module"])
    ep_size = saved_expert_parallel_size(str(checkpoint_dir))
    if ep_size is None:
        return state
    _check_expert_files_complete(checkpoint_dir, ep_size)
    slices = []
    for ep_rank in range(ep_size):
        path = checkpoint_dir / EXPERT_FILE.format(ep_size=ep_size, ep_rank=ep_rank)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices.append({name: f.get_tensor(name) for name in f.keys()})
    for name in slices[0]:
        state[name] = torch.cat([part[name] for part in slices], dim=0)
    return state


__all__ = [
    "DeepSpeedMoEMixin", "EXPERT_FILE", "create_deepspeed_expert_parallel_groups", "expert_parallel_groups_of",
    "init_deepspeed_distributed", "install_engine_checkpoint_hooks", "load_expert_slice", "load_full_state_dict",
    "mark_moe_layer_for_deepspeed", "moe_optimizer_param_groups", "prepare_model_for_deepspeed",
    "save_expert_slice", "saved_expert_parallel_size", "validate_deepspeed_config",
]
