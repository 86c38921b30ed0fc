"""Text cleaning and pair filtering shared by every corpus source: normalisation, placeholder removal,
length-ratio filtering, deduplication. Pure Python on column lists; imports nothing from the package."""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import defaultdict

PAIR_COLUMNS = ("src_lang", "tgt_lang", "src_text", "tgt_text", "ref", "group")

_WHITESPACE = re.compile(r"\s+")
# Stand-ins that some Bible versions (and UI catalogs) use for merged or missing text; compared
# after normalisation and casefolding. Anything without a single letter is a placeholder too.
PLACEHOLDERS = frozenset(
    text.casefold()
    for text in (
        "(aynı)",  # Turkish: "(same)", verse merged into a neighbour
        "Verszeile ohne Text",  # Portuguese version, German marker for an empty verse
        "本節欠如",  # Japanese: "this verse is missing"
        "(앞절과 동일)",  # Korean: "(same as the previous verse)"
        "(없음)",  # Korean: "(none)"
        "상동",  # Korean: "ditto"
    )
)


def normalize_text(text: str) -> str:
    """NFC, single spaces, no leading/trailing blanks: the form every source hands to the corpus."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def is_placeholder(text: str) -> bool:
    """True for empty strings, strings without any letter ("-", "...", "(8:1)") and known stand-ins."""
    if text.casefold() in PLACEHOLDERS:
        return True
    return not any(unicodedata.category(char).startswith("L") for char in text)


def empty_pairs() -> dict[str, list]:
    return {column: [] for column in PAIR_COLUMNS}


def select_rows(pairs: dict[str, list], keep: list[bool]) -> dict[str, list]:
    return {column: [value for value, k in zip(values, keep) if k] for column, values in pairs.items()}


def drop_placeholders(pairs: dict[str, list]) -> dict[str, list]:
    keep = [
        not (is_placeholder(src) or is_placeholder(tgt)) for src, tgt in zip(pairs["src_text"], pairs["tgt_text"])
    ]
    return select_rows(pairs, keep)


def filter_length_ratio(pairs: dict[str, list], max_ratio: float = 2.0, max_chars: int = 1000) -> dict[str, list]:
    """Drop pairs whose character-length ratio is off by more than `max_ratio` from the median of their
    language pair, or that are longer than `max_chars`.

    Why relative to the median: scripts differ in characters per word (a Chinese verse is ~1/3 of its
    English character count), so one absolute ratio would either drop all of Chinese or none of German.
    What it catches: merged verses aligned with a single verse, truncated or misaligned lines.
    """
    log_ratio = [
        math.log(len(s) / len(t)) if s and t else math.inf for s, t in zip(pairs["src_text"], pairs["tgt_text"])
    ]
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
    for key, value in zip(zip(pairs["src_lang"], pairs["tgt_lang"]), log_ratio):
        if math.isfinite(value):
            by_pair[key].append(value)
    medians = {key: statistics.median(values) for key, values in by_pair.items()}
    bound = math.log(max_ratio)
    keep = [
        math.isfinite(value)
        and abs(value - medians[key]) <= bound
        and max(len(src), len(tgt)) <= max_chars
        for key, value, src, tgt in zip(
            zip(pairs["src_lang"], pairs["tgt_lang"]), log_ratio, pairs["src_text"], pairs["tgt_text"]
        )
    ]
    return select_rows(pairs, keep)


def deduplicate(pairs: dict[str, list]) -> dict[str, list]:
    """Keep the first occurrence of each (src_lang, tgt_lang, src_text, tgt_text)."""
    seen: set[tuple[str, str, str, str]] = set()
    keep = []
    for key in zip(pairs["src_lang"], pairs["tgt_lang"], pairs["src_text"], pairs["tgt_text"]):
        keep.append(key not in seen)
        seen.add(key)
    return select_rows(pairs, keep)


def remove_overlap(train: dict[str, list], held_out: list[dict[str, list]]) -> dict[str, list]:
    """Drop training pairs with a sentence (either side, matched per language) that occurs in a held-out
    split. Keyed by (language, text) rather than by language pair because the English pivot side is
    shared: a test verse's English must not be seen in training through another language either."""
    seen: set[tuple[str, str]] = set()
    for split in held_out:
        seen.update(zip(split["src_lang"], split["src_text"]))
        seen.update(zip(split["tgt_lang"], split["tgt_text"]))
    keep = [
        (src_lang, src) not in seen and (tgt_lang, tgt) not in seen
        for src_lang, tgt_lang, src, tgt in zip(
            train["src_lang"], train["tgt_lang"], train["src_text"], train["tgt_text"]
        )
    ]
    return select_rows(train, keep)
