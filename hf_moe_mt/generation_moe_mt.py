"""A decoding guard against loops that still lets a translation repeat a phrase once.

Why: small low-resource models loop ("the land of the land of the land ..."). transformers' `no_repeat_ngram_size`
stops that by forbidding any n-gram a second time, which also forbids the repetitions a correct translation
needs ("the house of God ... the house of his god"): on the Bible dev books a 3-gram ban cost 0.8 BLEU X→en
against no guard at all, while no guard leaves 1-3 % of translations looping. Allowing each n-gram a fixed number of
times (2) keeps the BLEU of no guard and stops every loop (docs/RESULTS.md, "Decoding loops").

Set in `generation_config.json` (`max_ngram_repeats`, `ngram_repeat_size`) or per `generate` call; the model's
`generate` adds the processor. Travels as Hub remote code with the model: imports only torch and transformers.
"""

import torch
from transformers import LogitsProcessor

DEFAULT_NGRAM_SIZE = 3  # word-piece trigrams: the length of the loops seen ("the land of the land of ...")


class NGramRepeatLimitLogitsProcessor(LogitsProcessor):
    """Forbid the token that would make an n-gram of the sequence so far occur more than `max_repeats` times.

    Vectorised over the batch (and beams): one comparison of every n-gram's first n−1 tokens with the sequence's
    last n−1, then the matches' next tokens are counted per row.
    """

    def __init__(self, ngram_size: int, max_repeats: int):
        if not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"ngram_size={ngram_size!r} must be a positive integer (3: word-piece trigrams)")
        if not isinstance(max_repeats, int) or max_repeats < 1:
            raise ValueError(f"max_repeats={max_repeats!r} must be a positive integer (1 is no_repeat_ngram_size)")
        self.ngram_size, self.max_repeats = ngram_size, max_repeats

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.ngram_size
        if input_ids.shape[1] < n:
            return scores
        grams = input_ids.unfold(1, n, 1)  # [B, G, n], every n-gram so far
        suffix = input_ids[:, input_ids.shape[1] - n + 1:]  # [B, n-1], the start of the n-gram being completed
        continues = (grams[:, :, : n - 1] == suffix.unsqueeze(1)).all(dim=-1)  # [B, G]
        seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        seen.scatter_add_(1, grams[:, :, n - 1], continues.to(torch.int32))  # [B, V] times each next token followed
        return scores.masked_fill(seen >= self.max_repeats, -float("inf"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ngram_size={self.ngram_size}, max_repeats={self.max_repeats})"


def ngram_repeat_limit(generate_kwargs: dict, *generation_configs) -> NGramRepeatLimitLogitsProcessor | None:
    """The processor asked for by `generate` kwargs (taken out of them), else by the first generation config that
    sets it (the one passed to `generate`, then the model's); None when `max_ngram_repeats` is unset or 0."""
    settings = {}
    for name, default in (("max_ngram_repeats", None), ("ngram_repeat_size", DEFAULT_NGRAM_SIZE)):
        if name in generate_kwargs:
            settings[name] = generate_kwargs.pop(name)
        else:
            settings[name] = next((getattr(c, name) for c in generation_configs if getattr(c, name, None) is not None),
                                  default)
    if not settings["max_ngram_repeats"]:
        return None
    return NGramRepeatLimitLogitsProcessor(settings["ngram_repeat_size"] or DEFAULT_NGRAM_SIZE,
                                           settings["max_ngram_repeats"])


__all__ = ["DEFAULT_NGRAM_SIZE", "NGramRepeatLimitLogitsProcessor", "ngram_repeat_limit"]
