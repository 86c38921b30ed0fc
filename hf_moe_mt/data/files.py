"""User parallel data from local files: JSONL and TSV readers with one-line, file:line errors (or
skip-and-count with `skip_bad_lines`). Imports nothing from the package but cleaning.py.

JSONL, one object per line, either
    {"src_lang": "de", "tgt_lang": "en", "src_text": "...", "tgt_text": "...", "group": "doc-17"}
or  {"translation": {"de": "...", "en": "..."}, "group": "doc-17"}          ("group" is optional)
TSV, UTF-8, a header line naming the columns, either
    src_lang<TAB>tgt_lang<TAB>src_text<TAB>tgt_text        (then one pair per line)
or  de<TAB>en                                              (two language codes, then text pairs)
`group` keeps related lines (one document) in the same split; without it, corpus.py groups by the pivot
(English) side, so all translations of one English sentence land in the same split.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .cleaning import empty_pairs, normalize_text

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")
_FULL_HEADER = ["src_lang", "tgt_lang", "src_text", "tgt_text"]


class BadLine(ValueError):
    """A malformed line; the reader adds file and line number."""


@dataclass
class ReadReport:
    lines_read: int = 0
    lines_skipped: int = 0


def check_language_code(code: object) -> str:
    if not isinstance(code, str) or not LANGUAGE_CODE.match(code):
        raise BadLine(f"{code!r} is not a language code (expected ISO 639-1 such as 'de')")
    return code


def make_pair(src_lang, tgt_lang, src_text, tgt_text) -> tuple[str, str, str, str]:
    src_lang, tgt_lang = check_language_code(src_lang), check_language_code(tgt_lang)
    if src_lang == tgt_lang:
        raise BadLine(f"source and target language are both {src_lang!r}")
    texts = []
    for name, text in (("src_text", src_text), ("tgt_text", tgt_text)):
        if not isinstance(text, str) or not normalize_text(text):
            raise BadLine(f"{name} must be a non-empty string")
        texts.append(normalize_text(text))
    return src_lang, tgt_lang, texts[0], texts[1]


def parse_jsonl_line(line: str) -> tuple[tuple[str, str, str, str], str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadLine(f"invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise BadLine("expected a JSON object")
    group = record.get("group")
    if "translation" in record:
        translation = record["translation"]
        if not isinstance(translation, dict) or len(translation) != 2:
            raise BadLine('"translation" must map exactly two language codes to texts')
        (src_lang, src_text), (tgt_lang, tgt_text) = translation.items()
        return make_pair(src_lang, tgt_lang, src_text, tgt_text), group
    missing = [key for key in _FULL_HEADER if key not in record]
    if missing:
        raise BadLine(f"missing key(s) {', '.join(missing)} (or give a \"translation\" object)")
    return make_pair(*(record[key] for key in _FULL_HEADER)), group


def tsv_parser(header: str):
    """Return a function parsing one TSV line, chosen by the header (see the module docstring)."""
    columns = header.rstrip("\r\n").split("\t")
    if columns == _FULL_HEADER:
        return lambda fields: make_pair(*fields), 4
    if len(columns) == 2:
        src_lang, tgt_lang = (check_language_code(code) for code in columns)
        return lambda fields: make_pair(src_lang, tgt_lang, *fields), 2
    raise BadLine(f"the header must be '{chr(9).join(_FULL_HEADER)}' or two language codes, got {header.strip()!r}")


def _iter_records(path: str, fmt: str, report: ReadReport, skip_bad_lines: bool):
    with open(path, encoding="utf-8") as handle:
        lines = enumerate(handle, start=1)
        if fmt == "tsv":
            first = next(lines, None)
            if first is None:
                return
            try:
                parse_fields, width = tsv_parser(first[1])
            except BadLine as error:
                raise ValueError(f"{path}:1: {error}") from None
        for number, line in lines:
            if not line.strip():
                continue
            report.lines_read += 1
            try:
                if fmt == "jsonl":
                    yield (number, *parse_jsonl_line(line))
                    continue
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != width:
                    raise BadLine(f"expected {width} tab-separated fields, got {len(fields)}")
                yield number, parse_fields(fields), None
            except BadLine as error:
                if not skip_bad_lines:
                    raise ValueError(f"{path}:{number}: {error}; fix the line or pass --skip-bad-lines") from None
                report.lines_skipped += 1


def file_format(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if extension in (".tsv", ".tab"):
        return "tsv"
    raise ValueError(f"{path}: unsupported file type {extension or '(none)'!r}; use .jsonl or .tsv")


def read_parallel_files(paths: list[str], skip_bad_lines: bool = False) -> tuple[dict[str, list], ReadReport]:
    """Read pairs from JSONL/TSV files into corpus columns; `ref` is "file:line number"."""
    if not paths:
        raise ValueError("no input files: pass one or more .jsonl/.tsv files with --inputs")
    pairs, report = empty_pairs(), ReadReport()
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist")
        fmt = file_format(path)
        before, skipped_before = len(pairs["src_text"]), report.lines_skipped
        for number, values, group in _iter_records(path, fmt, report, skip_bad_lines):
            for column, value in zip(_FULL_HEADER, values):
                pairs[column].append(value)
            pairs["ref"].append(f"{os.path.basename(path)}:{number}")
            pairs["group"].append("" if group is None else str(group))
        if len(pairs["src_text"]) == before and report.lines_skipped == skipped_before:
            raise ValueError(f"input file {path} is empty: it holds no sentence pairs")
    if not pairs["src_text"]:
        raise ValueError(f"no valid sentence pairs in the input files ({report.lines_skipped} bad lines skipped)")
    return pairs, report
