"""Fixtures for tests/data: the committed multilingual fixture files, a corpus built from them, a tiny
tokenizer trained on it, and an in-memory corpus with deliberately unequal language sizes."""

import os

import datasets
import pytest

from hf_moe_mt.data import CorpusConfig, build_corpus, save_tokenizer, train_tokenizer
from hf_moe_mt.data.corpus import MONOLINGUAL_FEATURES, PAIR_FEATURES

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PAIRS_JSONL = os.path.join(FIXTURES, "pairs.jsonl")  # de fr ru ar hi zh -> en, 20 sentences each
PAIRS_TSV = os.path.join(FIXTURES, "pairs_es.tsv")  # es -> en, the same 20 sentences
FIXTURE_LANGUAGES = ("ar", "de", "es", "fr", "hi", "ru", "zh")
TINY_VOCAB = 700


def fixture_config(output_dir, **overrides) -> CorpusConfig:
    settings = dict(
        output_dir=str(output_dir),
        source="jsonl",
        inputs=[PAIRS_JSONL, PAIRS_TSV],
        validation_fraction=0.15,
        test_fraction=0.15,
    )
    settings.update(overrides)
    return CorpusConfig(**settings)


@pytest.fixture(scope="session")
def fixture_corpus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "fixture"
    build_corpus(fixture_config(path))
    return str(path)


@pytest.fixture(scope="session")
def fixture_corpus(fixture_corpus_dir):
    return datasets.load_from_disk(fixture_corpus_dir)


@pytest.fixture(scope="session")
def tokenizer_dir(fixture_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tok"
    save_tokenizer(train_tokenizer(fixture_corpus, vocab_size=TINY_VOCAB, model_type="bpe"), str(path))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    import hf_moe_mt  # noqa: F401  (registers MoEMTTokenizer)

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _numbered(count: int, sentences: list[str]) -> list[str]:
    """`count` distinct sentences: the fixture sentences cycled, each with its row number appended."""
    return [f"{sentences[i % len(sentences)]} {i}" for i in range(count)]


@pytest.fixture(scope="session")
def unequal_corpus(fixture_corpus):
    """de-en 800 pairs, fr-en 200, ru-en 50; monolingual de 600, fr 150, ru 40 — sizes far apart so
    temperature sampling visibly differs from proportional sampling."""
    train = fixture_corpus["train"][:]
    side = {
        language: [(s, t) for lang, s, t in zip(train["src_lang"], train["src_text"], train["tgt_text"]) if lang == language]
        for language in ("de", "fr", "ru")
    }
    columns = {name: [] for name in PAIR_FEATURES}
    for language, size in {"de": 800, "fr": 200, "ru": 50}.items():
        columns["src_lang"] += [language] * size
        columns["tgt_lang"] += ["en"] * size
        columns["src_text"] += _numbered(size, [s for s, _ in side[language]])
        columns["tgt_text"] += _numbered(size, [t for _, t in side[language]])
        columns["ref"] += [f"{language}:{i}" for i in range(size)]
    monolingual = {"lang": [], "text": [], "source": []}
    for language, size in {"de": 600, "fr": 150, "ru": 40}.items():
        monolingual["lang"] += [language] * size
        monolingual["text"] += _numbered(size, [s for s, _ in side[language]])
        monolingual["source"] += ["parallel"] * size
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(columns, features=PAIR_FEATURES),
            "monolingual": datasets.Dataset.from_dict(monolingual, features=MONOLINGUAL_FEATURES),
        }
    )
