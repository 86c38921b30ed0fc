"""Token batches and maxi-batches: every example once per epoch, within the token budget or in fixed-size
batches, similar lengths together, the same number of batches every epoch (exact resume), and a new order
every epoch."""

import datasets
import numpy as np
import pytest

from hf_moe_mt.data.batching import MaxiBatchSampler, TokenBatchSampler, example_lengths, pack_sorted


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


# ------------------------------------------------------------------------------------------- MaxiBatchSampler


def _verse_lengths(n=4000, seed=0):
    """Skewed like verse lengths in tokens: mean about 40, a long tail to 128."""
    return np.clip(np.random.default_rng(seed).lognormal(3.5, 0.5, n), 3, 128).astype(np.int64)


@pytest.mark.parametrize("n, batch_size, maxi_batch, drop_last", [(1000, 64, 16, False), (1000, 64, 16, True),
                                                                  (64 * 16, 64, 16, False), (50, 64, 4, False),
                                                                  (999, 7, 3, True)])
def test_maxi_batches_hold_every_example_once_in_fixed_size_batches(n, batch_size, maxi_batch, drop_last):
    lengths = _verse_lengths(n)
    sampler = MaxiBatchSampler(lengths, batch_size, maxi_batch, seed=3, drop_last=drop_last)
    for epoch in range(2):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler)
        sizes = sorted(len(batch) for batch in batches)
        assert sizes[1:] == [batch_size] * (len(batches) - 1) and 0 < sizes[0] <= batch_size
        seen = sorted(i for batch in batches for i in batch)
        if drop_last:
            assert sizes[0] == batch_size and len(seen) == n // batch_size * batch_size
            assert len(set(seen)) == len(seen)
        else:
            assert seen == list(range(n))


def test_maxi_batches_cut_padding_and_keep_a_random_batch_order():
    lengths = _verse_lengths(20000)  # 313 batches: a correlation of chance stays well below 0.2
    batches = MaxiBatchSampler(lengths, 64, 16, seed=0).batches(0)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(lengths)), len(batches))
    random_padded = sum(len(b) * lengths[b].max() for b in random_batches)
    assert lengths.sum() / padded > 0.85  # < 15 % padding ...
    assert lengths.sum() / random_padded < 0.5  # ... where random batches of 64 waste more than half
    # batch order is not a length sweep: mean length against position in the epoch is uncorrelated
    means = np.array([lengths[b].mean() for b in batches])
    assert abs(np.corrcoef(np.arange(len(means)), means)[0, 1]) < 0.2
    steps = np.sign(np.diff(means))
    assert 0.3 < (steps > 0).mean() < 0.7  # neither long → short nor short → long runs


def test_maxi_batches_are_fixed_by_seed_and_epoch_and_change_with_the_epoch():
    lengths = _verse_lengths(1000)
    sampler = MaxiBatchSampler(lengths, 32, 8, seed=5)
    assert sampler.batches(1) == MaxiBatchSampler(lengths, 32, 8, seed=5).batches(1)
    assert sampler.batches(0) != sampler.batches(1)
    assert sampler.batches(0) != MaxiBatchSampler(lengths, 32, 8, seed=6).batches(0)
    # a pool is drawn at random: the same sentences are not batched together again next epoch
    together = {frozenset(batch) for batch in sampler.batches(0)}
    assert not together & {frozenset(batch) for batch in sampler.batches(1)}


def test_maxi_batch_arguments_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        MaxiBatchSampler([3, 4], batch_size=0, maxi_batch=4)
