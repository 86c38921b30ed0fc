"""Multitask examples: temperature sampling frequencies, task ratio, both directions, mBART noise
(ratio, recoverable original), determinism across seeds and num_proc, and the collator."""

from collections import Counter

import numpy as np
import pytest
import torch

from hf_moe_mt.data import MultitaskCollator, MultitaskConfig, NoiseConfig, build_multitask_dataset, temperature_probabilities
from hf_moe_mt.data.collator import shift_tokens_right
from hf_moe_mt.data.multitask import DENOISING, TRANSLATION
from hf_moe_mt.data.noising import mask_spans, permute_sentences, span_lengths, split_sentences
from hf_moe_mt.data.sampling import temperature_sample

SIZES = {"de": 800, "fr": 200, "ru": 50}  # translation pairs in `unequal_corpus`
MONO_SIZES = {"de": 600, "fr": 150, "ru": 40}


def test_temperature_formula():
    probabilities = temperature_probabilities(SIZES, temperature=5.0)
    weights = {language: size ** 0.2 for language, size in SIZES.items()}
    assert probabilities == pytest.approx({k: w / sum(weights.values()) for k, w in weights.items()}, abs=1e-12)
    assert temperature_probabilities(SIZES, 1.0)["de"] == pytest.approx(800 / 1050)
    assert max(temperature_probabilities(SIZES, 1e6).values()) == pytest.approx(1 / 3, abs=1e-4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        temperature_probabilities(SIZES, 0)


def test_sampled_frequencies_match_the_formula():
    groups = {language: np.arange(size) for language, size in SIZES.items()}
    indices, counts = temperature_sample(groups, 30000, 5.0, np.random.default_rng(0))
    expected = temperature_probabilities(SIZES, 5.0)
    for language in SIZES:  # binomial std <= 0.003 at n=30000: 0.01 is > 3 sigma
        assert abs(counts[language] / 30000 - expected[language]) < 0.01
    assert len(indices) == 30000
    ru = np.asarray(indices[-counts["ru"] :])
    assert np.bincount(ru, minlength=50).min() >= counts["ru"] // 50  # up-sampling repeats whole passes


@pytest.fixture(scope="module")
def multitask(unequal_corpus, tokenizer):
    config = MultitaskConfig(num_examples=4000, denoising_ratio=0.3, seed=7)
    return build_multitask_dataset(unequal_corpus, tokenizer, config), config


def test_languages_and_tasks_follow_temperature_and_ratio(multitask):
    dataset, _ = multitask
    rows = dataset[:]
    tasks = Counter(rows["task"])
    assert tasks == {TRANSLATION: 2800, DENOISING: 1200}
    pairs = Counter(frozenset((s, t)) for s, t, task in zip(rows["src_lang"], rows["tgt_lang"], rows["task"]) if task == TRANSLATION)
    expected = temperature_probabilities(SIZES)
    for language in SIZES:  # std of a frequency at n=2800 is <= 0.0095
        assert abs(pairs[frozenset((language, "en"))] / 2800 - expected[language]) < 0.035
    mono = Counter(s for s, task in zip(rows["src_lang"], rows["task"]) if task == DENOISING)
    expected_mono = temperature_probabilities(MONO_SIZES)
    for language in MONO_SIZES:
        assert abs(mono[language] / 1200 - expected_mono[language]) < 0.05
    assert 0.4 < sum(t == "en" for t, task in zip(rows["src_lang"], rows["task"]) if task == TRANSLATION) / 2800 < 0.6


def test_translation_examples_match_the_tokenizer(multitask, unequal_corpus, tokenizer):
    dataset, _ = multitask
    pairs = unequal_corpus["train"][:]
    counterpart = {}  # (language, text, other language) -> other text, for both directions
    for sl, tl, s, t in zip(pairs["src_lang"], pairs["tgt_lang"], pairs["src_text"], pairs["tgt_text"]):
        counterpart[(sl, s, tl)], counterpart[(tl, t, sl)] = t, s
    checked = 0
    for row in dataset.select(range(200)):
        if row["task"] != TRANSLATION:
            continue
        assert row["input_ids"][0] == tokenizer.get_lang_id(row["src_lang"]) and row["input_ids"][-1] == 2
        assert row["labels"][0] == tokenizer.get_lang_id(row["tgt_lang"]) and row["labels"][-1] == 2
        source = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        tokenizer.src_lang, tokenizer.tgt_lang = row["src_lang"], row["tgt_lang"]
        encoded = tokenizer(source, text_target=counterpart[(row["src_lang"], source, row["tgt_lang"])])
        assert (encoded["input_ids"], encoded["labels"]) == (row["input_ids"], row["labels"])
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        checked += 1
    assert checked > 100


def test_denoising_masks_the_configured_share_and_keeps_the_original_as_label(multitask, tokenizer):
    dataset, config = multitask
    masked = total = 0
    for row in dataset.select(range(600)):
        if row["task"] != DENOISING:
            continue
        assert row["src_lang"] == row["tgt_lang"] and row["labels"][0] == tokenizer.get_lang_id(row["src_lang"])
        original = tokenizer.decode(row["labels"], skip_special_tokens=True)
        tokenizer.src_lang, tokenizer.tgt_lang = row["src_lang"], None
        assert tokenizer(text_target=original)["input_ids"] == row["labels"]  # recoverable
        content = row["labels"][1:-1]
        kept = [i for i in row["input_ids"][1:-1] if i != tokenizer.mask_token_id]
        assert Counter(kept) <= Counter(content) and tokenizer.mask_token_id in row["input_ids"]
        masked += len(content) - len(kept)
        total += len(content)
    assert abs(masked / total - config.noise.mask_ratio) < 0.03


def test_same_seed_same_examples_for_any_num_proc(unequal_corpus, tokenizer, multitask):
    dataset, config = multitask
    config_two_workers = MultitaskConfig(num_examples=4000, denoising_ratio=0.3, seed=7, num_proc=2, batch_size=64)
    parallel = build_multitask_dataset(unequal_corpus, tokenizer, config_two_workers)
    assert parallel[:] == dataset[:]
    other = build_multitask_dataset(unequal_corpus, tokenizer, MultitaskConfig(num_examples=4000, denoising_ratio=0.3, seed=8))
    assert other["input_ids"][:50] != dataset["input_ids"][:50]


def test_translation_only_and_one_direction(unequal_corpus, tokenizer):
    config = MultitaskConfig(num_examples=300, denoising_ratio=0.0, both_directions=False)
    rows = build_multitask_dataset(unequal_corpus, tokenizer, config)[:]
    assert set(rows["task"]) == {TRANSLATION} and set(rows["tgt_lang"]) == {"en"} and len(rows["task"]) == 300
    with pytest.raises(ValueError, match="denoising_ratio must be in"):
        MultitaskConfig(denoising_ratio=1.5)


def test_span_masking_unit():
    rng = np.random.default_rng(0)
    tokens = list(range(100, 140))
    noised = mask_spans(tokens, -1, 0.35, 3.5, rng)
    kept = [t for t in noised if t != -1]
    assert len(kept) == 40 - 14 and kept == sorted(kept)  # order preserved, round(0.35 * 40) masked
    lengths = [length for _ in range(300) for length in span_lengths(400, 3.5, rng)[:-1]]
    assert abs(np.mean(lengths) - 3.5) < 0.2  # Poisson(3.5) (zeros lifted to 1 raise the mean by ~0.03)
    assert mask_spans([5, 6], -1, 0.35, 3.5, rng) in ([5, -1], [-1, 6])
    assert mask_spans([5], -1, 0.35, 3.5, rng) == [5]


def test_sentence_permutation_unit():
    rng = np.random.default_rng(1)
    text = "One. Two! Three? Four."
    permuted = permute_sentences(text, 1.0, rng)
    assert sorted(split_sentences(permuted)) == sorted(split_sentences(text)) and permuted != text
    assert permute_sentences("单句。另一句！", 1.0, np.random.default_rng(2)) in ("单句。另一句！", "另一句！单句。")
    assert permute_sentences("No full stop here", 1.0, rng) == "No full stop here"
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        NoiseConfig(mask_ratio=1.0)


def test_collator_pads_labels_with_ignore_index(multitask, tokenizer):
    dataset, _ = multitask
    features = [dataset[i] for i in range(6)]
    batch = MultitaskCollator(tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # string columns dropped
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (6, longest) and batch["labels"].shape[0] == 6
    for row, feature in enumerate(features):
        n, m = len(feature["input_ids"]), len(feature["labels"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["labels"][row, :m].tolist() == feature["labels"] and (batch["labels"][row, m:] == -100).all()
    with_decoder = MultitaskCollator(tokenizer, make_decoder_input_ids=True)(features)
    expected = shift_tokens_right(with_decoder["labels"], tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert torch.equal(with_decoder["decoder_input_ids"], expected)
    assert with_decoder["decoder_input_ids"][0, :2].tolist() == [tokenizer.eos_token_id, features[0]["labels"][0]]


def test_collated_batch_trains_a_tiny_model(multitask, tokenizer):
    from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration
    from hf_moe_mt.modeling_moe_mt import shift_tokens_right as model_shift

    dataset, _ = multitask
    batch = MultitaskCollator(tokenizer)([dataset[i] for i in range(8)])
    config = MoEMTConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                         decoder_ffn_dim=32, expert_ffn_dim=32, num_experts=4)
    model = MoEMTForConditionalGeneration(config)
    output = model(**batch)
    assert torch.isfinite(output.loss) and output.logits.shape[:2] == batch["labels"].shape
    output.loss.backward()
    # the model's own decoder inputs follow the same convention as the collator's option
    ours = shift_tokens_right(batch["labels"], tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert torch.equal(model_shift(batch["labels"], config.pad_token_id, config.decoder_start_token_id), ours)


def test_streaming_variant_samples_by_temperature(unequal_corpus, tokenizer):
    import itertools

    from hf_moe_mt.data.multitask import build_multitask_stream

    stream = {name: split.to_iterable_dataset() for name, split in unequal_corpus.items()}
    pair_counts = {f"{language}-en": size for language, size in SIZES.items()}
    config = MultitaskConfig(denoising_ratio=0.3, seed=3, batch_size=100)
    examples = list(itertools.islice(build_multitask_stream(stream, tokenizer, pair_counts, MONO_SIZES, config), 3000))
    again = list(itertools.islice(build_multitask_stream(stream, tokenizer, pair_counts, MONO_SIZES, config), 3000))
    assert examples == again and len(examples) == 3000
    tasks = Counter(example["task"] for example in examples)
    assert abs(tasks[DENOISING] / 3000 - 0.3) < 0.03
    translation = [e for e in examples if e["task"] == TRANSLATION]
    languages = Counter(e["src_lang"] if e["tgt_lang"] == "en" else e["tgt_lang"] for e in translation)
    expected = temperature_probabilities(SIZES)
    for language in SIZES:
        assert abs(languages[language] / len(translation) - expected[language]) < 0.04
    for example in translation[:50]:
        assert example["input_ids"][0] == tokenizer.get_lang_id(example["src_lang"])
        assert example["labels"][0] == tokenizer.get_lang_id(example["tgt_lang"])


def test_eval_dataset_has_every_pair_once_per_direction(fixture_corpus, tokenizer):
    from hf_moe_mt.data import build_translation_eval_dataset

    split = fixture_corpus["test"][:]
    rows = build_translation_eval_dataset(fixture_corpus, tokenizer, split="test")[:]
    forward = set(zip(split["src_lang"], split["tgt_lang"], split["src_text"], split["tgt_text"]))
    backward = {(tl, sl, t, s) for sl, tl, s, t in forward}
    got = list(zip(rows["src_lang"], rows["tgt_lang"], rows["src_text"], rows["tgt_text"]))
    assert len(got) == 2 * len(forward) and set(got) == forward | backward
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str
    for row in build_translation_eval_dataset(fixture_corpus, tokenizer, split="test"):
        assert row["input_ids"][0] == tokenizer.get_lang_id(row["src_lang"])
        assert row["labels"][0] == tokenizer.get_lang_id(row["tgt_lang"])
        assert tokenizer.decode(row["labels"], skip_special_tokens=True) == normalize(row["tgt_text"])
