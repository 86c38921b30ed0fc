"""Monolingual text for denoising from Debian fortune files, an explicit opt-in source.

Get them without installing (scripts/fetch_offline_text.sh does this):
`apt-get download fortunes-de fortunes-es fortunes-it fortunes-ru && dpkg-deb -x PKG.deb DIR`; the
files land in DIR/usr/share/games/fortunes/<lang>/. Entries are separated by lines holding "%";
attributions ("-- Author") are dropped, line breaks joined, ASCII art and very long entries skipped.
"""

from __future__ import annotations

import glob
import os
import re

from .cleaning import is_placeholder, normalize_text

_ATTRIBUTION = re.compile(r"^\s*--\s")
_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)
MAX_CHARS = 500


def clean_fortune(entry: str) -> str | None:
    lines = [line for line in entry.splitlines() if not _ATTRIBUTION.match(line)]
    text = normalize_text(" ".join(lines))
    letters = sum(char.isalpha() for char in text)
    if is_placeholder(text) or len(text) > MAX_CHARS or letters < 0.6 * len(text.replace(" ", "")):
        return None
    return text


def read_fortune_file(path: str) -> list[str]:
    """Entries of one fortune file; [] for files that are not UTF-8 (older KOI8-R/Latin-1 copies)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except UnicodeDecodeError:
        return []
    return [text for text in map(clean_fortune, _SEPARATOR.split(content)) if text]


def read_fortunes(root: str, languages: list[str] | None = None) -> dict[str, list[str]]:
    """{language: [deduplicated entries]} from root/**/fortunes/<lang>/<file> (index .dat files and
    symlinks skipped). Languages without fortunes are simply absent: this source is best effort."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"fortunes directory {root} does not exist (see scripts/fetch_offline_text.sh)")
    texts: dict[str, dict[str, None]] = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "fortunes", "*", "*"), recursive=True)):
        language = os.path.basename(os.path.dirname(path))
        if path.endswith(".dat") or os.path.islink(path) or not os.path.isfile(path):
            continue
        if languages is not None and language not in languages:
            continue
        texts.setdefault(language, {}).update(dict.fromkeys(read_fortune_file(path)))
    return {language: list(entries) for language, entries in texts.items()}
