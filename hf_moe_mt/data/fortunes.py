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

_ATTRIBUTION = re.compile(r"^\s*--\s")  # an attribution line: "\t\t-- Author"
_INLINE_ATTRIBUTION = re.compile(r"\s+--\s[^-]{1,60}$")  # "text -- Author" on the last line (fortunes-zh)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes (fortunes-zh)
# fortunes-zh installs into the shared top-level directory (where the English files live) instead of a
# per-language subdirectory: its files are recognised by name
_TOP_LEVEL_FILES = {"chinese": "zh", "tang300": "zh", "song100": "zh"}
_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)
MAX_CHARS = 500


def clean_fortune(entry: str) -> str | None:
    lines = [line for line in _ANSI.sub("", entry).splitlines() if not _ATTRIBUTION.match(line)]
    text = _INLINE_ATTRIBUTION.sub("", normalize_text(" ".join(lines)))
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
    """{language: [deduplicated entries]} from root/**/fortunes/<lang>/<file> and the fortunes-zh files in
    root/**/fortunes/ (index .dat files and symlinks skipped). Languages without fortunes are simply
    absent: this source is best effort."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"fortunes directory {root} does not exist (see scripts/fetch_offline_text.sh)")
    texts: dict[str, dict[str, None]] = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "fortunes", "*"), recursive=True)):
        nested = os.path.isdir(path)
        for file in sorted(glob.glob(os.path.join(path, "*"))) if nested else [path]:
            if file.endswith(".dat") or os.path.islink(file) or not os.path.isfile(file):
                continue
            language = os.path.basename(path) if nested else _TOP_LEVEL_FILES.get(os.path.basename(file))
            if language is not None and (languages is None or language in languages):
                texts.setdefault(language, {}).update(dict.fromkeys(read_fortune_file(file)))
    return {language: list(entries) for language, entries in texts.items()}
