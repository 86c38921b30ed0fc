"""Expert surgery on MoE-MT weights: which tensors make up one expert, and how to select (prune) or concatenate
(merge) experts so that router rows and expert weights always move together. The one home for the expert
tensor names; prune.py, merge.py and upcycle.py build on it. Never imported by modeling code.

An MoE layer `P = model.{encoder|decoder}.layers.{i}.mlp` owns, with experts on dim 0:
    P.gate.weight [E, D]   P.experts.up_proj [E, F, D]   P.experts.up_proj_bias [E, F]
    P.experts.down_proj [E, D, F]   P.experts.down_proj_bias [E, D]
"""

from __future__ import annotations

import torch

from ..configuration_moe_mt import MoEMTConfig
from ..modeling_moe_mt import MoEMTForConditionalGeneration

EXPERT_TENSORS = ("gate.weight", "experts.up_proj", "experts.up_proj_bias", "experts.down_proj",
                  "experts.down_proj_bias")


def moe_layers(config: MoEMTConfig) -> dict[str, str]:
    """{"encoder.1": "model.encoder.layers.1.mlp", ...}: every MoE layer, encoder first, in layer order."""
    return {f"{stack}.{index}": f"model.{stack}.layers.{index}.mlp"
            for stack in ("encoder", "decoder") for index in config.sparse_layers(stack)}


def expert_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name in EXPERT_TENSORS]


def select_experts(state_dict: dict[str, torch.Tensor], config: MoEMTConfig,
                   kept: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` where MoE layer L keeps only experts `kept[L]` (router rows and weights alike),
    in the order given. Every layer must keep the same number (the config has one `num_experts`)."""
    layers = moe_layers(config)
    if set(kept) != set(layers):
        raise ValueError(f"expert selection names layers {sorted(kept)} but the model's MoE layers are {list(layers)}")
    sizes = {len(ids) for ids in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(sizes)}")
    selected = dict(state_dict)
    for layer, prefix in layers.items():
        ids = torch.tensor(kept[layer], dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= config.num_experts or ids.unique().numel() != ids.numel()):
            raise ValueError(f"{layer}: expert ids {kept[layer]} must be distinct and in [0, {config.num_experts})")
        for key in expert_keys(prefix):
            selected[key] = state_dict[key].index_select(0, ids).clone()
    return selected


def concat_experts(state_dicts: list[dict[str, torch.Tensor]], config: MoEMTConfig) -> dict[str, torch.Tensor]:
    """Expert tensors of every MoE layer concatenated along the expert dim, in input order (inputs must have
    the same MoE layers); non-expert tensors are not included."""
    merged = {}
    for prefix in moe_layers(config).values():
        for key in expert_keys(prefix):
            merged[key] = torch.cat([state_dict[key] for state_dict in state_dicts], dim=0)
    return merged


def build_model(config: MoEMTConfig, state_dict: dict[str, torch.Tensor]) -> MoEMTForConditionalGeneration:
    """A model of `config` holding exactly `state_dict` (strict: a missing or extra tensor is a bug here)."""
    model = MoEMTForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def config_with(config: MoEMTConfig, **changes) -> MoEMTConfig:
    """A validated copy of `config` with `changes` (e.g. num_experts) applied. The expert-parallel size (a
    training setting) is kept when it still divides the number of experts, else reset to 1."""
    values = config.to_dict()
    values.update(changes)
    if values["num_experts"] % values["expert_parallel_size"]:
        values["expert_parallel_size"] = 1
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        values.pop(key, None)
    return MoEMTConfig(**values)
