"""Build, save and load the parallel corpus: a `datasets.DatasetDict` with splits train / validation /
test (columns src_lang, tgt_lang, src_text, tgt_text, ref) and monolingual (lang, text, source).

The source readers (bible.py, files.py, hub.py, gettext_catalogs.py, fortunes.py) return columns;
this module cleans, splits (held-out groups: whole Bible books), caps, derives the monolingual split
and saves atomically (atomic.py). It imports nothing outside hf_moe_mt.data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np

from . import bible, cleaning
from .atomic import atomic_directory, check_output_dir

SPLITS = ("train", "validation", "test")
PAIR_COLUMNS = ("src_lang", "tgt_lang", "src_text", "tgt_text")
PAIR_FEATURES = datasets.Features({name: datasets.Value("string") for name in (*PAIR_COLUMNS, "ref")})
MONOLINGUAL_FEATURES = datasets.Features({name: datasets.Value("string") for name in ("lang", "text", "source")})
SOURCES = ("bible", "jsonl", "tsv", "gettext", "hf")
BUILD_INFO = "build_info.json"
# For `hf-moe-mt quickstart` (a tiny model trained for minutes on 2 CPU cores): 5,000 train pairs per
# language (50k pairs for the 10 default languages, ~100k multitask examples) are more than it consumes,
# and keep building + tokenising under a minute. The full corpus has ~29.5k pairs per language.
QUICKSTART_MAX_PAIRS_PER_LANGUAGE = 5000


@dataclass
class CorpusConfig:
    """Everything `hf-moe-mt data build` accepts; see commands.py for the help text of each field."""

    output_dir: str
    source: str = "bible"
    languages: list[str] | None = None  # None: bible.DEFAULT_LANGUAGES for the Bible, all found otherwise
    max_pairs_per_language: int | None = None  # cap on train pairs per language pair
    public_domain_only: bool = False
    inputs: list[str] = field(default_factory=list)  # jsonl/tsv files, gettext dirs, or hf data_files
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    fortunes_dir: str | None = None
    skip_bad_lines: bool = False
    max_length_ratio: float = 2.0
    validation_fraction: float = 0.02  # non-Bible sources: share of groups held out per split
    test_fraction: float = 0.02
    pivot_language: str = bible.PIVOT_LANGUAGE  # its side is left out of the monolingual split
    seed: int = 0
    overwrite: bool = False


def read_source(config: CorpusConfig) -> tuple[dict[str, list], dict]:
    """Raw pairs from the configured source, plus facts for build_info.json."""
    if config.source == "bible":
        versions = bible.select_versions(config.languages, config.public_domain_only)
        info = {"versions": {code: asdict(version) for code, version in versions.items()}}
        return bible.read_bible_pairs(config.languages, config.public_domain_only), info
    if config.source in ("jsonl", "tsv"):
        from .files import read_parallel_files

        pairs, report = read_parallel_files(config.inputs, config.skip_bad_lines)
        return pairs, asdict(report)
    if config.source == "gettext":
        from .gettext_catalogs import read_gettext_pairs

        if not config.inputs:
            raise ValueError("--source gettext needs --inputs DIR (unpacked .deb packages with .mo catalogs)")
        parts = [read_gettext_pairs(root, config.languages) for root in config.inputs]
        return {column: sum((part[column] for part in parts), []) for column in parts[0]}, {}
    if config.source == "hf":
        from .hub import read_hub_pairs

        if not config.hf_name:
            raise ValueError("--source hf needs --hf-name NAME (a datasets.load_dataset name, e.g. 'json')")
        pairs, report = read_hub_pairs(
            config.hf_name, config.hf_config, config.hf_split, config.inputs, config.skip_bad_lines
        )
        return pairs, asdict(report)
    raise ValueError(f"unknown source {config.source!r}; choose one of {', '.join(SOURCES)}")


def filter_languages(pairs: dict[str, list], languages: list[str] | None, pivot: str) -> dict[str, list]:
    """Keep pairs whose languages are all requested (or the pivot); unknown codes list the ones present."""
    present = sorted(set(pairs["src_lang"]) | set(pairs["tgt_lang"]))
    if languages is None:
        return pairs
    unknown = [code for code in languages if code not in present]
    if unknown:
        raise ValueError(f"unknown language code(s) {', '.join(unknown)}: the input has {', '.join(present)}")
    wanted = {*languages, pivot}
    keep = [s in wanted and t in wanted for s, t in zip(pairs["src_lang"], pairs["tgt_lang"])]
    return cleaning.select_rows(pairs, keep)


def fill_groups(pairs: dict[str, list], pivot: str) -> dict[str, list]:
    """Rows without a group key are grouped by their pivot-side text (else their source text): every
    translation of one English sentence then shares a split, and no test sentence leaks via another language."""
    groups = [
        group or (tgt if tgt_lang == pivot else src)
        for group, tgt_lang, src, tgt in zip(pairs["group"], pairs["tgt_lang"], pairs["src_text"], pairs["tgt_text"])
    ]
    return {**pairs, "group": groups}


def group_split(group: str, validation_fraction: float, test_fraction: float) -> str:
    """Stable split for a group key (md5, not Python's salted hash): same input, same split, every run."""
    position = int.from_bytes(hashlib.md5(group.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < validation_fraction:
        return "validation"
    if position < validation_fraction + test_fraction:
        return "test"
    return "train"


def split_pairs(pairs: dict[str, list], config: CorpusConfig) -> dict[str, dict[str, list]]:
    """Assign whole groups to splits (Bible: fixed held-out books), then purge train of held-out sentences."""
    if config.source == "bible":
        labels = [bible.bible_split_of(group) for group in pairs["group"]]
    else:
        labels = [group_split(g, config.validation_fraction, config.test_fraction) for g in pairs["group"]]
    splits = {name: cleaning.select_rows(pairs, [label == name for label in labels]) for name in SPLITS}
    splits["train"] = cleaning.remove_overlap(splits["train"], [splits["validation"], splits["test"]])
    return splits


def cap_pairs(pairs: dict[str, list], max_pairs: int | None, rng: np.random.Generator) -> dict[str, list]:
    """At most `max_pairs` rows per language pair: a seeded random subset, kept in corpus order."""
    if max_pairs is None:
        return pairs
    by_pair: dict[tuple[str, str], list[int]] = {}
    for index, key in enumerate(zip(pairs["src_lang"], pairs["tgt_lang"])):
        by_pair.setdefault(key, []).append(index)
    keep = np.zeros(len(pairs["src_lang"]), dtype=bool)
    for key in sorted(by_pair):
        rows = np.asarray(by_pair[key])
        keep[rows if len(rows) <= max_pairs else rng.choice(rows, max_pairs, replace=False)] = True
    return cleaning.select_rows(pairs, keep.tolist())


def monolingual_columns(train: dict[str, list], pivot: str, fortunes_dir: str | None, languages) -> dict[str, list]:
    """Denoising text: every non-pivot side of the training pairs (never a held-out sentence), deduplicated
    per language, plus Debian fortunes when a directory is given."""
    texts: dict[str, dict[str, str]] = {}
    for lang_column, text_column in (("src_lang", "src_text"), ("tgt_lang", "tgt_text")):
        for language, text in zip(train[lang_column], train[text_column]):
            if language != pivot:
                texts.setdefault(language, {}).setdefault(text, "parallel")
    if fortunes_dir is not None:
        from .fortunes import read_fortunes

        wanted = sorted(texts) if languages is None else languages
        for language, entries in read_fortunes(fortunes_dir, wanted).items():
            for text in entries:
                texts.setdefault(language, {}).setdefault(text, "fortunes")
    columns: dict[str, list] = {"lang": [], "text": [], "source": []}
    for language in sorted(texts):
        for text, source in texts[language].items():
            columns["lang"].append(language)
            columns["text"].append(text)
            columns["source"].append(source)
    return columns


def column_list(dataset: datasets.Dataset, name: str) -> list:
    """One column as a Python list in a single Arrow conversion (honours select()/shuffle() indices).
    `dataset[name]` is a lazy Column in datasets>=4 and iterating it row by row is ~100x slower."""
    return dataset.select_columns([name])[:][name]


def pair_counts(split: dict[str, list] | datasets.Dataset) -> dict[str, int]:
    """{"de-en": n, ...} for one split."""
    if isinstance(split, datasets.Dataset):
        split = {name: column_list(split, name) for name in ("src_lang", "tgt_lang")}
    counts = Counter(f"{s}-{t}" for s, t in zip(split["src_lang"], split["tgt_lang"]))
    return dict(sorted(counts.items()))


def clean_pairs(pairs: dict[str, list], max_length_ratio: float) -> tuple[dict[str, list], dict[str, int]]:
    """Placeholders -> length ratio -> exact duplicates; returns the pairs and how many each step removed."""
    removed = {}
    for name, step in (
        ("placeholders", cleaning.drop_placeholders),
        ("length_ratio", lambda p: cleaning.filter_length_ratio(p, max_length_ratio)),
        ("duplicates", cleaning.deduplicate),
    ):
        before = len(pairs["src_text"])
        pairs = step(pairs)
        removed[name] = before - len(pairs["src_text"])
    return pairs, removed


def build_corpus(config: CorpusConfig) -> datasets.DatasetDict:
    """Read -> clean -> split by held-out groups -> cap train -> monolingual -> save (atomically).

    1. read the source (errors name the fix: install command, file:line, available languages)
    2. clean: drop placeholders, off-median length ratios, duplicates
    3. split whole groups (Bible books) into train/validation/test; purge train of held-out sentences
    4. cap train at max_pairs_per_language per language pair (seeded)
    5. monolingual split from the non-pivot train sides (+ fortunes)
    6. save_to_disk into a temp dir with build_info.json, then rename over `output_dir`
    """
    start = time.perf_counter()
    check_output_dir(config.output_dir, config.overwrite)
    pairs, source_info = read_source(config)  # 1
    if config.source != "bible":
        pairs = fill_groups(filter_languages(pairs, config.languages, config.pivot_language), config.pivot_language)
    read_count = len(pairs["src_text"])
    pairs, removed = clean_pairs(pairs, config.max_length_ratio)  # 2
    splits = split_pairs(pairs, config)  # 3
    removed["train_overlap_with_held_out"] = len(pairs["src_text"]) - sum(len(s["src_text"]) for s in splits.values())
    splits["train"] = cap_pairs(splits["train"], config.max_pairs_per_language, np.random.default_rng(config.seed))  # 4
    if not splits["train"]["src_text"]:
        raise ValueError("the corpus is empty after cleaning and splitting; check the input languages and files")
    monolingual = monolingual_columns(  # 5
        splits["train"], config.pivot_language, config.fortunes_dir, config.languages
    )
    corpus = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({c: splits[name][c] for c in PAIR_FEATURES}, features=PAIR_FEATURES)
        for name in SPLITS
    })
    corpus["monolingual"] = datasets.Dataset.from_dict(monolingual, features=MONOLINGUAL_FEATURES)
    info = {
        "config": asdict(config),
        "source": source_info,
        "pairs_read": read_count,
        "removed": removed,
        "held_out_books": bible.HELD_OUT_BOOKS if config.source == "bible" else None,
        "counts": {name: pair_counts(corpus[name]) for name in SPLITS},
        "monolingual_counts": dict(sorted(Counter(monolingual["lang"]).items())),
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    save_corpus(corpus, info, config.output_dir, config.overwrite)  # 6
    return corpus


def save_corpus(corpus: datasets.DatasetDict, info: dict, output_dir: str, overwrite: bool) -> None:
    with atomic_directory(output_dir, overwrite) as staging:
        # an empty split must still get one (empty) shard, or load_from_disk fails on it (datasets 5.2)
        corpus.save_to_disk(staging, num_shards={name: 1 for name, split in corpus.items() if len(split) == 0})
        with open(os.path.join(staging, BUILD_INFO), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2, ensure_ascii=False)


def load_corpus(path: str) -> datasets.DatasetDict:
    """Load a corpus saved by build_corpus, with one-line errors for anything else."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"corpus directory {path} does not exist; build one with: hf-moe-mt data build --output {path}"
        )
    if not os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise ValueError(
            f"{path} is not a saved DatasetDict (no dataset_dict.json); "
            f"build one with: hf-moe-mt data build --output {path}"
        )
    corpus = datasets.load_from_disk(path)
    missing = [name for name in SPLITS if name not in corpus]
    if missing or any(column not in corpus["train"].column_names for column in PAIR_COLUMNS):
        raise ValueError(
            f"{path} is a DatasetDict but not a hf_moe_mt corpus (needs splits {', '.join(SPLITS)} with columns "
            "src_lang, tgt_lang, src_text, tgt_text)"
        )
    return corpus
