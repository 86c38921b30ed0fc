"""generation_moe_mt: the n-gram repeat limit bans exactly the tokens that would make an n-gram occur more than
`max_repeats` times (against a brute-force count, and against transformers' no_repeat_ngram_size at 1), and the
model's `generate` applies it from kwargs or from the generation config, saved and loaded."""

import collections

import pytest
import torch
from transformers import GenerationConfig, NoRepeatNGramLogitsProcessor

from hf_moe_mt.generation_moe_mt import NGramRepeatLimitLogitsProcessor

from .conftest import make_model, random_batch


def banned_by_counting(row: list[int], n: int, max_repeats: int) -> set[int]:
    counts = collections.Counter(tuple(row[i:i + n]) for i in range(len(row) - n + 1))
    prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
    return {gram[-1] for gram, count in counts.items() if gram[:-1] == prefix and count >= max_repeats}


def banned(processor, input_ids: torch.Tensor, vocab: int) -> list[set[int]]:
    scores = processor(input_ids, torch.zeros(input_ids.shape[0], vocab))
    return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in scores]


def test_the_third_occurrence_is_banned_and_nothing_else():
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6], [5, 6, 7, 1, 2, 3, 5, 6]])
    assert banned(NGramRepeatLimitLogitsProcessor(3, 2), ids, 10) == [{7}, set()]
    assert banned(NGramRepeatLimitLogitsProcessor(3, 1), ids, 10) == [{7}, {7}]
    assert banned(NGramRepeatLimitLogitsProcessor(3, 3), ids, 10) == [set(), set()]
    assert banned(NGramRepeatLimitLogitsProcessor(3, 1), ids[:, :2], 10) == [set(), set()]  # shorter than n


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("max_repeats", [1, 2, 3])
def test_random_sequences_match_a_brute_force_count(n, max_repeats):
    generator = torch.Generator().manual_seed(n * 10 + max_repeats)
    ids = torch.randint(0, 2, (64, 20), generator=generator)  # 2 tokens: n-grams repeat often
    expected = [banned_by_counting(row, n, max_repeats) for row in ids.tolist()]
    assert banned(NGramRepeatLimitLogitsProcessor(n, max_repeats), ids, 2) == expected
    assert any(expected), "the sequences exercise no ban"


@pytest.mark.parametrize("n", [2, 3])
def test_one_repeat_is_transformers_no_repeat_ngram(n):
    ids = torch.randint(0, 5, (16, 10), generator=torch.Generator().manual_seed(n))
    scores = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    ours = NGramRepeatLimitLogitsProcessor(n, 1)(ids, scores.clone())
    assert torch.equal(ours, NoRepeatNGramLogitsProcessor(n)(ids, scores.clone()))


@pytest.mark.parametrize("args", [(0, 2), (3, 0), (3, 1.5)])
def test_bad_settings_are_refused(args):
    with pytest.raises(ValueError, match="must be a positive integer"):
        NGramRepeatLimitLogitsProcessor(*args)


def most_repeated_trigram(sequences: torch.Tensor) -> int:
    return max(max(collections.Counter(zip(row, row[1:], row[2:])).values()) for row in sequences.tolist())


def test_generate_applies_the_limit_from_kwargs_or_the_generation_config(tmp_path):
    model = make_model().eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2,
                                               pad_token_id=1)
    batch = random_batch()
    search = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=40,
                  min_new_tokens=40, num_beams=2)
    plain = model.generate(**search)
    assert most_repeated_trigram(plain) > 2, "the random model does not loop: the test proves nothing"
    limited = model.generate(**search, max_ngram_repeats=2)
    assert most_repeated_trigram(limited) <= 2
    assert torch.equal(model.generate(**search, max_ngram_repeats=0), plain)
    model.generation_config.max_ngram_repeats, model.generation_config.ngram_repeat_size = 2, 3
    assert torch.equal(model.generate(**search), limited)
    assert torch.equal(model.generate(**search, max_ngram_repeats=0), plain)  # the call overrides the config
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.generation_config.max_ngram_repeats == 2
    assert torch.equal(reloaded.generate(**search), limited)
