"""Corpus building from user files: counts per language and split, no leakage between splits, cleaning,
caps, monolingual text, atomic output, and the other sources (load_dataset, gettext, fortunes)."""

import json
import os
import struct
from collections import Counter

import datasets
import pytest

from hf_moe_mt.data import build_corpus, load_corpus
from hf_moe_mt.data.cleaning import deduplicate, drop_placeholders, filter_length_ratio, is_placeholder
from hf_moe_mt.data.corpus import BUILD_INFO, pair_counts
from hf_moe_mt.data.fortunes import read_fortunes
from hf_moe_mt.data.gettext_catalogs import clean_ui_string, read_gettext_pairs, read_mo

from .conftest import FIXTURE_LANGUAGES, PAIRS_JSONL, fixture_config


def test_counts_per_language_and_split_add_up(fixture_corpus, fixture_corpus_dir):
    info = json.load(open(os.path.join(fixture_corpus_dir, BUILD_INFO), encoding="utf-8"))
    counts = {split: pair_counts(fixture_corpus[split]) for split in ("train", "validation", "test")}
    assert counts == info["counts"]
    for language in FIXTURE_LANGUAGES:  # 20 pairs per language, none removed, all three splits used
        per_split = [counts[split][f"{language}-en"] for split in ("train", "validation", "test")]
        assert sum(per_split) == 20 and min(per_split) >= 1
    # grouping by the English side: every language holds out the same sentences
    assert len({counts["test"][f"{language}-en"] for language in FIXTURE_LANGUAGES}) == 1
    assert info["pairs_read"] == 140 and info["source"] == {"lines_read": 140, "lines_skipped": 0}


def test_no_sentence_shared_between_train_and_held_out(fixture_corpus):
    def sentences(split):
        rows = fixture_corpus[split][:]
        return set(zip(rows["src_lang"], rows["src_text"])) | set(zip(rows["tgt_lang"], rows["tgt_text"]))

    train = sentences("train")
    assert train and not train & sentences("validation") and not train & sentences("test")
    assert not sentences("validation") & sentences("test")


def test_monolingual_split_is_non_english_train_text(fixture_corpus):
    mono = fixture_corpus["monolingual"][:]
    train = fixture_corpus["train"][:]
    assert Counter(mono["lang"]) == Counter(train["src_lang"])  # 17 per language, English excluded
    assert set(zip(mono["lang"], mono["text"])) == set(zip(train["src_lang"], train["src_text"]))
    assert set(mono["source"]) == {"parallel"}


def test_cleaning_removes_placeholders_ratio_outliers_and_duplicates():
    pairs = {
        "src_lang": ["tr", "tr", "de", "de", "de", "de", "de"],
        "tgt_lang": ["en"] * 7,
        "src_text": ["(aynı)", "Tanrı ışık dedi.", "-", "Guten Morgen.", "Guten Morgen.", "Hallo Welt.", "Ja" * 60],
        "tgt_text": ["God spoke.", "God said light.", "Good night.", "Good morning.", "Good morning.", "Hello world.", "Yes."],
        "ref": list("abcdefg"),
        "group": list("abcdefg"),
    }
    assert is_placeholder("...") and is_placeholder("  ") and is_placeholder("(8:1)") and not is_placeholder("Ja")
    cleaned = deduplicate(filter_length_ratio(drop_placeholders(pairs), max_ratio=2.0))
    assert cleaned["ref"] == ["b", "d", "f"]  # placeholder a/c, duplicate e and the 120:4 ratio g are gone


def test_max_pairs_per_language_caps_train_deterministically(tmp_path):
    first = build_corpus(fixture_config(tmp_path / "a", max_pairs_per_language=5, seed=3))
    again = build_corpus(fixture_config(tmp_path / "b", max_pairs_per_language=5, seed=3))
    other = build_corpus(fixture_config(tmp_path / "c", max_pairs_per_language=5, seed=4))
    assert set(pair_counts(first["train"]).values()) == {5}
    assert first["train"]["ref"][:] == again["train"]["ref"][:] != other["train"]["ref"][:]
    assert len(first["test"]) == 14  # held-out splits are not capped


def test_language_filter_keeps_requested_pairs(tmp_path):
    corpus = build_corpus(fixture_config(tmp_path / "c", languages=["hi", "zh"]))
    assert set(pair_counts(corpus["train"])) == {"hi-en", "zh-en"}


def test_output_is_replaced_only_with_overwrite(tmp_path, fixture_corpus_dir):
    target = tmp_path / "corpus"
    build_corpus(fixture_config(target, languages=["de"]))
    with pytest.raises(ValueError, match="already exists and is not empty; pass --overwrite"):
        build_corpus(fixture_config(target, languages=["fr"]))
    assert set(pair_counts(load_corpus(str(target))["train"])) == {"de-en"}
    build_corpus(fixture_config(target, languages=["fr"], overwrite=True))
    assert set(pair_counts(load_corpus(str(target))["train"])) == {"fr-en"}
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no staging dirs left


def test_failed_build_leaves_no_output(tmp_path):
    with pytest.raises(ValueError):
        build_corpus(fixture_config(tmp_path / "corpus", languages=["xx"]))
    assert os.listdir(tmp_path) == []


def test_hf_source_reads_a_load_dataset_builder(tmp_path):
    corpus = build_corpus(
        fixture_config(tmp_path / "c", source="hf", hf_name="json", inputs=[PAIRS_JSONL], languages=["ru"])
    )
    assert sum(pair_counts(corpus[split])["ru-en"] for split in ("train", "validation", "test")) == 20


def write_mo(path, messages: dict[str, str]) -> None:
    """A GNU .mo catalog (little endian), enough for read_mo: header, two tables, strings."""
    keys = sorted(messages)
    ids = b"".join(key.encode() + b"\0" for key in keys)
    strs = b"".join(messages[key].encode() + b"\0" for key in keys)
    count, start = len(keys), 28 + 16 * len(keys)
    offsets, position = [], start
    for key in keys:
        offsets.append((len(key.encode()), position))
        position += len(key.encode()) + 1
    trans, position = [], start + len(ids)
    for key in keys:
        trans.append((len(messages[key].encode()), position))
        position += len(messages[key].encode()) + 1
    header = struct.pack("<7I", 0x950412DE, 0, count, 28, 28 + 8 * count, 0, 0)
    table = b"".join(struct.pack("<2I", *pair) for pair in offsets + trans)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header + table + ids + strs)


def test_gettext_catalogs_are_read_and_cleaned(tmp_path):
    messages = {"_Open File": "Datei ö_ffnen", "Save": "Speichern", "%s files": "%s Dateien", "Quit": "Quit", "": "x"}
    write_mo(str(tmp_path / "usr/share/locale/de/LC_MESSAGES/app.mo"), messages)
    write_mo(str(tmp_path / "usr/share/locale/de_AT/LC_MESSAGES/app.mo"), {"Save": "Sichern"})
    assert read_mo(str(tmp_path / "usr/share/locale/de/LC_MESSAGES/app.mo"))["Save"] == "Speichern"
    assert clean_ui_string("保存(_S)") == "保存" and clean_ui_string("%d items") is None
    pairs = read_gettext_pairs(str(tmp_path))
    # bare "de" wins over de_AT; placeholders and untranslated entries are dropped
    assert sorted(zip(pairs["src_text"], pairs["tgt_text"])) == [("Datei öffnen", "Open File"), ("Speichern", "Save")]
    with pytest.raises(ValueError, match="unknown language code.*has de"):
        read_gettext_pairs(str(tmp_path), ["fr"])


def test_fortunes_become_monolingual_text(tmp_path, fixture_corpus):
    folder = tmp_path / "usr/share/games/fortunes/de"
    folder.mkdir(parents=True)
    (folder / "sprueche").write_text(
        "Wer rastet, der rostet.\n%\nEin langer\nSpruch über zwei Zeilen.\n\t\t-- Jemand\n%\n  ____\n |____|\n%\n",
        encoding="utf-8",
    )
    (folder / "sprueche.dat").write_bytes(b"\x00\x01binary index")
    (folder.parent / "chinese").write_text("温故而知新。 \x1b[33m -- 孔子\x1b[m\n%\n", encoding="utf-8")  # fortunes-zh layout
    (folder.parent / "startrek").write_text("Live long and prosper.\n%\n", encoding="utf-8")  # English: ignored
    assert read_fortunes(str(tmp_path)) == {
        "de": ["Wer rastet, der rostet.", "Ein langer Spruch über zwei Zeilen."],
        "zh": ["温故而知新。"],
    }
    corpus = build_corpus(fixture_config(tmp_path / "c", languages=["de", "fr"], fortunes_dir=str(tmp_path)))
    mono = corpus["monolingual"][:]
    assert Counter(zip(mono["lang"], mono["source"])) == {("de", "parallel"): 17, ("fr", "parallel"): 17, ("de", "fortunes"): 2}


def test_saved_corpus_round_trips(fixture_corpus_dir, fixture_corpus):
    loaded = load_corpus(fixture_corpus_dir)
    assert isinstance(loaded, datasets.DatasetDict)
    assert set(loaded) == {"train", "validation", "test", "monolingual"}
    assert loaded["train"][:] == fixture_corpus["train"][:]
