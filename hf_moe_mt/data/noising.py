"""mBART-style noise for the denoising task (Liu et al. 2020; BART's DenoisingDataset): sentence
permutation on the text, then span masking on token ids, span lengths ~ Poisson(λ), each span replaced
by ONE <mask> token. Pure Python + numpy; every call takes its own Generator (determinism is the caller's)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# a sentence ends at . ! ? (and the Arabic / Devanagari forms) followed by a space or the end, or at
# the full-width CJK marks, which are not followed by spaces
_SENTENCE = re.compile(r".+?(?:[.!?؟।]+(?=\s|$)|[。！？]+|$)", re.DOTALL)


@dataclass(frozen=True)
class NoiseConfig:
    """mBART's values: 35% of tokens masked, mean span length 3.5, all sentences permuted."""

    mask_ratio: float = 0.35
    poisson_lambda: float = 3.5
    permute_sentence_ratio: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be > 0, got {self.poisson_lambda}")
        if not 0.0 <= self.permute_sentence_ratio <= 1.0:
            raise ValueError(f"permute_sentence_ratio must be in [0, 1], got {self.permute_sentence_ratio}")


def split_sentences(text: str) -> list[str]:
    return [match.group(0).strip() for match in _SENTENCE.finditer(text) if match.group(0).strip()]


def permute_sentences(text: str, ratio: float, rng: np.random.Generator) -> str:
    """Shuffle ceil(ratio · n) of the n sentences among their own positions (BART's permute_sentences)."""
    sentences = split_sentences(text)
    if len(sentences) < 2 or ratio == 0:
        return text
    chosen = rng.choice(len(sentences), math.ceil(len(sentences) * ratio), replace=False)
    order = np.arange(len(sentences))
    order[chosen] = order[rng.permutation(chosen)]
    separator = " " if " " in text else ""  # scripts written without spaces (zh, ja) stay without
    return separator.join(sentences[index] for index in order)


def span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> list[int]:
    """Poisson(λ) lengths (at least 1) until they cover `num_to_mask` tokens; the last one is trimmed."""
    lengths, total = [], 0
    while total < num_to_mask:
        length = max(1, int(rng.poisson(poisson_lambda)))
        lengths.append(min(length, num_to_mask - total))
        total += lengths[-1]
    return lengths


def mask_spans(
    token_ids: list[int], mask_token_id: int, mask_ratio: float, poisson_lambda: float, rng: np.random.Generator
) -> list[int]:
    """Replace round(mask_ratio · n) tokens, in Poisson-length spans at random places, by one mask each.

    The unmasked tokens keep their order, so the original is the label and the model must infill.
    Spans land in distinct gaps between unmasked tokens while there are enough gaps (then they can touch).
    """
    num_to_mask = round(len(token_ids) * mask_ratio)
    if num_to_mask == 0:
        return list(token_ids)
    lengths = span_lengths(num_to_mask, poisson_lambda, rng)
    num_kept = len(token_ids) - num_to_mask
    gaps = np.sort(rng.choice(num_kept + 1, len(lengths), replace=len(lengths) > num_kept + 1))
    rng.shuffle(lengths)
    noised, position, span = [], 0, 0
    for gap in range(num_kept + 1):
        while span < len(lengths) and gaps[span] == gap:  # 1. spans placed before kept token `gap`
            noised.append(mask_token_id)
            position += lengths[span]
            span += 1
        if gap < num_kept:  # 2. the kept token
            noised.append(token_ids[position])
            position += 1
    return noised
