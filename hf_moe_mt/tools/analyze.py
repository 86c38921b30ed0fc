"""Router analytics: how often each expert of each MoE layer is chosen on real data, per translation direction.

Counting runs the model teacher-forced over corpus pairs (source → reference) with every MoE layer dropless,
so a count is the router's own top-k choice, never a capacity decision; padding is never routed. Encoder
layers see the source language and decoder layers the target language, so per-language views group encoder
counts by source and decoder counts by target. `hf-moe-mt prune` ranks experts with these counts;
`hf-moe-mt analyze` writes them as JSON and per-layer heatmaps:

    expert_usage.json    counts per direction and layer (what `prune --usage` reads), fractions per layer and
                         per language, balance statistics (normalised entropy, load CV, unused experts)
    expert_usage.png     every MoE layer: a languages × experts heatmap of each language's share of choices
    heatmaps/LAYER.png   the same, one file per layer
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling_moe_mt import dropless_routing
from .evaluate import encode_pairs
from .experts import moe_layers


@dataclass
class ExpertUsage:
    """counts[direction][layer] = [E] (token, expert) choices; tokens[direction] = real tokens seen per stack.

    `direction` is "src-tgt" (e.g. "de-en"), `layer` "encoder.1" / "decoder.3" (0-based layer index)."""

    layers: list[str]
    num_experts: int
    counts: dict[str, dict[str, list[int]]]
    tokens: dict[str, dict[str, int]]

    def layer_counts(self, directions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """[E] counts per layer summed over `directions` (all by default)."""
        chosen = list(self.counts) if directions is None else directions
        return {layer: torch.tensor([self.counts[d][layer] for d in chosen], dtype=torch.long).sum(0)
                if chosen else torch.zeros(self.num_experts, dtype=torch.long) for layer in self.layers}

    def by_language(self) -> dict[str, dict[str, torch.Tensor]]:
        """{language: {layer: [E]}}: encoder layers counted where the language is the source, decoder layers
        where it is the target (each stack sees only that side)."""
        languages = sorted({part for d in self.counts for part in d.split("-")})
        view = {}
        for language in languages:
            as_source = [d for d in self.counts if d.split("-")[0] == language]
            as_target = [d for d in self.counts if d.split("-")[1] == language]
            source_counts, target_counts = self.layer_counts(as_source), self.layer_counts(as_target)
            view[language] = {layer: (source_counts if layer.startswith("encoder") else target_counts)[layer]
                              for layer in self.layers}
        return view

    def to_dict(self) -> dict:
        return {"layers": self.layers, "num_experts": self.num_experts, "counts": self.counts, "tokens": self.tokens}


@torch.no_grad()
def count_expert_usage(model, tokenizer, pairs: dict[tuple[str, str], tuple[list[str], list[str]]], *,
                       batch_size: int = 32, max_length: int | None = None, progress: bool = True) -> ExpertUsage:
    """Expert choices of every MoE layer over `pairs` ({(src, tgt): (sources, references)}), teacher-forced.

    1. per direction, batches of (source, reference): tokenised with the direction's language tokens
    2. forward with router info, every MoE layer dropless, decoder padding masked
    3. add each layer's tokens_per_expert to the direction's counts."""
    from tqdm.auto import tqdm

    layers = list(moe_layers(model.config))
    if not layers:
        raise ValueError("the model has no MoE layers (encoder_sparse_step = decoder_sparse_step = 0)")
    limit = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts, tokens = {}, {}
    total = sum(len(sources) for sources, _ in pairs.values())
    try:
        with tqdm(total=total, desc="expert usage", unit="pair", disable=not progress) as bar, dropless_routing(model):
            for (src_lang, tgt_lang), (sources, references) in pairs.items():
                direction = f"{src_lang}-{tgt_lang}"
                counts[direction] = {layer: [0] * model.config.num_experts for layer in layers}
                tokens[direction] = {"encoder": 0, "decoder": 0}
                for start in range(0, len(sources), batch_size):
                    # 1.
                    batch = encode_pairs(tokenizer, src_lang, tgt_lang, sources[start:start + batch_size],
                                         references[start:start + batch_size], limit, model.config)
                    batch.pop("labels")
                    # 2.
                    outputs = model(**{key: value.to(device) for key, value in batch.items()},
                                    output_router_logits=True, use_cache=False)
                    # 3.
                    infos = (*outputs.encoder_router_info, *outputs.decoder_router_info)
                    for layer, info in zip(layers, infos):
                        counts[direction][layer] = [a + int(b) for a, b in
                                                    zip(counts[direction][layer], info.tokens_per_expert.tolist())]
                    tokens[direction]["encoder"] += int(batch["attention_mask"].sum())
                    tokens[direction]["decoder"] += int(batch["decoder_attention_mask"].sum())
                    bar.update(len(batch["input_ids"]))
    finally:
        model.train(was_training)
    return ExpertUsage(layers, model.config.num_experts, counts, tokens)


# --------------------------------------------------------------------------- `hf-moe-mt analyze`: JSON + heatmaps

USAGE_FILE, OVERVIEW_PLOT, HEATMAP_DIR = "expert_usage.json", "expert_usage.png", "heatmaps"


def usage_fractions(counts: torch.Tensor) -> list[float]:
    """Share of the (token, expert) choices each expert got; zeros when nothing was counted."""
    total = int(counts.sum())
    return [int(c) / total if total else 0.0 for c in counts]


def layer_statistics(counts: torch.Tensor) -> dict:
    """Balance of one layer: normalised entropy (1 = perfectly balanced), coefficient of variation of the
    counts, and how many experts got no token at all."""
    fractions = torch.tensor(usage_fractions(counts), dtype=torch.float64)
    nonzero = fractions[fractions > 0]
    entropy = float(-(nonzero * nonzero.log()).sum() / math.log(len(fractions))) if len(fractions) > 1 else 1.0
    mean = counts.double().mean()
    cv = float(counts.double().std(unbiased=False) / mean) if mean > 0 else 0.0
    return {"normalized_entropy": entropy, "load_cv": cv, "unused_experts": int((counts == 0).sum())}


def usage_report(usage: ExpertUsage, model_dir, corpus_dir, split: str) -> dict:
    """expert_usage.json: the raw counts (prune --usage reads them), fractions per layer overall and per
    language (encoder layers by source, decoder layers by target language), and balance statistics."""
    totals = usage.layer_counts()
    by_language = usage.by_language()
    return {
        **usage.to_dict(), "model": str(model_dir), "corpus": str(corpus_dir), "split": split,
        "fractions": {layer: usage_fractions(counts) for layer, counts in totals.items()},
        "statistics": {layer: layer_statistics(counts) for layer, counts in totals.items()},
        "fractions_by_language": {language: {layer: usage_fractions(counts) for layer, counts in layers.items()}
                                  for language, layers in by_language.items()},
    }


def plot_layer(axis, report: dict, layer: str) -> None:
    """Heatmap of one layer: languages × experts, each row the language's share of choices per expert."""
    languages = list(report["fractions_by_language"])
    rows = [report["fractions_by_language"][language][layer] for language in languages]
    image = axis.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0)
    role = "source" if layer.startswith("encoder") else "target"
    axis.set_title(f"{layer} (rows: {role} language)", fontsize=9)
    axis.set_yticks(range(len(languages)), languages, fontsize=8)
    axis.set_xlabel("expert", fontsize=8)
    axis.figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)


def plot_usage(report: dict, output: Path) -> None:
    """expert_usage.png (every MoE layer side by side) and heatmaps/LAYER.png (one per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    columns = min(len(layers), 3)
    rows = -(-len(layers) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 0.35 * len(report["fractions_by_language"])
                                                        * rows + 1.6 * rows), squeeze=False)
    for axis, layer in zip(axes.flat, layers):
        plot_layer(axis, report, layer)
    for axis in list(axes.flat)[len(layers):]:
        axis.axis("off")
    figure.suptitle(f"expert usage per language: {Path(report['model']).name}, {report['split']} split")
    figure.tight_layout()
    figure.savefig(output / OVERVIEW_PLOT, dpi=120)
    plt.close(figure)
    (output / HEATMAP_DIR).mkdir()
    for layer in layers:
        figure, axis = plt.subplots(figsize=(4.8, 0.35 * len(report["fractions_by_language"]) + 1.6))
        plot_layer(axis, report, layer)
        figure.tight_layout()
        figure.savefig(output / HEATMAP_DIR / f"{layer}.png", dpi=120)
        plt.close(figure)


def default_output_dir(model_dir, split: str) -> Path:
    """`MODEL-usage-SPLIT` next to the model folder."""
    model = Path(model_dir).resolve()
    return model.with_name(f"{model.name}-usage-{split}")


def analyze(model_dir, corpus_dir, *, split: str = "validation", directions: list[tuple[str, str]] | None = None,
            max_sentences: int | None = None, batch_size: int = 32, output_dir=None, overwrite: bool = False,
            progress: bool = True) -> dict:
    """1. model, tokenizer and the split's direction pairs  2. count  3. report + heatmaps, written atomically."""
    from ..data.atomic import atomic_directory, check_output_dir
    from .evaluate import load_direction_pairs
    from .export import load_tokenizer, load_trained_model

    output = Path(output_dir) if output_dir is not None else default_output_dir(model_dir, split)
    check_output_dir(str(output), overwrite)
    # 1.
    model = load_trained_model(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    pairs, skipped = load_direction_pairs(corpus_dir, split, directions, max_sentences,
                                          getattr(tokenizer, "language_codes", None) or [])
    # 2.
    usage = count_expert_usage(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    # 3.
    report = {**usage_report(usage, model_dir, corpus_dir, split), "skipped_directions": skipped}
    with atomic_directory(str(output), overwrite) as staging:
        (Path(staging) / USAGE_FILE).write_text(json.dumps(report, indent=1) + "\n")
        plot_usage(report, Path(staging))
    report["output"] = str(output)
    return report
