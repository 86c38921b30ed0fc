"""Export: any training output → one self-contained HF folder (weights, tokenizer, generation config, model card,
training_info.json, remote code) that `from_pretrained` / `pipeline("translation")` / the Hub accept.

Accepted inputs: a folder saved by `save_pretrained` (our Trainer consolidates experts when saving), a Trainer
checkpoint (`checkpoint-N/`, whose weights are already full), or a DeepSpeed engine checkpoint of an
expert-parallel run (`checkpoint-N/global_stepN/` with per-EP-rank expert files), which is consolidated offline.
`write_model_folder` is the one writer of that folder format (prune, merge and upcycle use it too): it stages
everything in a temporary sibling, verifies by reloading, then renames, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

from ..configuration_moe_mt import MoEMTConfig
from ..generation_moe_mt import DEFAULT_NGRAM_SIZE, NGramRepeatLimitLogitsProcessor
from ..modeling_moe_mt import MoEMTForConditionalGeneration
from ..moe import SparseMoE
from ..pipeline_moe_mt import MoEMTTranslationPipeline
from .model_card import build_model_card, check_metrics, check_model_card, read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TRAINING_INFO = "training_info.json"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    num_parameters: int
    activated_parameters: int


# --------------------------------------------------------------------------- reading inputs

def check_model_config(path: Path) -> dict:
    """config.json of a hf_moe_mt model, or a one-line error naming what the folder holds instead."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by save_pretrained or the Trainer")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({error}); the checkpoint is corrupt") from None
    if config.get("model_type") != MoEMTConfig.model_type:
        hint = " (turn it into one with `hf-moe-mt upcycle`)" if config.get("model_type") == "m2m_100" else ""
        raise ValueError(f"{path} holds a {config.get('model_type')!r} model, not a {MoEMTConfig.model_type!r} one"
                         f"{hint}")
    return config


def check_weight_files(path: Path) -> None:
    """Every safetensors file the folder names opens and covers its header (catches truncated or overwritten
    files and missing shards before loading, with the file named)."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    for name in names:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file} is missing; copy the whole checkpoint folder")
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(f"weight file {file} is truncated or corrupt ({error}); copy or save the checkpoint "
                             "again") from None


def load_trained_model(checkpoint: str | os.PathLike) -> MoEMTForConditionalGeneration:
    """The full single-device fp32 model (all experts) from any of the accepted training outputs."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a model folder or a checkpoint-N directory")
    check_model_config(path)
    if any((path / name).is_file() for name in WEIGHT_FILES):
        check_weight_files(path)
        return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32)
    engine_dirs = sorted(path.glob("global_step*"))
    if not engine_dirs:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor a DeepSpeed global_step* directory")
    from ..training.deepspeed_ep import load_full_state_dict  # deepspeed only needed for this input kind

    model = MoEMTForConditionalGeneration(MoEMTConfig.from_pretrained(path))
    model.load_state_dict(load_full_state_dict(path), strict=True)
    return model


def load_tokenizer(path: str | os.PathLike, what: str = "--tokenizer TOKDIR"):
    """The tokenizer saved in `path` (ours has tokenizer.json; M2M100/NLLB ones may be sentencepiece-only)."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer in {folder}; pass {what}")
    return AutoTokenizer.from_pretrained(folder)


def training_info(checkpoint: str | os.PathLike, corpus: str | os.PathLike | None = None) -> dict:
    """What the card reports, from the checkpoint's own training_info.json (an exported or derived model) or
    from the `hf-moe-mt train` output directory around it: corpus build_info.json, train_config.json,
    train_summary.json. `corpus` overrides where the corpus is looked for."""
    path = Path(checkpoint)
    info = read_json(path / TRAINING_INFO) or {}
    run_dir = path.parent
    train_config = read_json(run_dir / "train_config.json")
    if train_config and "train_config" not in info:
        info["train_config"] = train_config
    summary = read_json(run_dir / "train_summary.json")
    if summary and "train_summary" not in info:
        info["train_summary"] = summary
    corpus_dir = Path(corpus) if corpus else _corpus_of_run(run_dir, train_config)
    if corpus is not None and not (corpus_dir / "build_info.json").is_file():
        raise FileNotFoundError(f"{corpus_dir} has no build_info.json; pass a corpus from `hf-moe-mt data build`")
    if corpus_dir is not None and (corpus is not None or "corpus" not in info):
        built = read_json(corpus_dir / "build_info.json")
        if built:
            info["corpus"] = built
    return info


def _corpus_of_run(run_dir: Path, train_config: dict | None) -> Path | None:
    configured = ((train_config or {}).get("data") or {}).get("corpus")
    candidate = Path(configured) if configured else run_dir / "corpus"
    return candidate if (candidate / "build_info.json").is_file() else None


# --------------------------------------------------------------------------- writing the folder

def default_generation_config(config: MoEMTConfig, num_beams: int = 4, max_new_tokens: int = 256,
                              max_ngram_repeats: int = 2, no_repeat_ngram_size: int = 0) -> GenerationConfig:
    """Beam search from `</s>`; the target language is forced per call (`forced_bos_token_id`).

    `max_ngram_repeats=2` (each word-piece 3-gram at most twice; the model's `generate` reads it, see
    generation_moe_mt.py) stops the decoding loops of small low-resource models ("the land of the land of the
    land ...") and still lets a translation repeat a phrase: on the Bible dev books it scored 0.8-1.4 BLEU above
    transformers' `no_repeat_ngram_size=3` (docs/RESULTS.md). 0 turns either off."""
    if max_ngram_repeats:  # refuse a bad value here, not at the first translation
        NGramRepeatLimitLogitsProcessor(DEFAULT_NGRAM_SIZE, max_ngram_repeats)
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        num_beams=num_beams, max_new_tokens=max_new_tokens, early_stopping=True,
        no_repeat_ngram_size=no_repeat_ngram_size or None,
        **({"max_ngram_repeats": max_ngram_repeats, "ngram_repeat_size": DEFAULT_NGRAM_SIZE} if max_ngram_repeats
           else {}),
    )


def source_generation_config(model_dir: str | os.PathLike) -> GenerationConfig | None:
    """The generation defaults a derived model (pruned, merged) inherits from its source folder, if it has any."""
    path = Path(model_dir)
    return GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None


def parameter_counts(model: MoEMTForConditionalGeneration) -> tuple[int, int]:
    """(total, activated per token): an expert tensor counts k/E of its size towards activated."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    activated = total - expert + expert * config.num_experts_per_tok // config.num_experts
    return total, activated


def cast_for_export(model: MoEMTForConditionalGeneration, dtype: str) -> MoEMTForConditionalGeneration:
    """`model` in the export dtype; routers stay fp32 (as `from_pretrained(dtype=bf16)` keeps them)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
    model = model.to(EXPORT_DTYPES[dtype])
    for module in model.modules():
        if isinstance(module, SparseMoE):
            module.gate.float()
    return model


def write_model_folder(model: MoEMTForConditionalGeneration, tokenizer, output_dir: str | os.PathLike, *,
                       overwrite: bool = False, generation_config: GenerationConfig | None = None,
                       info: dict | None = None, metrics: dict | None = None, license: str | None = None,
                       dtype: str = "fp32", max_shard_size: str | int = "5GB") -> ExportResult:
    """Write `model` (cast to `dtype` in place) and `tokenizer` as an export folder at `output_dir`.

    1. generation config, tokenizer length limit, dtype  2. stage: model + tokenizer + pipeline code, card,
    training_info.json, eval results  3. verify by reloading (weights bit-identical, card parses)  4. rename."""
    from ..data.atomic import atomic_directory

    output = Path(output_dir)
    # 1.
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; export the tokenizer the model was trained with")
    # Inputs longer than the position table cannot be encoded: the exported tokenizer truncates to it.
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    model.generation_config = generation_config or default_generation_config(
        model.config, max_new_tokens=min(256, model.config.max_position_embeddings - 1))
    model = cast_for_export(model.eval(), dtype)
    total, activated = parameter_counts(model)
    with atomic_directory(str(output), overwrite) as staging:
        staging = Path(staging)
        # 2. The pipeline saves model + tokenizer and adds `custom_pipelines` + pipeline_moe_mt.py, so
        # pipeline("translation", model=folder, trust_remote_code=True) works without hf_moe_mt.
        MoEMTTranslationPipeline(model=model, tokenizer=tokenizer).save_pretrained(staging, max_shard_size=max_shard_size)
        card = build_model_card(model.config, tokenizer, total, activated, metrics=metrics, info=info,
                                license=license, model_name=output.name)
        card.save(staging / "README.md")
        (staging / TRAINING_INFO).write_text(json.dumps(info or {}, indent=1, ensure_ascii=False, default=str) + "\n")
        if metrics:
            (staging / "eval_results.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
        # 3.
        _verify_roundtrip(model, staging)
        check_model_card(staging / "README.md", metrics)
    return ExportResult(output, total, activated)


def _verify_roundtrip(model: MoEMTForConditionalGeneration, folder: Path) -> None:
    """Reload the written folder and require bit-identical weights (catches partial/mismatched writes)."""
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype="auto")
    expected, got = model.state_dict(), reloaded.state_dict()
    for name, tensor in expected.items():
        if name not in got or got[name].dtype != tensor.dtype or not torch.equal(tensor, got[name]):
            raise RuntimeError(f"export verification failed: {name} differs after reloading {folder}")


def export_model(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    num_beams: int = 4,
    max_ngram_repeats: int = 2,
    no_repeat_ngram_size: int = 0,
    overwrite: bool = False,
    metrics: dict | None = None,
    corpus: str | os.PathLike | None = None,
    license: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    average_last: int = 1,
) -> ExportResult:
    """1. every check that needs no weights  2. load the full model and tokenizer  3. write the folder.

    `average_last=N > 1` exports the mean of the run's N newest checkpoints up to `checkpoint` (tools/average.py)."""
    from ..data.atomic import check_output_dir
    from .average import average_checkpoints, checkpoints_to_average

    # 1.
    check_output_dir(str(output_dir), overwrite)
    averaged = checkpoints_to_average(checkpoint, average_last) if average_last != 1 else None
    if averaged:
        checkpoint = averaged[-1]
    tokenizer_path = Path(tokenizer) if tokenizer else Path(checkpoint)
    if not (tokenizer_path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_path}; pass --tokenizer TOKDIR")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
    check_metrics(metrics)
    info = training_info(checkpoint, corpus)
    if averaged:
        names = [path.name for path in averaged]
        info["derivation"] = [*info.get("derivation", []), {
            "tool": "export --average-last", "summary": f"weights are the mean of {len(names)} checkpoints "
            f"({', '.join(names)})", "checkpoints": names}]
    # 2.
    model = average_checkpoints(averaged) if averaged else load_trained_model(checkpoint)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    generation = default_generation_config(model.config, num_beams=num_beams, max_ngram_repeats=max_ngram_repeats,
                                           no_repeat_ngram_size=no_repeat_ngram_size,
                                           max_new_tokens=min(256, model.config.max_position_embeddings - 1))
    # 3.
    return write_model_folder(model, tok, output_dir, overwrite=overwrite, generation_config=generation, info=info,
                              metrics=metrics, license=license, dtype=dtype, max_shard_size=max_shard_size)
