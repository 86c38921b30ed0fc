"""Multitask training examples from a corpus: translation in both directions (X→Y and Y→X) and
mBART-style denoising (noised → original), languages sampled ∝ n_l^(1/T), tasks mixed by a ratio.

Sampling is planned up front in numpy (which rows, how often), then `datasets.map` (batched, num_proc,
Arrow-cached next to the corpus) tokenizes and noises. Every random choice of an example is seeded by
(seed, task, example index), so the result is identical for any num_proc or batch size.

Layout of every example (the tokenizer's convention, see tokenization_moe_mt.py):
    input_ids  [__src__] source tokens </s>        labels  [__tgt__] target tokens </s>
For denoising src = tgt = the sentence's language and the source is the noised sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import datasets
import numpy as np

from .corpus import column_list
from .noising import NoiseConfig, mask_spans, permute_sentences
from .sampling import DEFAULT_TEMPERATURE, temperature_probabilities, temperature_sample

TRANSLATION, DENOISING = "translation", "denoising"
_TASK_SEED = {TRANSLATION: 0, DENOISING: 1}


@dataclass
class MultitaskConfig:
    """How many examples, which mix, which noise. `num_examples` defaults to the train pairs times the
    directions (each pair about once per direction, before the denoising share is taken out)."""

    num_examples: int | None = None
    denoising_ratio: float = 0.25  # share of examples from the denoising task (0 = translation only)
    temperature: float = DEFAULT_TEMPERATURE
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    both_directions: bool = True  # translate X→Y and Y→X (else only as stored: src_text → tgt_text)
    max_source_length: int = 256
    max_target_length: int = 256
    seed: int = 0
    num_proc: int | None = None
    batch_size: int = 1000

    def __post_init__(self):
        if not 0.0 <= self.denoising_ratio <= 1.0:
            raise ValueError(f"denoising_ratio must be in [0, 1], got {self.denoising_ratio}")
        if min(self.max_source_length, self.max_target_length) < 3:
            raise ValueError("max_source_length and max_target_length must be >= 3 (language token, text, </s>)")


def example_rng(seed: int, task: str, index: int) -> np.random.Generator:
    """The generator of one example: depends only on (seed, task, index), never on batching or workers."""
    return np.random.default_rng((seed, _TASK_SEED[task], index))


def example_uniforms(seed: int, task: str, indices: list[int]) -> np.ndarray:
    """One uniform [0, 1) per example index, counter-based (SplitMix64 of seed/task/index): the same
    guarantee as example_rng for a single coin flip, vectorised (a Generator per example costs ~20 µs)."""
    z = np.asarray(indices, dtype=np.uint64) + np.uint64(((seed * 2 + _TASK_SEED[task]) << 40) % 2**64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def plan_rows(keys: list[str], num_examples: int, temperature: float, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """Row indices for `num_examples` examples: groups (language pairs or languages) drawn by temperature."""
    keys_array = np.asarray(keys)
    groups = {key: np.flatnonzero(keys_array == key) for key in sorted(set(keys))}
    indices, counts = temperature_sample(groups, num_examples, temperature, np.random.default_rng(seed))
    return np.sort(indices), counts


def encode(tokenizer, texts: list[str], languages: list[str], max_length: int) -> list[list[int]]:
    """`[__lang__] tokens </s>` per text, truncated to max_length, in one fast batch call (no per-row
    switching of the tokenizer's src_lang state)."""
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return with_language(tokenizer, pieces, languages, max_length)


def with_language(tokenizer, pieces: list[list[int]], languages: list[str], max_length: int) -> list[list[int]]:
    lang_ids = tokenizer.lang_code_to_id  # once per batch: the per-call lookup scans all added tokens
    unknown = set(languages) - set(lang_ids)
    if unknown:
        missing = ", ".join(sorted(unknown))
        raise ValueError(f"the tokenizer has no language token for {missing}; retrain it on this corpus")
    eos = tokenizer.eos_token_id
    return [[lang_ids[language], *ids[: max_length - 2], eos] for language, ids in zip(languages, pieces)]


def translation_batch(batch: dict, indices: list[int], tokenizer, config: MultitaskConfig) -> dict:
    """Batched map function: flip direction per example (seeded), tokenize both sides."""
    flip = (example_uniforms(config.seed, TRANSLATION, indices) < 0.5) & config.both_directions
    src_lang = [t if f else s for s, t, f in zip(batch["src_lang"], batch["tgt_lang"], flip)]
    tgt_lang = [s if f else t for s, t, f in zip(batch["src_lang"], batch["tgt_lang"], flip)]
    src_text = [t if f else s for s, t, f in zip(batch["src_text"], batch["tgt_text"], flip)]
    tgt_text = [s if f else t for s, t, f in zip(batch["src_text"], batch["tgt_text"], flip)]
    input_ids = encode(tokenizer, src_text, src_lang, config.max_source_length)
    return {
        "input_ids": input_ids,
        "attention_mask": [[1] * len(ids) for ids in input_ids],
        "labels": encode(tokenizer, tgt_text, tgt_lang, config.max_target_length),
        "task": [TRANSLATION] * len(indices),
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
    }


def denoising_batch(batch: dict, indices: list[int], tokenizer, config: MultitaskConfig) -> dict:
    """Batched map function: permute sentences, tokenize, mask spans; the label is the clean sentence."""
    noise, mask_id = config.noise, tokenizer.mask_token_id
    rngs = [example_rng(config.seed, DENOISING, i) for i in indices]
    permuted = [permute_sentences(text, noise.permute_sentence_ratio, rng) for text, rng in zip(batch["text"], rngs)]
    permuted_ids = tokenizer(permuted, add_special_tokens=False)["input_ids"]
    noised = [
        mask_spans(ids[: config.max_source_length - 2], mask_id, noise.mask_ratio, noise.poisson_lambda, rng)
        for ids, rng in zip(permuted_ids, rngs)
    ]
    input_ids = with_language(tokenizer, noised, batch["lang"], config.max_source_length)
    return {
        "input_ids": input_ids,
        "attention_mask": [[1] * len(ids) for ids in input_ids],
        "labels": encode(tokenizer, batch["text"], batch["lang"], config.max_target_length),
        "task": [DENOISING] * len(indices),
        "src_lang": list(batch["lang"]),
        "tgt_lang": list(batch["lang"]),
    }


def evaluation_batch(batch: dict, indices: list[int], tokenizer, config: MultitaskConfig) -> dict:
    """Batched map function for held-out splits: every pair once in each direction (only as stored when the
    model trains one direction, `config.both_directions=False`), no sampling, plus the raw texts (`tgt_text`
    is the reference for BLEU; decoded labels are NFKC-normalised)."""
    columns = {"src_lang": "tgt_lang", "tgt_lang": "src_lang", "src_text": "tgt_text", "tgt_text": "src_text"}
    if config.both_directions:
        batch = {column: [*batch[column], *batch[other]] for column, other in columns.items()}
        indices = [*indices, *indices]
    examples = translation_batch(batch, indices, tokenizer, replace(config, both_directions=False))
    return {**examples, "src_text": batch["src_text"], "tgt_text": batch["tgt_text"]}


def build_translation_eval_dataset(
    corpus: datasets.DatasetDict, tokenizer, split: str = "validation", config: MultitaskConfig | None = None
) -> datasets.Dataset:
    """`corpus[split]` as translation examples, each pair in both directions exactly once (2 rows per pair; 1 row,
    as stored, when `config.both_directions` is False), in corpus order: the eval_dataset for Seq2SeqTrainer
    and the source/reference texts for BLEU."""
    config = config or MultitaskConfig()
    return _map(corpus[split], evaluation_batch, tokenizer, config, f"{split} examples")


def split_counts(config: MultitaskConfig, num_pairs: int, num_monolingual: int) -> tuple[int, int]:
    """(translation, denoising) example counts for the configured total and ratio."""
    directions = 2 if config.both_directions else 1
    total = config.num_examples if config.num_examples is not None else directions * num_pairs
    num_denoising = round(total * config.denoising_ratio)
    if num_denoising and not num_monolingual:
        raise ValueError("denoising_ratio > 0 needs a 'monolingual' split (hf-moe-mt data build makes one)")
    return total - num_denoising, num_denoising


def _map(dataset: datasets.Dataset, function, tokenizer, config: MultitaskConfig, description: str) -> datasets.Dataset:
    return dataset.map(
        function,
        batched=True,
        batch_size=config.batch_size,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "config": config},
        remove_columns=dataset.column_names,
        num_proc=config.num_proc,
        desc=description,
    )


def build_multitask_dataset(
    corpus: datasets.DatasetDict, tokenizer, config: MultitaskConfig | None = None, split: str = "train"
) -> datasets.Dataset:
    """Tokenized multitask examples (input_ids, attention_mask, labels, task, src_lang, tgt_lang), shuffled.

    1. translation rows: language pairs drawn by temperature from `corpus[split]`
    2. denoising rows: languages drawn by temperature from `corpus["monolingual"]` (train side only)
    3. batched map: direction flip + tokenize / permute + mask + tokenize (num_proc workers, Arrow cache)
    4. concatenate and shuffle with the seed
    """
    config = config or MultitaskConfig()
    pairs = corpus[split]
    monolingual = corpus["monolingual"] if "monolingual" in corpus and config.denoising_ratio > 0 else None
    num_monolingual = len(monolingual) if monolingual is not None else 0
    num_translation, num_denoising = split_counts(config, len(pairs), num_monolingual)
    parts = []
    if num_translation:  # 1
        keys = [f"{s}-{t}" for s, t in zip(column_list(pairs, "src_lang"), column_list(pairs, "tgt_lang"))]
        rows, _ = plan_rows(keys, num_translation, config.temperature, config.seed)
        parts.append(_map(pairs.select(rows), translation_batch, tokenizer, config, "translation examples"))  # 3
    if num_denoising:  # 2
        rows, _ = plan_rows(column_list(monolingual, "lang"), num_denoising, config.temperature, config.seed + 1)
        parts.append(_map(monolingual.select(rows), denoising_batch, tokenizer, config, "denoising examples"))  # 3
    return datasets.concatenate_datasets(parts).shuffle(seed=config.seed)  # 4


def interleave_groups(stream: datasets.IterableDataset, key, counts: dict[str, int], config: MultitaskConfig):
    """One filtered stream per group, interleaved with temperature probabilities; small groups restart
    when exhausted ("all_exhausted"), i.e. they are up-sampled as in the map-style plan."""
    probabilities = temperature_probabilities(counts, config.temperature)
    streams = [stream.filter(lambda row, group=group: key(row) == group) for group in probabilities]
    return datasets.interleave_datasets(
        streams, probabilities=list(probabilities.values()), seed=config.seed, stopping_strategy="all_exhausted"
    )


def build_multitask_stream(
    corpus,
    tokenizer,
    pair_counts: dict[str, int],
    monolingual_counts: dict[str, int] | None = None,
    config: MultitaskConfig | None = None,
    split: str = "train",
) -> datasets.IterableDataset:
    """Streaming variant of build_multitask_dataset for corpora too large to index (an IterableDatasetDict,
    e.g. `load_dataset(..., streaming=True)` or `Dataset.to_iterable_dataset()`): the same example layout
    and map functions, tokenized on the fly; parallelism comes from DataLoader workers, not num_proc.

    `pair_counts` ({"de-en": n, ...}) and `monolingual_counts` ({"de": n, ...}) set the temperature weights
    without a pass over the data (build_info.json of a built corpus has both as "counts"/"monolingual_counts").
    Every group is a filter over the stream, so each group reads the stream once.
    """
    config = config or MultitaskConfig()
    fn_kwargs = {"tokenizer": tokenizer, "config": config}
    pairs = interleave_groups(corpus[split], lambda row: f"{row['src_lang']}-{row['tgt_lang']}", pair_counts, config)
    parts = [pairs.map(translation_batch, batched=True, batch_size=config.batch_size, with_indices=True,
                       fn_kwargs=fn_kwargs, remove_columns=pairs.column_names)]
    if config.denoising_ratio > 0:
        if not monolingual_counts:
            raise ValueError("denoising_ratio > 0 needs monolingual_counts and a 'monolingual' split")
        text = interleave_groups(corpus["monolingual"], lambda row: row["lang"], monolingual_counts, config)
        parts.append(text.map(denoising_batch, batched=True, batch_size=config.batch_size, with_indices=True,
                              fn_kwargs=fn_kwargs, remove_columns=text.column_names))
    if len(parts) == 1:
        return parts[0]
    ratio = config.denoising_ratio
    return datasets.interleave_datasets(
        parts, probabilities=[1 - ratio, ratio], seed=config.seed, stopping_strategy="all_exhausted"
    )
