"""`pipeline("translation", src_lang=…, tgt_lang=…)` for seq2seq translation models.

transformers 5 removed the translation task (it raises "The task translation has been removed"). This
flat module brings it back for models whose tokenizer implements `_build_translation_inputs` (ours, NLLB,
M2M100): `import hf_moe_mt` registers it, and exported folders carry it as Hub custom-pipeline code so
`pipeline("translation", model=PATH, trust_remote_code=True)` works without the package. Imports only
transformers and torch (it travels as remote code).
"""

from __future__ import annotations

import torch
from transformers import Pipeline


class MoEMTTranslationPipeline(Pipeline):
    """text or list of texts → [{"translation_text": str}] per input (one dict per returned sequence).

    Call-time or construction-time kwargs: `src_lang`, `tgt_lang` (language codes the tokenizer knows),
    `truncation`, and any `generate` kwarg (`num_beams`, `max_new_tokens`, `num_return_sequences`, …).
    An empty or whitespace-only text translates to "" without running the model: generating from a bare
    language token would invent a sentence.

    Length: unless the call sets `max_new_tokens`/`max_length`, a batch may generate at most
    `max_length_a · source tokens + max_length_b` new tokens (fairseq's `--max-len-a/-b`) when the model's
    generation_config.json holds `max_length_a`/`max_length_b`, and never more than its `max_new_tokens`: a
    translation is about as long as its source, so a decoding loop stops near that length instead of running
    to the global cap.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, src_lang=None, tgt_lang=None, truncation=None,
                             clean_up_tokenization_spaces=None, **generate_kwargs):
        preprocess = {key: value for key, value in
                      (("src_lang", src_lang), ("tgt_lang", tgt_lang), ("truncation", truncation)) if value is not None}
        postprocess = {} if clean_up_tokenization_spaces is None else {
            "clean_up_tokenization_spaces": clean_up_tokenization_spaces}
        return preprocess, generate_kwargs, postprocess

    def __call__(self, inputs, **kwargs):
        """A list of strings gives one result per string (the dict itself when one sequence is returned)."""
        results = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(len(result) == 1 for result in results):
            return [result[0] for result in results]
        return results

    def preprocess(self, text, src_lang=None, tgt_lang=None, truncation=True):
        if not hasattr(self.tokenizer, "_build_translation_inputs"):
            raise ValueError(f"{type(self.tokenizer).__name__} cannot build translation inputs; use a tokenizer "
                             "with language tokens (MoEMTTokenizer, NLLB, M2M100)")
        inputs = self.tokenizer._build_translation_inputs(
            text, return_tensors="pt", src_lang=src_lang, tgt_lang=tgt_lang, truncation=truncation)
        forced = inputs.pop("forced_bos_token_id")
        model_inputs = dict(inputs)
        # One target language per call; kept as [1] tensors so the batch collator can stack them.
        model_inputs["forced_bos_token_id"] = inputs["input_ids"].new_full((1,), int(forced))
        model_inputs["is_empty"] = torch.tensor([not str(text).strip()])
        return model_inputs

    def _forward(self, model_inputs, **generate_kwargs):
        """1. drop the empty rows  2. generate the others (if any)  3. put them back: [B, R, L] output ids,
        padding in the rows of empty inputs (`postprocess` reads `is_empty`, not those ids)."""
        forced = model_inputs.pop("forced_bos_token_id")
        is_empty = model_inputs.pop("is_empty").reshape(-1)  # [B] bool
        batch_size = is_empty.shape[0]
        generate_kwargs.setdefault("forced_bos_token_id", int(forced.reshape(-1)[0]))
        # 1.
        keep = (~is_empty).nonzero().reshape(-1)
        num_sequences = self._num_return_sequences(generate_kwargs)
        pad = self.tokenizer.pad_token_id
        if keep.numel() == 0:
            output_ids = torch.full((batch_size, num_sequences, 1), pad, dtype=torch.long)
            return {"output_ids": output_ids, "is_empty": is_empty}
        # 2.
        kept_inputs = {key: value[keep] if keep.numel() < batch_size else value for key, value in model_inputs.items()}
        self._cap_length(kept_inputs["attention_mask"], generate_kwargs)
        generated = self.model.generate(**kept_inputs, **generate_kwargs)  # [B'·R, L]
        generated = generated.reshape(keep.numel(), -1, generated.shape[-1])  # [B', R, L]
        if keep.numel() == batch_size:
            return {"output_ids": generated, "is_empty": is_empty}
        # 3.
        output_ids = generated.new_full((batch_size, *generated.shape[1:]), pad)
        output_ids[keep.to(generated.device)] = generated
        return {"output_ids": output_ids, "is_empty": is_empty}

    def _cap_length(self, attention_mask: torch.Tensor, generate_kwargs: dict) -> None:
        """Sets `max_new_tokens` from the longest source of the batch (see the class docstring)."""
        if "max_new_tokens" in generate_kwargs or "max_length" in generate_kwargs:
            return
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        scale, offset = getattr(config, "max_length_a", None), getattr(config, "max_length_b", None)
        if scale is None or offset is None:  # not ours: a model without the fields keeps its own settings
            return
        relative = int(scale * int(attention_mask.sum(-1).max()) + offset)
        generate_kwargs["max_new_tokens"] = min(relative, config.max_new_tokens or relative)

    def _num_return_sequences(self, generate_kwargs) -> int:
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        return int(generate_kwargs.get("num_return_sequences") or config.num_return_sequences or 1)

    def postprocess(self, model_outputs, clean_up_tokenization_spaces=False):
        if bool(model_outputs["is_empty"].reshape(-1)[0]):
            return [{"translation_text": ""} for _ in model_outputs["output_ids"][0]]
        return [
            {"translation_text": self.tokenizer.decode(ids, skip_special_tokens=True,
                                                       clean_up_tokenization_spaces=clean_up_tokenization_spaces)}
            for ids in model_outputs["output_ids"][0]
        ]


def register_translation_pipeline() -> None:
    """Make `pipeline("translation")` resolve to MoEMTTranslationPipeline for seq2seq models."""
    from transformers import AutoModelForSeq2SeqLM
    from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

    REMOVED_TASKS.pop("translation", None)
    if PIPELINE_REGISTRY.supported_tasks.get("translation", {}).get("impl") is not MoEMTTranslationPipeline:
        PIPELINE_REGISTRY.register_pipeline("translation", pipeline_class=MoEMTTranslationPipeline,
                                            pt_model=AutoModelForSeq2SeqLM, type="text")
