"""Export: any training output → one self-contained HF folder (weights, tokenizer, generation config,
model card, remote code) that `from_pretrained` / `pipeline("translation")` / the Hub accept.

Accepted inputs: a folder saved by `save_pretrained` (our Trainer consolidates experts when saving), a
Trainer checkpoint (`checkpoint-N/`, whose weights are already full), or a DeepSpeed engine checkpoint
of an expert-parallel run (`checkpoint-N/global_stepN/` with per-EP-rank expert files), which is
consolidated offline. Output is written to a temporary sibling, verified by reloading, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from ..configuration_moe_mt import MoEMTConfig
from ..modeling_moe_mt import MoEMTForConditionalGeneration
from ..pipeline_moe_mt import MoEMTTranslationPipeline
from .model_card import build_model_card

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    num_parameters: int
    activated_parameters: int


def load_trained_model(checkpoint: str | os.PathLike) -> MoEMTForConditionalGeneration:
    """The full single-device model (all experts) from any of the accepted training outputs."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a model folder or a checkpoint-N directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by save_pretrained or the Trainer")
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32)
    engine_dirs = sorted(path.glob("global_step*"))
    if not engine_dirs:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor a DeepSpeed global_step* directory")
    from ..training.deepspeed_ep import load_full_state_dict  # deepspeed only needed for this input kind

    model = MoEMTForConditionalGeneration(MoEMTConfig.from_pretrained(path))
    model.load_state_dict(load_full_state_dict(path), strict=True)
    return model


def default_generation_config(config: MoEMTConfig, num_beams: int = 4, max_new_tokens: int = 256) -> GenerationConfig:
    """Beam search from `</s>`; the target language is forced per call (`forced_bos_token_id`)."""
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        num_beams=num_beams, max_new_tokens=max_new_tokens, early_stopping=True,
    )


def parameter_counts(model: MoEMTForConditionalGeneration) -> tuple[int, int]:
    """(total, activated per token): an expert tensor counts k/E of its size towards activated."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    activated = total - expert + expert * config.num_experts_per_tok // config.num_experts
    return total, activated


def export_model(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    num_beams: int = 4,
    overwrite: bool = False,
    metrics: dict | None = None,
) -> ExportResult:
    """1. load the full model  2. tokenizer  3. write everything to a temp dir  4. verify  5. rename."""
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} already exists; pass --overwrite to replace it")
    tokenizer_path = Path(tokenizer) if tokenizer else Path(checkpoint)
    if not (tokenizer_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_path}; pass --tokenizer TOKDIR")
    # 1.
    model = load_trained_model(checkpoint)
    # 2.
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}; "
                         "export the tokenizer the model was trained with")
    # Inputs longer than the position table cannot be encoded: the exported tokenizer truncates to it.
    tok.model_max_length = min(tok.model_max_length, model.config.max_position_embeddings)
    model.generation_config = default_generation_config(
        model.config, num_beams=num_beams, max_new_tokens=min(256, model.config.max_position_embeddings - 1))
    total, activated = parameter_counts(model)
    # 3.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        # The pipeline saves model + tokenizer and adds `custom_pipelines` + pipeline_moe_mt.py, so
        # pipeline("translation", model=folder, trust_remote_code=True) works without hf_moe_mt.
        MoEMTTranslationPipeline(model=model, tokenizer=tok).save_pretrained(staging)
        card = build_model_card(model.config, tok, total, activated, metrics=metrics)
        card.save(staging / "README.md")
        if metrics:
            (staging / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        # 4.
        _verify_roundtrip(model, staging)
        # 5.
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(output, total, activated)


def _verify_roundtrip(model: MoEMTForConditionalGeneration, folder: Path) -> None:
    """Reload the written folder and require bit-identical weights (catches partial/mismatched writes)."""
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
    expected, got = model.state_dict(), reloaded.state_dict()
    for name, tensor in expected.items():
        if name not in got or not torch.equal(tensor, got[name]):
            raise RuntimeError(f"export verification failed: {name} differs after reloading {folder}")
