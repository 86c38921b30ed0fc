"""Batch collation for Seq2SeqTrainer: pad inputs with pad_token_id and labels with -100 (ignored by the
loss). decoder_input_ids are the model's job (MoEMTForConditionalGeneration shifts labels right with
decoder_start_token_id = eos, as M2M100/NLLB do); `make_decoder_input_ids=True` builds them here instead.

A thin layer over transformers' DataCollatorForSeq2Seq that drops the string metadata columns
(task, src_lang, tgt_lang) the multitask dataset carries, so `remove_unused_columns=False` works too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DataCollatorForSeq2Seq

MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """[B, S] labels -> [B, S] decoder inputs: start token, then labels[:, :-1], -100 replaced by pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


@dataclass
class MultitaskCollator(DataCollatorForSeq2Seq):
    """`MultitaskCollator(tokenizer)` -> dict of [B, S] tensors: input_ids, attention_mask (0 on padding),
    labels (-100 on padding); plus decoder_input_ids when `make_decoder_input_ids` (start token =
    `decoder_start_token_id`, default tokenizer.eos_token_id)."""

    decoder_start_token_id: int | None = None
    make_decoder_input_ids: bool = False
    padding: bool | str = "longest"
    label_pad_token_id: int = -100
    return_tensors: str = "pt"

    def __call__(self, features: list[dict], return_tensors=None) -> dict[str, torch.Tensor]:
        features = [{key: feature[key] for key in MODEL_COLUMNS if key in feature} for feature in features]
        batch = super().__call__(features, return_tensors="pt")
        if self.make_decoder_input_ids and "labels" in batch and "decoder_input_ids" not in batch:
            start = self.decoder_start_token_id
            if start is None:
                start = self.tokenizer.eos_token_id
            batch["decoder_input_ids"] = shift_tokens_right(batch["labels"], self.tokenizer.pad_token_id, start)
        return batch
