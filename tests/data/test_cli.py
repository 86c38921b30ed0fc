"""`hf-moe-mt data build` / `hf-moe-mt data tokenizer` end to end on the fixture files, and the Arrow cache
of the multitask map on a saved corpus."""

import glob
import os

from transformers import AutoTokenizer

from hf_moe_mt import MoEMTTokenizer
from hf_moe_mt.cli import main
from hf_moe_mt.data import MultitaskConfig, build_multitask_dataset, load_corpus
from hf_moe_mt.data.corpus import pair_counts

from .conftest import PAIRS_JSONL, PAIRS_TSV


def test_build_then_tokenizer_commands(tmp_path, capsys):
    corpus_dir, tokenizer_dir = str(tmp_path / "corpus"), str(tmp_path / "tok")
    code = main(["data", "build", "--source", "jsonl", "--inputs", PAIRS_JSONL, PAIRS_TSV, "--languages", "es,ru,zh",
                 "--max-pairs-per-language", "10", "--output", corpus_dir])
    assert code == 0 and f"built {corpus_dir}" in capsys.readouterr().out
    corpus = load_corpus(corpus_dir)
    assert pair_counts(corpus["train"]) == {"es-en": 10, "ru-en": 10, "zh-en": 10}
    code = main(["data", "tokenizer", "--corpus", corpus_dir, "--output", tokenizer_dir, "--vocab-size", "600"])
    assert code == 0 and "languages en,es,ru,zh" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, src_lang="zh", tgt_lang="en")
    assert isinstance(tokenizer, MoEMTTokenizer) and len(tokenizer) == 600
    assert tokenizer("河流向大海。")["input_ids"][0] == tokenizer.get_lang_id("zh")
    assert main(["data", "tokenizer", "--corpus", corpus_dir, "--output", tokenizer_dir]) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err


def test_data_without_subcommand_prints_help(capsys):
    assert main(["data"]) == 2
    assert "build" in capsys.readouterr().out


def test_multitask_map_is_cached_next_to_a_saved_corpus(fixture_corpus_dir, tokenizer):
    corpus = load_corpus(fixture_corpus_dir)
    config = MultitaskConfig(num_examples=200, denoising_ratio=0.5, seed=1)
    first = build_multitask_dataset(corpus, tokenizer, config)
    cache_files = set(glob.glob(os.path.join(fixture_corpus_dir, "**", "cache-*.arrow"), recursive=True))
    assert cache_files  # Arrow cache written by datasets.map
    again = build_multitask_dataset(load_corpus(fixture_corpus_dir), tokenizer, config)
    assert set(glob.glob(os.path.join(fixture_corpus_dir, "**", "cache-*.arrow"), recursive=True)) == cache_files
    assert again[:] == first[:]
