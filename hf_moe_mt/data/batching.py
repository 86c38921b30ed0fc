"""Batches counted in tokens, of sentences of similar length (fairseq's `--max-tokens`): every optimizer
step sees about the same number of target tokens whatever the sentence lengths, and almost no padding.

    sampler = TokenBatchSampler(example_lengths(train), max_tokens=4096, seed=0)
    DataLoader(train, batch_sampler=sampler, collate_fn=collator)   # MoESeq2SeqTrainer(max_tokens=...) does this

Plan of one epoch (a pure function of (seed, epoch), so a resumed run replays the same batches):
1. sort the examples by length, breaking ties at random: sentences of one length are mixed anew every epoch
2. cut the sorted order greedily into batches with (batch size × longest length) ≤ max_tokens
3. shuffle the order of the batches
The lengths' multiset never changes, so step 2 yields the same NUMBER of batches every epoch: the Trainer's
steps-per-epoch (and the batches it skips when resuming mid-epoch) stay exact.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from torch.utils.data import Sampler


def example_lengths(dataset, columns=("input_ids", "labels")) -> np.ndarray:
    """max over `columns` of each example's token count, read from Arrow without decoding rows."""
    table = dataset.with_format("arrow")[:]
    lengths = [pc.list_value_length(table[column]).to_numpy(zero_copy_only=False) for column in columns]
    return np.maximum.reduce(lengths).astype(np.int64)


def pack_sorted(lengths_in_order: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) slices of an ascending length sequence such that (end - start) × lengths[end-1] ≤ max_tokens."""
    bounds, start = [], 0
    for position, length in enumerate(lengths_in_order):
        if (position + 1 - start) * length > max_tokens and position > start:
            bounds.append((start, position))
            start = position
    if len(lengths_in_order) > start:
        bounds.append((start, len(lengths_in_order)))
    return bounds


class TokenBatchSampler(Sampler[list[int]]):
    """Yields lists of example indices; see the module docstring. `max_tokens` bounds padded tokens of the
    longer side (source or target) per batch; an example longer than `max_tokens` gets a batch of its own."""

    def __init__(self, lengths, max_tokens: int, seed: int = 0, shuffle: bool = True):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_tokens, self.seed, self.shuffle, self.epoch = max_tokens, seed, shuffle, 0
        self._num_batches = len(pack_sorted(np.sort(self.lengths), max_tokens))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in the order they are yielded (steps 1-3 of the module docstring)."""
        rng = np.random.default_rng((self.seed, epoch))
        ties = rng.random(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = np.lexsort((ties, self.lengths))  # 1. by length, then by the random tie-breaker
        bounds = pack_sorted(self.lengths[order], self.max_tokens)  # 2.
        batch_order = rng.permutation(len(bounds)) if self.shuffle else range(len(bounds))  # 3.
        return [order[bounds[i][0]:bounds[i][1]].tolist() for i in batch_order]

    def __iter__(self):
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        return self._num_batches


__all__ = ["TokenBatchSampler", "example_lengths", "pack_sorted"]
