"""MoEMTTokenizer: the fast tokenizer of hf_moe_mt models, with one special token per language.

Flat module shipped as Hub remote code: imports only `tokenizers` and `transformers`, nothing from
hf_moe_mt. Training a tokenizer lives in hf_moe_mt/data/tokenizer_training.py.

Conventions (the same as M2M100 / NLLB, so `generate` and `Seq2SeqTrainer` work unchanged):
  source        `__de__ x1 … xn </s>`          tokenizer(text), prefix set by `src_lang`
  labels        `__en__ y1 … ym </s>`          tokenizer(text_target=…), prefix set by `tgt_lang`
  decoder input `</s> __en__ y1 … ym`          the model's shift_tokens_right(labels), decoder_start_token_id = eos
  generation    starts from `</s>`; `forced_bos_token_id` = id of `__en__` forces the language first.
Language tokens are written `__xx__` with the ISO 639-1 code (M2M100's format): short, unambiguous,
and impossible to produce by accident from ordinary text. `src_lang`/`tgt_lang` accept "de" or "__de__".
"""

from __future__ import annotations

import re

from tokenizers import processors
from transformers import PreTrainedTokenizerFast

_LANGUAGE_TOKEN = re.compile(r"^__([a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?)__$")


def language_token(code: str) -> str:
    """"de" -> "__de__" (tokens pass through unchanged)."""
    return code if _LANGUAGE_TOKEN.match(code) else f"__{code}__"


class MoEMTTokenizer(PreTrainedTokenizerFast):
    """Unigram/BPE tokenizer with byte fallback and language tokens; see the module docstring for the
    sequence layout. Build one with `hf-moe-mt data tokenizer`; load it with `AutoTokenizer.from_pretrained`.

    Example:
        tok = AutoTokenizer.from_pretrained(path, src_lang="de", tgt_lang="en")
        batch = tok(["Guten Morgen!"], text_target=["Good morning!"])   # input_ids, attention_mask, labels
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, *args, src_lang: str | None = None, tgt_lang: str | None = None, **kwargs):
        super().__init__(*args, src_lang=src_lang, tgt_lang=tgt_lang, **kwargs)
        if not self.language_codes:
            raise ValueError("this tokenizer has no language tokens (__xx__); train it with `hf-moe-mt data tokenizer`")
        default = "en" if "en" in self.language_codes else self.language_codes[0]
        self.tgt_lang = tgt_lang
        self.src_lang = src_lang or default  # validates and sets the `[__src__] … </s>` layout

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # tokenizer.json holds the whole pipeline (normalizer, pre-tokenizer, byte-fallback decoder);
        # load it as is rather than letting the base class rebuild a backend from the extracted vocab.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    # ---- languages -------------------------------------------------------------------------------
    @property
    def language_codes(self) -> list[str]:
        """ISO codes that have a language token, in id order."""
        tokens = sorted(self.added_tokens_encoder.items(), key=lambda item: item[1])
        return [match.group(1) for token, _ in tokens if (match := _LANGUAGE_TOKEN.match(token))]

    @property
    def lang_code_to_id(self) -> dict[str, int]:
        return {code: self.convert_tokens_to_ids(language_token(code)) for code in self.language_codes}

    def _check_language(self, code: str) -> str:
        code = _LANGUAGE_TOKEN.match(code).group(1) if _LANGUAGE_TOKEN.match(code) else code
        if code not in self.language_codes:
            raise ValueError(f"unknown language {code!r}; this tokenizer knows {', '.join(self.language_codes)}")
        return code

    def get_lang_id(self, code: str) -> int:
        """Id of the language token, e.g. for `generate(forced_bos_token_id=tok.get_lang_id("fr"))`."""
        return self.convert_tokens_to_ids(language_token(self._check_language(code)))

    @property
    def src_lang(self) -> str:
        return self._src_lang

    @src_lang.setter
    def src_lang(self, code: str) -> None:
        self._src_lang = self._check_language(code)
        self.set_src_lang_special_tokens(self._src_lang)

    @property
    def tgt_lang(self) -> str | None:
        return self._tgt_lang

    @tgt_lang.setter
    def tgt_lang(self, code: str | None) -> None:
        self._tgt_lang = None if code is None else self._check_language(code)

    # ---- special-token layout ------------------------------------------------------------------------
    def _set_language_prefix(self, code: str) -> None:
        """`[__xx__] tokens </s>` through the backend post-processor (one place for both modes)."""
        token = language_token(code)
        self.cur_lang_code = self.convert_tokens_to_ids(token)
        self.prefix_tokens, self.suffix_tokens = [self.cur_lang_code], [self.eos_token_id]
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=[token, "$A", self.eos_token],
            pair=[token, "$A", "$B", self.eos_token],
            special_tokens=[(token, self.cur_lang_code), (self.eos_token, self.eos_token_id)],
        )

    def set_src_lang_special_tokens(self, src_lang: str) -> None:
        self._set_language_prefix(self._check_language(src_lang))

    def set_tgt_lang_special_tokens(self, tgt_lang: str) -> None:
        self._set_language_prefix(self._check_language(tgt_lang))

    def _switch_to_input_mode(self):
        return self.set_src_lang_special_tokens(self.src_lang)

    def _switch_to_target_mode(self):
        # no tgt_lang: the target is in the source language (denoising, paraphrase)
        return self.set_tgt_lang_special_tokens(self.tgt_lang or self.src_lang)

    def _build_translation_inputs(
        self, raw_inputs, return_tensors: str | None, src_lang: str | None, tgt_lang: str | None, **extra_kwargs
    ):
        """Called by a translation pipeline: encode in `src_lang` and force `tgt_lang` as the first token."""
        if src_lang is None or tgt_lang is None:
            raise ValueError("translation with this model needs both `src_lang` and `tgt_lang` (e.g. 'de', 'en')")
        self.src_lang = src_lang
        inputs = self(raw_inputs, add_special_tokens=True, return_tensors=return_tensors, **extra_kwargs)
        inputs["forced_bos_token_id"] = self.get_lang_id(tgt_lang)
        return inputs


MoEMTTokenizer.register_for_auto_class("AutoTokenizer")
