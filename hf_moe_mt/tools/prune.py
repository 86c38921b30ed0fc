"""`hf-moe-mt prune`: keep the most-used experts of every MoE layer (the paper's expert pruning), or a random
subset as the control, and write a smaller model in export format.

Usage is counted on real data (analyze.py: router top-k choices, padding excluded) or read from an
`hf-moe-mt analyze` result. Each MoE layer keeps its own `keep` experts; router rows and expert weights are
sliced together (experts.py), in ascending expert order. The pruned router's softmax runs over the kept
experts only, so a token whose first choice survives keeps that choice, with its probability renormalised
over the kept experts.

`--per-language` (Koishekenov et al. 2023: language-specific pruning beats global pruning) writes one model per
target language T into OUTPUT/T/: its decoder layers keep the experts most used while decoding into T, its
encoder layers the experts most used on the sources of the directions into T. OUTPUT/T serves exactly those
directions (X→T); OUTPUT/pruning.json lists, per language, the directions and the kept expert ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .analyze import ExpertUsage
from .experts import build_model, config_with, select_experts

BY = ("utilization", "random")


def parse_keep(text: str | float | int, num_experts: int, top_k: int) -> int:
    """Experts to keep per layer: "0.5" or "50%" → a fraction of `num_experts` (rounded, at least 1);
    "4" → exactly 4. Refuses fewer than top-k or more than there are."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            keep = max(1, round(float(value[:-1]) / 100 * num_experts))
        elif "." in value:
            keep = max(1, round(float(value) * num_experts))
        else:
            keep = int(value)
    except ValueError:
        raise ValueError(f"--keep {text!r} is not a fraction (0.5, 50%) or a number of experts (4)") from None
    if not top_k <= keep <= num_experts:
        raise ValueError(f"--keep {text} gives {keep} experts per layer; the model routes top-{top_k} of {num_experts} "
                         f"experts, so keep between {top_k} and {num_experts}")
    return keep


def rank_experts(counts: dict[str, torch.Tensor], keep: int) -> dict[str, list[int]]:
    """Per layer, the `keep` most-chosen experts (ties: lower id first), in ascending id order."""
    kept = {}
    for layer, layer_counts in counts.items():
        order = sorted(range(len(layer_counts)), key=lambda e: (-int(layer_counts[e]), e))
        kept[layer] = sorted(order[:keep])
    return kept


def random_experts(layers: list[str], num_experts: int, keep: int, seed: int) -> dict[str, list[int]]:
    """The control: a seeded random `keep`-subset per layer."""
    generator = torch.Generator().manual_seed(seed)
    return {layer: sorted(torch.randperm(num_experts, generator=generator)[:keep].tolist()) for layer in layers}


def per_language_selection(usage: ExpertUsage, keep: int) -> dict[str, tuple[list[str], dict[str, list[int]]]]:
    """{target language: (directions into it, kept ids per layer)}, from counts of those directions only (encoder
    layers saw their sources, decoder layers the target)."""
    selection = {}
    for target in sorted({d.split("-")[1] for d in usage.counts}):
        directions = sorted(d for d in usage.counts if d.split("-")[1] == target)
        selection[target] = (directions, rank_experts(usage.layer_counts(directions), keep))
    return selection


def pruned_model(model, kept: dict[str, list[int]]):
    """A new model whose MoE layer L holds experts `kept[L]` of `model` (all layers keep the same number)."""
    keep = len(next(iter(kept.values())))
    config = config_with(model.config, num_experts=keep)
    return build_model(config, select_experts(model.state_dict(), model.config, kept))


def load_usage(path: str | os.PathLike) -> ExpertUsage:
    """An ExpertUsage saved by `hf-moe-mt analyze` (expert_usage.json)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"usage file {file} does not exist; write one with `hf-moe-mt analyze`")
    data = json.loads(file.read_text())
    if not {"layers", "num_experts", "counts", "tokens"} <= set(data):
        raise ValueError(f"{file} is not an expert_usage.json written by `hf-moe-mt analyze`")
    return ExpertUsage(data["layers"], data["num_experts"], data["counts"], data["tokens"])


def prune(model_dir: str | os.PathLike, output_dir: str | os.PathLike, keep: str | float | int, *,
          by: str = "utilization", per_language: bool = False, corpus: str | os.PathLike | None = None,
          split: str = "validation", usage: ExpertUsage | str | os.PathLike | None = None,
          max_sentences: int | None = None, batch_size: int = 32, seed: int = 0, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Prune `model_dir` into `output_dir`; returns {kept expert ids per layer (per language), sizes, ...}.

    1. checks that need no weights  2. load model + tokenizer  3. usage (given, or counted on the corpus)
    4. choose the experts  5. write one export folder (or one per target language, in one staged folder)."""
    from ..data.atomic import atomic_directory, check_output_dir
    from .export import load_tokenizer, load_trained_model

    # 1.
    if by not in BY:
        raise ValueError(f"--by {by!r} is not one of {', '.join(BY)}")
    if per_language and by != "utilization":
        raise ValueError("--per-language ranks experts by each language's utilization; drop --by random")
    if by == "utilization" and usage is None and corpus is None:
        raise ValueError("pruning by utilization needs --corpus DIR (usage is counted on it) or --usage FILE")
    check_output_dir(str(output_dir), overwrite)
    # 2.
    model = load_trained_model(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    num_experts = model.config.num_experts
    count = parse_keep(keep, num_experts, model.config.num_experts_per_tok)
    # 3.
    if isinstance(usage, (str, os.PathLike)):
        usage = load_usage(usage)
    if usage is None and corpus is not None:
        usage = usage_on_corpus(model, tokenizer, corpus, split, max_sentences, batch_size, progress)
    if usage is not None and (usage.num_experts != num_experts or usage.layers != _layers(model)):
        raise ValueError(f"the usage counts are for {usage.num_experts} experts in layers {usage.layers}, not this "
                         f"model's {num_experts} in {_layers(model)}; count them on this model")
    # 4.
    if per_language:
        selections = per_language_selection(usage, count)
    elif by == "random":
        selections = {"all": (None, random_experts(_layers(model), num_experts, count, seed))}
    else:
        selections = {"all": (None, rank_experts(usage.layer_counts(), count))}
    # 5.
    report = {"source": str(model_dir), "by": by, "keep": count, "num_experts_before": num_experts,
              "per_language": per_language, "usage_tokens": usage.tokens if usage is not None else None, "models": {}}
    if not per_language:
        report["models"]["all"] = _write(model, tokenizer, Path(output_dir), model_dir, selections["all"], report,
                                         overwrite=overwrite, corpus=corpus, split=split)
        return report
    with atomic_directory(str(output_dir), overwrite) as staging:
        for language, selection in selections.items():
            report["models"][language] = _write(model, tokenizer, Path(staging) / language, model_dir, selection,
                                                report, language=language, corpus=corpus, split=split)
        (Path(staging) / "pruning.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _write(model, tokenizer, folder: Path, model_dir, selection, report: dict, *, language: str | None = None,
           overwrite: bool = False, corpus=None, split: str = "validation") -> dict:
    """One pruned export folder; its training_info.json records the source and the kept experts."""
    from .export import source_generation_config, training_info, write_model_folder

    directions, kept = selection
    where = f" counted on the {split} split of {corpus}" if corpus and report["by"] == "utilization" else ""
    scope = f", for the directions into {language} ({', '.join(directions)})" if language else ""
    summary = (f"kept {report['keep']} of {report['num_experts_before']} experts per MoE layer of {model_dir} by "
               f"{report['by']}{where}{scope}")
    info = training_info(model_dir)
    info["derivation"] = [*info.get("derivation", []), {"tool": "prune", "summary": summary, "kept": kept}]
    result = write_model_folder(pruned_model(model, kept), tokenizer, folder, overwrite=overwrite,
                                generation_config=source_generation_config(model_dir), info=info)
    return {"directions": directions, "kept": kept, "path": str(folder.name if language else folder),
            "num_parameters": result.num_parameters, "activated_parameters": result.activated_parameters}


def usage_on_corpus(model, tokenizer, corpus, split, max_sentences, batch_size, progress) -> ExpertUsage:
    from .analyze import count_expert_usage
    from .evaluate import load_direction_pairs

    codes = getattr(tokenizer, "language_codes", None) or []
    pairs, _ = load_direction_pairs(corpus, split, None, max_sentences, codes)
    return count_expert_usage(model, tokenizer, pairs, batch_size=batch_size, progress=progress)


def _layers(model) -> list[str]:
    from .experts import moe_layers

    return list(moe_layers(model.config))
