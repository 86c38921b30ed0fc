"""`hf-moe-mt merge A B [C …] OUTPUT`: Aggregation of Experts (AoE) — combine trained models that share their
architecture apart from the experts into one model with ΣE experts.

Every MoE layer of the result holds A's experts, then B's, …, with the router rows in the same order
(experts.py), so router row i still scores expert i. Shared (non-expert) weights are averaged over the inputs
(`--shared average`) or taken from the first (`--shared first`). Routing settings (top-k, capacity, RTS) come
from the first input. Inputs with other shapes, another tokenizer or another top-k are refused with the reason.
"""

from __future__ import annotations

import os

import torch

from .experts import build_model, concat_experts, config_with, moe_layers

SHARED = ("average", "first")
# Config fields that must agree (besides the weight shapes): they change what the shared weights compute.
MUST_MATCH = ("model_type", "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "expert_ffn_dim", "encoder_sparse_step",
              "decoder_sparse_step", "max_position_embeddings", "position_embedding_type", "tie_word_embeddings",
              "activation_function", "scale_embedding", "num_experts_per_tok", "pad_token_id", "eos_token_id",
              "decoder_start_token_id")


def check_compatible(names: list[str], configs: list, tokenizers: list) -> None:
    """One-line ValueError naming the first input that differs from the first one, and how."""
    first = configs[0]
    if not first.sparse_layers("encoder") and not first.sparse_layers("decoder"):
        raise ValueError(f"{names[0]} has no MoE layers: there are no experts to aggregate (upcycle it first)")
    for name, config, tokenizer in zip(names[1:], configs[1:], tokenizers[1:]):
        for field in MUST_MATCH:
            if getattr(config, field) != getattr(first, field):
                raise ValueError(f"cannot merge {name} with {names[0]}: {field} is {getattr(config, field)!r} there "
                                 f"and {getattr(first, field)!r} in {names[0]}")
        if tokenizer.get_vocab() != tokenizers[0].get_vocab():
            raise ValueError(f"cannot merge {name} with {names[0]}: their tokenizers differ (AoE needs models trained "
                             "with one tokenizer, so token ids mean the same in both)")


def merge_state_dicts(state_dicts: list[dict[str, torch.Tensor]], config, shared: str) -> dict[str, torch.Tensor]:
    """Experts concatenated in input order; every other tensor averaged in fp32 (or the first input's)."""
    if shared not in SHARED:
        raise ValueError(f"--shared {shared!r} is not one of {', '.join(SHARED)}")
    merged = concat_experts(state_dicts, config)
    for key, tensor in state_dicts[0].items():
        if key in merged:
            continue
        if shared == "first":
            merged[key] = tensor.clone()
        else:
            merged[key] = torch.stack([sd[key].float() for sd in state_dicts]).mean(0).to(tensor.dtype)
    return merged


def merge(inputs: list[str | os.PathLike], output_dir: str | os.PathLike, *, shared: str = "average",
          overwrite: bool = False) -> dict:
    """1. load and check the inputs  2. merged weights and config (num_experts = ΣE)  3. write the export folder."""
    from ..data.atomic import check_output_dir
    from .export import load_tokenizer, load_trained_model, source_generation_config, training_info, write_model_folder

    if len(inputs) < 2:
        raise ValueError("merge needs at least two models (A B [C …] OUTPUT)")
    if shared not in SHARED:
        raise ValueError(f"--shared {shared!r} is not one of {', '.join(SHARED)}")
    check_output_dir(str(output_dir), overwrite)
    # 1.
    names = [str(path) for path in inputs]
    models = [load_trained_model(path).eval() for path in inputs]
    tokenizers = [load_tokenizer(path) for path in inputs]
    check_compatible(names, [m.config for m in models], tokenizers)
    # 2.
    counts = [m.config.num_experts for m in models]
    config = config_with(models[0].config, num_experts=sum(counts))
    merged = build_model(config, merge_state_dicts([m.state_dict() for m in models], models[0].config, shared))
    # 3.
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    summary = (f"Aggregation of Experts: {' + '.join(f'{n} ({e} experts)' for n, e in zip(names, counts))} → "
               f"{sum(counts)} experts per MoE layer; shared weights {'averaged' if shared == 'average' else 'from ' + names[0]}")
    info = training_info(inputs[0])
    info["derivation"] = [*info.get("derivation", []), {"tool": "merge", "summary": summary, "inputs": names,
                                                        "expert_offsets": offsets, "shared": shared}]
    result = write_model_folder(merged, tokenizers[0], output_dir, overwrite=overwrite, info=info,
                                generation_config=source_generation_config(inputs[0]))
    return {"inputs": names, "num_experts": counts, "expert_offsets": offsets, "shared": shared,
            "layers": list(moe_layers(config)), "output": str(result.output_dir),
            "num_parameters": result.num_parameters, "activated_parameters": result.activated_parameters}
