"""Parallel data from any `datasets.load_dataset(name, config)` source (a Hub dataset when online, or a
local builder such as "json"/"csv" with data_files). Accepts the two common layouts: a `translation`
column of {lang: text} dicts (WMT, OPUS, IWSLT) or src_lang/tgt_lang/src_text/tgt_text columns."""

from __future__ import annotations

import datasets

from .cleaning import empty_pairs
from .files import BadLine, ReadReport, make_pair

_FLAT = ("src_lang", "tgt_lang", "src_text", "tgt_text")


def load_hub_dataset(name: str, config: str | None, split: str, data_files: list[str] | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, config, split=split, data_files=data_files or None)
    except Exception as error:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): {detail}") from None


def _row_pair(row: dict) -> tuple[str, str, str, str]:
    # Arrow unifies a struct column over all rows: absent languages (and absent columns) come back as None
    translation = {code: text for code, text in (row.get("translation") or {}).items() if text is not None}
    if translation:
        if len(translation) != 2:
            raise BadLine('"translation" must map exactly two language codes to texts')
        (src_lang, src_text), (tgt_lang, tgt_text) = translation.items()
        return make_pair(src_lang, tgt_lang, src_text, tgt_text)
    return make_pair(*(row[column] for column in _FLAT))


def read_hub_pairs(
    name: str,
    config: str | None = None,
    split: str = "train",
    data_files: list[str] | None = None,
    skip_bad_lines: bool = False,
) -> tuple[dict[str, list], ReadReport]:
    """Read every row of one split into corpus columns; `ref` is "name:row", `group` left to corpus.py."""
    dataset = load_hub_dataset(name, config, split, data_files)
    if "translation" not in dataset.column_names and not set(_FLAT) <= set(dataset.column_names):
        raise ValueError(
            f"dataset {name!r} has columns {dataset.column_names}; expected a 'translation' column or {list(_FLAT)}"
        )
    if len(dataset) == 0:
        raise ValueError(f"dataset {name!r} split {split!r} is empty")
    pairs, report = empty_pairs(), ReadReport()
    for index, row in enumerate(dataset):
        report.lines_read += 1
        try:
            src_lang, tgt_lang, src, tgt = _row_pair(row)
        except BadLine as error:
            if not skip_bad_lines:
                raise ValueError(f"{name} row {index}: {error}; fix the row or pass --skip-bad-lines") from None
            report.lines_skipped += 1
            continue
        for column, value in zip(_FLAT, (src_lang, tgt_lang, src, tgt)):
            pairs[column].append(value)
        pairs["ref"].append(f"{name}:{index}")
        pairs["group"].append("")  # corpus.py groups by the pivot side
    return pairs, report
