"""Token batches: every example once per epoch, within the token budget, similar lengths together, the same
number of batches every epoch (exact resume), and a new order every epoch."""

import datasets
import numpy as np
import pytest

from hf_moe_mt.data.batching import TokenBatchSampler, example_lengths, pack_sorted


def _lengths(n=500, seed=0):
    return np.random.default_rng(seed).integers(3, 80, n)


def test_every_example_once_per_epoch_within_the_token_budget():
    lengths = _lengths()
    sampler = TokenBatchSampler(lengths, max_tokens=512, seed=1)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(len(batch) * lengths[batch].max() <= 512 for batch in batches)
        assert len(batches) == len(sampler)


def test_batches_hold_similar_lengths_and_are_nearly_full():
    lengths = _lengths(2000)
    batches = TokenBatchSampler(lengths, max_tokens=1024, seed=0).batches(0)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.95  # < 5 % padding
    assert padded / len(batches) > 0.9 * 1024  # batches are nearly full


def test_a_new_order_every_epoch_and_the_same_order_for_the_same_epoch():
    sampler = TokenBatchSampler(_lengths(), max_tokens=512, seed=3)
    assert sampler.batches(0) != sampler.batches(1)
    sampler.set_epoch(1)
    assert list(iter(sampler)) == TokenBatchSampler(_lengths(), max_tokens=512, seed=3).batches(1)


def test_an_example_longer_than_the_budget_gets_a_batch_of_its_own():
    assert pack_sorted(np.array([2, 3, 50]), max_tokens=8) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBatchSampler([1, 2], max_tokens=0)


def test_lengths_are_the_longer_side_read_from_arrow():
    dataset = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [[1], [2, 3, 4, 5], [6, 7]]})
    assert example_lengths(dataset).tolist() == [3, 4, 2]
    assert example_lengths(dataset.select([2, 0])).tolist() == [2, 3]
