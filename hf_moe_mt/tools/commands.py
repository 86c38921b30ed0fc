"""`hf-moe-mt export`, `translate`, `evaluate` and `quickstart`: argparse over tools/."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="consolidate a training output into a self-contained HF folder")
    export.add_argument("--checkpoint", required=True, help="save_pretrained folder, checkpoint-N, or DeepSpeed run")
    export.add_argument("--output", required=True, help="folder to write (atomically)")
    export.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's own)")
    export.add_argument("--average-last", type=int, default=1, metavar="N",
                        help="export the mean weights of the run's N newest checkpoints up to --checkpoint "
                        "(a checkpoint-K folder or the run directory); default 1: no averaging")
    export.add_argument("--num-beams", type=int, default=4, help="default beams in generation_config.json")
    export.add_argument("--max-ngram-repeats", type=int, default=2,
                        help="default in generation_config.json: no word-piece 3-gram more than this many times in a "
                        "translation, the loop guard (0: off)")
    export.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="default in generation_config.json: transformers' stricter guard, no n-gram of this size "
                        "twice (0: off)")
    export.add_argument("--metrics", help="evaluation.json from `hf-moe-mt evaluate`: model-index + table in the card")
    export.add_argument("--corpus", help="corpus the model was trained on, for the card's training-data section "
                        "(default: the one of the training run around --checkpoint)")
    export.add_argument("--license", help="Hub licence id for the card (default: what the training data allows)")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (routers stay fp32)")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB (default 5GB)")
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hub repository")
    export.add_argument("--private", action="store_true", help="create the Hub repository as private")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=run_export)

    translate = subparsers.add_parser("translate", help="translate lines with pipeline('translation'); BLEU if refs")
    translate.add_argument("--model", required=True, help="exported model folder")
    translate.add_argument("--src", required=True, help="source language code, e.g. de")
    translate.add_argument("--tgt", required=True, help="target language code, e.g. en")
    translate.add_argument("--input", default="-", help="file with one sentence per line (default: stdin)")
    translate.add_argument("--references", help="reference file, one line per input line: print sacrebleu BLEU")
    translate.add_argument("--num-beams", type=int, default=None, help="default: the model's generation_config.json")
    translate.add_argument("--batch-size", type=int, default=16)
    translate.add_argument("--max-new-tokens", type=int, default=None,
                           help="default: the model's generation_config.json")
    translate.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                           help="bfloat16: faster beam search on GPUs and on CPUs with native bf16 (AVX512-BF16, "
                           "AMX); auto: bfloat16 on a CUDA GPU with bf16 and on a CPU whose bf16 probe (the one "
                           "training.bf16: auto uses) found bf16 GEMMs faster, else float32")
    translate.set_defaults(func=run_translate)

    evaluate = subparsers.add_parser(
        "evaluate", help="BLEU/chrF (sacrebleu) per direction of a corpus split: JSON + Markdown table + bar chart")
    evaluate.add_argument("model", metavar="MODEL", help="exported model folder (with its tokenizer)")
    evaluate.add_argument("--corpus", required=True, help="corpus directory from `hf-moe-mt data build`")
    evaluate.add_argument("--split", default="test", help="corpus split to translate (default: test)")
    evaluate.add_argument("--directions", help="comma-separated SRC-TGT list, e.g. de-en,en-de (default: every "
                          "direction of the split, both ways around the pivot)")
    evaluate.add_argument("--max-sentences", type=int, help="first N pairs of each direction (default: all)")
    evaluate.add_argument("--num-beams", type=int, default=None, help="default: the model's generation_config.json")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="default: the model's generation_config.json")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                          help="as for translate; the report records the dtype decoding ran in")
    evaluate.add_argument("--device", help="torch device for translation, e.g. cuda:0 (default: CPU)")
    evaluate.add_argument("--output", help="folder to write (default: MODEL-eval-SPLIT next to the model)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    evaluate.set_defaults(func=run_evaluate)

    from .quickstart import add_quickstart_parser

    add_quickstart_parser(subparsers)


def run_export(args) -> int:
    from .export import export_model

    metrics = _read_json(args.metrics) if args.metrics else None
    if args.private and not args.push_to_hub:
        raise ValueError("--private applies to --push-to-hub REPO; add the repository to push to")
    result = export_model(args.checkpoint, args.output, args.tokenizer, num_beams=args.num_beams,
                          max_ngram_repeats=args.max_ngram_repeats, no_repeat_ngram_size=args.no_repeat_ngram_size,
                          overwrite=args.overwrite, metrics=metrics, corpus=args.corpus, license=args.license,
                          dtype=args.dtype, max_shard_size=args.max_shard_size, average_last=args.average_last)
    print(f"exported {result.output_dir} ({result.num_parameters:,} parameters, "
          f"{result.activated_parameters:,} activated per token)")
    if args.push_to_hub:
        from .publish import push_folder

        print(f"pushed to {push_folder(result.output_dir, args.push_to_hub, private=args.private)}")
    return 0


def run_translate(args) -> int:
    from .scoring import corpus_bleu
    from .translate import load_translator, translate

    lines = _read_lines(args.input)
    translator = load_translator(args.model, args.src, args.tgt, batch_size=args.batch_size, dtype=args.dtype)
    hypotheses = translate(translator, lines, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    for hypothesis in hypotheses:
        print(hypothesis)
    if args.references:
        print(corpus_bleu(hypotheses, _read_lines(args.references), args.tgt), file=sys.stderr)
    return 0


def run_evaluate(args) -> int:
    from .evaluate import default_output_dir, evaluate_model, markdown_table, parse_directions

    output = args.output or default_output_dir(args.model, args.split)
    report = evaluate_model(args.model, args.corpus, split=args.split, directions=parse_directions(args.directions),
                            max_sentences=args.max_sentences, num_beams=args.num_beams,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype,
                            device=args.device, output_dir=output, overwrite=args.overwrite)
    if report["skipped_directions"]:
        print(f"skipped (languages unknown to the model): {', '.join(report['skipped_directions'])}", file=sys.stderr)
    print(markdown_table(report), end="")
    print(f"wrote {output}")
    return 0


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin]
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"input file {file} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"input file {file} is empty")
    return lines


def _read_json(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"metrics file {file} does not exist")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"metrics file {file} is not JSON ({error}); pass the evaluation.json of `hf-moe-mt evaluate`") from None
