"""Model cards for exported models: huggingface_hub's ModelCard with metadata, rendered from
model_cards/moe_mt.md (packaged copy: hf_moe_mt/tools/moe_mt_card.md)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).with_name("moe_mt_card.md")


def _language_codes(tokenizer) -> list[str]:
    codes = getattr(tokenizer, "language_codes", None)
    return list(codes) if codes else []


def build_model_card(config, tokenizer, num_parameters: int, activated_parameters: int,
                     metrics: dict | None = None) -> ModelCard:
    languages = _language_codes(tokenizer)
    data = ModelCardData(
        language=languages or None,
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="translation",
        tags=["translation", "mixture-of-experts", "moe", "hf_moe_mt", "deepspeed-moe"],
    )
    metric_lines = "\n".join(f"| {name} | {value} |" for name, value in sorted((metrics or {}).items()))
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        languages=", ".join(languages) or "see tokenizer",
        example_src=languages[1] if len(languages) > 1 else "de",
        example_tgt="en" if "en" in languages else (languages[0] if languages else "en"),
        num_parameters=f"{num_parameters:,}",
        activated_parameters=f"{activated_parameters:,}",
        config=config,
        sparse_encoder_layers=config.sparse_layers("encoder"),
        sparse_decoder_layers=config.sparse_layers("decoder"),
        metric_lines=metric_lines,
    )
