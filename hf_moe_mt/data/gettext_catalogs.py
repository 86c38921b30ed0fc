"""Parallel UI strings from compiled gettext catalogs (`.mo`): English msgid -> translated msgstr.

Catalogs come from Debian packages unpacked without installing (see scripts/fetch_offline_text.sh):
`apt-get download iso-codes util-linux-locales ... && dpkg-deb -x PKG.deb DIR`. Short strings, good for
tokenizer coverage, weak for BLEU. Accelerator marks are removed; entries with format placeholders
(`%s`, `{name}`) or markup are dropped rather than guessed at. Imports only cleaning.py.
"""

from __future__ import annotations

import glob
import os
import re
import struct

from .cleaning import empty_pairs, normalize_text

_ACCELERATOR_SUFFIX = re.compile(r"\s*\(\s*[_&~][^\s)]\s*\)")  # "保存(_S)" -> "保存"
_ACCELERATOR = re.compile(r"[_&~](?=\w)")  # "_File", "&Open", "~Save"
_FORMAT = re.compile(r"%[-+ #0-9.*]*(?:\([\w-]+\))?[hlLqjzt]*[diouxXeEfFgGcrsSpmn%]|\{[\w.:!]*\}|\$\{?\w+\}?|<[^>]*>")


def read_mo(path: str) -> dict[str, str]:
    """Parse a compiled gettext catalog (the GNU .mo layout) into {msgid: msgstr}, UTF-8 only.

    Contexts ("ctx\\x04id") are stripped, plural forms keep their singular; the header (empty msgid) is skipped.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 20:
        raise ValueError(f"{path} is not a gettext .mo catalog (too short)")
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise ValueError(f"{path} is not a gettext .mo catalog (bad magic number)")
    _, count, originals, translations = struct.unpack(order + "4I", data[4:20])
    catalog = {}
    for index in range(count):
        entries = []
        for table in (originals, translations):
            length, offset = struct.unpack(order + "2I", data[table + 8 * index : table + 8 * index + 8])
            entries.append(data[offset : offset + length])
        try:
            msgid, msgstr = (entry.decode("utf-8") for entry in entries)
        except UnicodeDecodeError:
            continue
        msgid = msgid.split("\x04")[-1].split("\x00")[0]
        if msgid:
            catalog[msgid] = msgstr.split("\x00")[0]
    return catalog


def clean_ui_string(text: str) -> str | None:
    """Remove accelerator marks; None for strings that are not plain text (format codes, markup)."""
    if _FORMAT.search(text):
        return None
    return normalize_text(_ACCELERATOR.sub("", _ACCELERATOR_SUFFIX.sub("", text)))


def locale_language(locale: str) -> str:
    """"pt_BR" -> "pt", "sr@latin" -> "sr", "ko.UTF-8" -> "ko"."""
    return re.split(r"[_@.]", locale)[0].lower()


def find_catalogs(root: str) -> dict[str, list[str]]:
    """{language: [.mo paths]} under `root`, one locale variant per language (the bare code if present,
    else the first in sorted order, e.g. zh_CN before zh_TW) so scripts and spellings are not mixed."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"gettext directory {root} does not exist (unpack .deb files with dpkg-deb -x)")
    by_locale: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "LC_MESSAGES", "*.mo"), recursive=True)):
        locale = os.path.basename(os.path.dirname(os.path.dirname(path)))
        by_locale.setdefault(locale, []).append(path)
    chosen: dict[str, str] = {}
    for locale in sorted(by_locale, key=lambda name: (locale_language(name) != name, name)):
        chosen.setdefault(locale_language(locale), locale)
    chosen.pop("en", None)
    if not chosen:
        raise FileNotFoundError(f"no gettext catalogs (*/LC_MESSAGES/*.mo) under {root}")
    return {language: by_locale[locale] for language, locale in chosen.items()}


def read_gettext_pairs(root: str, languages: list[str] | None = None) -> dict[str, list]:
    """(X, en) pairs from every catalog under `root`; `group` is the English string, so one UI string
    lands in the same split for every language."""
    catalogs = find_catalogs(root)
    if languages is not None:
        unknown = [code for code in languages if code not in catalogs]
        if unknown:
            raise ValueError(f"unknown language code(s) {', '.join(unknown)}: {root} has {', '.join(sorted(catalogs))}")
        catalogs = {code: catalogs[code] for code in languages}
    pairs = empty_pairs()
    for language, paths in catalogs.items():
        for path in paths:
            for msgid, msgstr in read_mo(path).items():
                english, translated = clean_ui_string(msgid), clean_ui_string(msgstr)
                if not english or not translated or english.casefold() == translated.casefold():
                    continue
                for column, value in zip(
                    ("src_lang", "tgt_lang", "src_text", "tgt_text", "ref", "group"),
                    (language, "en", translated, english, f"{os.path.basename(path)}:{msgid[:40]}", english),
                ):
                    pairs[column].append(value)
    return pairs
