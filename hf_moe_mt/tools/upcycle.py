"""`hf-moe-mt upcycle DENSE OUTPUT --num-experts E`: sparse upcycling (Komatsuzaki et al. 2022) — start an MoE
from a trained dense translation model. Every dense parameter is copied; in each layer that the new config
makes sparse, the layer's FFN is copied into every expert and a fresh router is drawn.

Sources:
- an hf_moe_mt model without MoE layers (`encoder_sparse_step = decoder_sparse_step = 0`);
- a transformers `M2M100ForConditionalGeneration` (M2M100 and the dense NLLB-200 checkpoints), through the
  mapping below: both are pre-LayerNorm encoder-decoders with the same attention, scaled embeddings and
  fairseq sinusoidal positions (hf_moe_mt offsets its table by padding_idx + 1 exactly as M2M100 does), so
  renaming the FFN and its LayerNorm is the whole mapping:

      M2M100 `…layers.{i}.fc1` → `…layers.{i}.mlp.up_proj`      (dense layer)  or experts.up_proj[e] / up_proj_bias[e]
      M2M100 `…layers.{i}.fc2` → `…layers.{i}.mlp.down_proj`    (dense layer)  or experts.down_proj[e] / down_proj_bias[e]
      M2M100 `…layers.{i}.final_layer_norm` → `…layers.{i}.mlp_layer_norm`; every other name is the same.

- Marian checkpoints are refused: Marian layers are post-LayerNorm (`x = LN(x + f(x))`, no final LayerNorm,
  a `final_logits_bias`), which a pre-LayerNorm model cannot compute with any renaming of weights.

At initialisation the upcycled model computes exactly what the dense one does when every token's combine
weights sum to one: top-2 routing (the default here) renormalises the two chosen probabilities, and all
experts are the same FFN. With `--top-k 1` each expert output is scaled by the router probability (the
paper's top-1 rule), so the model starts as the dense one with every sparse FFN scaled by p(x) ≈ 1/E and
recovers in training. `--expert-noise σ` adds σ·std(w) Gaussian noise to each copied expert weight matrix
to break the symmetry between experts (then outputs differ from the dense model's by that noise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..configuration_moe_mt import MoEMTConfig
from .experts import build_model, moe_layers

M2M100_RENAMES = ((".fc1.", ".mlp.up_proj."), (".fc2.", ".mlp.down_proj."), (".final_layer_norm.", ".mlp_layer_norm."))
# MoEMTConfig fields read from an M2M100Config (same names, same meaning).
M2M100_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                 "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
                 "activation_function", "scale_embedding", "dropout", "attention_dropout", "activation_dropout",
                 "init_std", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                 "tie_word_embeddings")


def m2m100_to_moe_mt(m2m_config, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(MoEMTConfig fields of a dense model, state dict in hf_moe_mt names) of an M2M100ForConditionalGeneration."""
    fields = {name: getattr(m2m_config, name) for name in M2M100_FIELDS}
    fields.update(position_embedding_type="sinusoidal", encoder_sparse_step=0, decoder_sparse_step=0)
    renamed = {}
    for key, tensor in state_dict.items():
        for old, new in M2M100_RENAMES:
            key = key.replace(old, new)
        renamed[key] = tensor
    return fields, renamed


def load_dense(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(dense MoEMTConfig fields, state dict in our names, source model_type) of a local model folder."""
    from transformers import AutoModelForSeq2SeqLM

    from .export import check_weight_files, load_trained_model

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); download a Hub model first with "
                                "`hf download REPO --local-dir DIR`")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type == "marian":
        raise ValueError("Marian models are post-LayerNorm (LN after each residual, no final LayerNorm); hf_moe_mt "
                         "layers are pre-LayerNorm, so no weight mapping computes the same function. Upcycle an "
                         "M2M100/NLLB or hf_moe_mt dense model")
    if model_type == MoEMTConfig.model_type:
        model = load_trained_model(folder)
        if moe_layers(model.config):
            raise ValueError(f"{folder} already has MoE layers {list(moe_layers(model.config))}; upcycle takes a "
                             "dense model (encoder_sparse_step = decoder_sparse_step = 0)")
        fields = {k: v for k, v in model.config.to_dict().items()
                  if k not in ("model_type", "transformers_version", "architectures", "auto_map", "custom_pipelines")}
        return fields, model.state_dict(), model_type
    if model_type == "m2m_100":
        check_weight_files(folder)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
        fields, state_dict = m2m100_to_moe_mt(model.config, model.state_dict())
        return fields, state_dict, model_type
    raise ValueError(f"{folder} holds a {model_type!r} model; upcycle supports hf_moe_mt dense models and "
                     "m2m_100 (M2M100, dense NLLB-200) checkpoints")


def upcycled_config(fields: dict, num_experts: int, top_k: int, encoder_sparse_step: int,
                    decoder_sparse_step: int) -> MoEMTConfig:
    """The MoE config: the dense one plus experts; expert_ffn_dim is the FFN width of the layers made sparse."""
    config = MoEMTConfig(**{**fields, "num_experts": num_experts, "num_experts_per_tok": top_k,
                            "encoder_sparse_step": encoder_sparse_step, "decoder_sparse_step": decoder_sparse_step,
                            "expert_parallel_size": 1})
    widths = {config.encoder_ffn_dim} if config.sparse_layers("encoder") else set()
    widths |= {config.decoder_ffn_dim} if config.sparse_layers("decoder") else set()
    if not widths:
        raise ValueError(f"sparse steps {encoder_sparse_step}/{decoder_sparse_step} make no layer sparse in a "
                         f"{config.encoder_layers}+{config.decoder_layers}-layer model; use --sparse-step 2")
    if len(widths) > 1:
        raise ValueError(f"encoder_ffn_dim={config.encoder_ffn_dim} and decoder_ffn_dim={config.decoder_ffn_dim} "
                         "differ but experts share one width; upcycle one stack only (--encoder-sparse-step 0 or "
                         "--decoder-sparse-step 0)")
    config.expert_ffn_dim = widths.pop()
    return config


def upcycle_state_dict(dense: dict[str, torch.Tensor], config: MoEMTConfig, *, expert_noise: float = 0.0,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """1. copy every dense tensor  2. per sparse layer: the FFN into every expert (+ optional noise), then drop
    the dense FFN keys  3. a fresh router N(0, init_std). Router and noise draw from separate generators, so
    the router of a seed is the same with and without noise."""
    router_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)
    upcycled = dict(dense)  # 1.
    for prefix in moe_layers(config).values():
        # 2. dense `mlp.up_proj.weight` [F, D] is expert e's `experts.up_proj[e]` (same layout, see MoEMTDenseFFN)
        for name in ("up_proj", "down_proj"):
            weight, bias = upcycled.pop(f"{prefix}.{name}.weight"), upcycled.pop(f"{prefix}.{name}.bias")
            experts = weight.unsqueeze(0).repeat(config.num_experts, 1, 1)
            if expert_noise > 0:
                noise = torch.randn(experts.shape, generator=noise_generator, dtype=experts.dtype)
                experts = experts + expert_noise * weight.std() * noise
            upcycled[f"{prefix}.experts.{name}"] = experts
            upcycled[f"{prefix}.experts.{name}_bias"] = bias.unsqueeze(0).repeat(config.num_experts, 1)
        # 3.
        upcycled[f"{prefix}.gate.weight"] = torch.randn(config.num_experts, config.d_model,
                                                        generator=router_generator) * config.init_std
    return upcycled


def upcycled_model(dense_dir: str | os.PathLike, num_experts: int, *, top_k: int = 2, sparse_step: int = 2,
                   encoder_sparse_step: int | None = None, decoder_sparse_step: int | None = None,
                   expert_noise: float = 0.0, seed: int = 0):
    """(the upcycled model, the source's model_type), in memory."""
    if expert_noise < 0:
        raise ValueError(f"--expert-noise {expert_noise} must be >= 0")
    fields, dense, source_type = load_dense(dense_dir)
    config = upcycled_config(fields, num_experts, top_k,
                             sparse_step if encoder_sparse_step is None else encoder_sparse_step,
                             sparse_step if decoder_sparse_step is None else decoder_sparse_step)
    return build_model(config, upcycle_state_dict(dense, config, expert_noise=expert_noise, seed=seed)), source_type


def upcycle(dense_dir: str | os.PathLike, output_dir: str | os.PathLike, num_experts: int, *, top_k: int = 2,
            sparse_step: int = 2, encoder_sparse_step: int | None = None, decoder_sparse_step: int | None = None,
            expert_noise: float = 0.0, seed: int = 0, tokenizer: str | os.PathLike | None = None,
            overwrite: bool = False) -> dict:
    """1. checks  2. upcycled model  3. export folder with the source's tokenizer carried over."""
    from ..data.atomic import check_output_dir
    from .export import load_tokenizer, source_generation_config, training_info, write_model_folder

    # 1.
    check_output_dir(str(output_dir), overwrite)
    tok = load_tokenizer(tokenizer or dense_dir, "--tokenizer TOKDIR (the dense model's tokenizer)")
    # 2.
    model, source_type = upcycled_model(dense_dir, num_experts, top_k=top_k, sparse_step=sparse_step,
                                        encoder_sparse_step=encoder_sparse_step,
                                        decoder_sparse_step=decoder_sparse_step, expert_noise=expert_noise, seed=seed)
    # 3.
    layers = list(moe_layers(model.config))
    summary = (f"sparse upcycling of the {source_type} model {dense_dir}: the FFN of layers {', '.join(layers)} "
               f"copied into {num_experts} experts (top-{top_k}), fresh router (seed {seed}), expert noise {expert_noise}")
    info = training_info(dense_dir) if source_type == MoEMTConfig.model_type else {}
    info["derivation"] = [*info.get("derivation", []), {"tool": "upcycle", "summary": summary, "source": str(dense_dir),
                                                        "source_model_type": source_type}]
    generation = source_generation_config(dense_dir) if source_type == MoEMTConfig.model_type else None
    result = write_model_folder(model, tok, output_dir, overwrite=overwrite, info=info, generation_config=generation)
    return {"source": str(dense_dir), "source_model_type": source_type, "num_experts": num_experts, "top_k": top_k,
            "layers": layers, "output": str(result.output_dir), "num_parameters": result.num_parameters,
            "activated_parameters": result.activated_parameters}
