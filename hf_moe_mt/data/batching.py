"""Batch samplers that keep padding low: `MaxiBatchSampler` (a fixed number of sentences per batch, sorted
within random pools, Marian's `--maxi-batch`) and `TokenBatchSampler` (batches counted in tokens, fairseq's
`--max-tokens`), which this docstring describes: every optimizer step sees about the same number of target
tokens whatever the sentence lengths, and almost no padding.

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


class MaxiBatchSampler(Sampler[list[int]]):
    """Batches of a fixed number of sentences, each of similar lengths (Marian's `--maxi-batch`): the epoch's
    random order is read `maxi_batch` batches at a time, each such pool is sorted by length and cut into
    batches, and the batches of the whole epoch are shuffled.

    Why: random batches are padded to their longest sentence, which on verse-length text is about twice the
    mean length, so half of every step's compute (GEMMs, attention, dropout masks, the softmax over the
    vocabulary) is spent on padding. Sorting within a pool removes most of it, while every batch still holds
    `batch_size` sentences drawn from a random pool, and the batch order stays random (a global sort, as in
    `TokenBatchSampler`, groups the same sentences every epoch; sweeping each pool long → short in order,
    as transformers' `group_by_length` does, teaches the model a length trend). Deterministic in (seed, epoch)
    with a fixed number of batches, so a resumed run replays the same batches."""

    def __init__(self, lengths, batch_size: int, maxi_batch: int, seed: int = 0, drop_last: bool = False):
        if batch_size <= 0 or maxi_batch <= 0:
            raise ValueError(f"batch_size and maxi_batch must be positive, got {batch_size} and {maxi_batch}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.maxi_batch, self.seed, self.drop_last, self.epoch = (
            batch_size, maxi_batch, seed, drop_last, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.lengths))
        pool_size = self.batch_size * self.maxi_batch
        batches = []
        for start in range(0, len(order), pool_size):
            pool = order[start:start + pool_size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size
        pools, last = divmod(len(self.lengths), self.batch_size * self.maxi_batch)
        return pools * self.maxi_batch + -(-last // self.batch_size)


def length_batch_sampler(dataset, batch_size: int, *, max_tokens: int | None, maxi_batch: int | None, seed: int,
                         drop_last: bool = False) -> TokenBatchSampler | MaxiBatchSampler | None:
    """The batch sampler that `data.max_tokens` (token batches) or `data.maxi_batch` (length-sorted pools of
    `batch_size` sentences) ask for, or None for plain shuffled batches. One place decides, so the trainer and
    scripts that replay its batches cut the same ones."""
    if max_tokens is not None:
        return TokenBatchSampler(example_lengths(dataset), max_tokens, seed=seed)
    if maxi_batch is not None:
        return MaxiBatchSampler(example_lengths(dataset), batch_size, maxi_batch, seed=seed, drop_last=drop_last)
    return None


__all__ = ["MaxiBatchSampler", "TokenBatchSampler", "example_lengths", "length_batch_sampler", "pack_sorted"]
