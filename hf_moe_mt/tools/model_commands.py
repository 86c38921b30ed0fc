"""`hf-moe-mt prune`, `merge`, `upcycle` and `analyze`: argparse over the expert tools (prune.py, merge.py,
upcycle.py, analyze.py). Each prints one JSON summary line and writes an export-format folder."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    prune = subparsers.add_parser("prune", help="keep the most-used (or random) experts per MoE layer → smaller model")
    prune.add_argument("model", metavar="MODEL", help="exported model folder (with its tokenizer)")
    prune.add_argument("output", metavar="OUTPUT", help="folder to write (atomically)")
    prune.add_argument("--keep", required=True, help="experts kept per layer: a fraction (0.5, 50%%) or a count (4)")
    prune.add_argument("--by", choices=["utilization", "random"], default="utilization")
    prune.add_argument("--corpus", help="corpus whose pairs the expert usage is counted on")
    prune.add_argument("--split", default="validation", help="corpus split for the counts (default: validation)")
    prune.add_argument("--usage", help="expert_usage.json from `hf-moe-mt analyze` instead of counting again")
    prune.add_argument("--per-language", action="store_true",
                       help="one model per target language T in OUTPUT/T, keeping the experts the directions into T use")
    prune.add_argument("--max-sentences", type=int, help="pairs per direction used for counting (default: all)")
    prune.add_argument("--batch-size", type=int, default=32)
    prune.add_argument("--seed", type=int, default=0, help="seed of --by random")
    prune.add_argument("--overwrite", action="store_true")
    prune.set_defaults(func=run_prune)

    merge = subparsers.add_parser("merge", help="Aggregation of Experts: models A B [C …] → one model with ΣE experts")
    merge.add_argument("paths", nargs="+", metavar="A B [C …] OUTPUT", help="input model folders, then the output")
    merge.add_argument("--shared", choices=["average", "first"], default="average",
                       help="non-expert weights: averaged over the inputs (for branches of one trunk), or the first "
                       "input's (for models trained from their own initialisations)")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(func=run_merge)

    upcycle = subparsers.add_parser("upcycle", help="dense model (hf_moe_mt or M2M100/NLLB) → MoE, FFN copied per expert")
    upcycle.add_argument("dense", metavar="DENSE", help="local folder of a dense hf_moe_mt or M2M100 model")
    upcycle.add_argument("output", metavar="OUTPUT", help="folder to write (atomically)")
    upcycle.add_argument("--num-experts", type=int, required=True)
    upcycle.add_argument("--top-k", type=int, default=2, choices=[1, 2],
                         help="2 (default): equals the dense model at initialisation; 1: the paper's routing")
    upcycle.add_argument("--sparse-step", type=int, default=2, help="MoE in every N-th layer of both stacks")
    upcycle.add_argument("--encoder-sparse-step", type=int, help="override --sparse-step for the encoder")
    upcycle.add_argument("--decoder-sparse-step", type=int, help="override --sparse-step for the decoder")
    upcycle.add_argument("--expert-noise", type=float, default=0.0,
                         help="σ: add σ·std(w) Gaussian noise to each expert copy (0 = exact copies)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the router initialisation and the noise")
    upcycle.add_argument("--tokenizer", help="tokenizer folder (default: the dense model's own)")
    upcycle.add_argument("--overwrite", action="store_true")
    upcycle.set_defaults(func=run_upcycle)

    analyze = subparsers.add_parser("analyze", help="expert usage per MoE layer and language: JSON + heatmap PNGs")
    analyze.add_argument("model", metavar="MODEL", help="exported model folder (with its tokenizer)")
    analyze.add_argument("--corpus", required=True, help="corpus directory from `hf-moe-mt data build`")
    analyze.add_argument("--split", default="validation", help="corpus split (default: validation)")
    analyze.add_argument("--directions", help="comma-separated SRC-TGT list (default: every direction, both ways)")
    analyze.add_argument("--max-sentences", type=int, help="pairs per direction (default: all)")
    analyze.add_argument("--batch-size", type=int, default=32)
    analyze.add_argument("--output", help="folder to write (default: MODEL-usage-SPLIT next to the model)")
    analyze.add_argument("--overwrite", action="store_true")
    analyze.set_defaults(func=run_analyze)


def run_prune(args) -> int:
    from .prune import prune

    report = prune(args.model, args.output, args.keep, by=args.by, per_language=args.per_language, corpus=args.corpus,
                   split=args.split, usage=args.usage, max_sentences=args.max_sentences, batch_size=args.batch_size,
                   seed=args.seed, overwrite=args.overwrite)
    sizes = {name: model["num_parameters"] for name, model in report["models"].items()}
    print(json.dumps({"output": args.output, "keep": report["keep"], "of": report["num_experts_before"],
                      "by": report["by"], "num_parameters": sizes}))
    return 0


def run_merge(args) -> int:
    from .merge import merge

    if len(args.paths) < 3:
        raise ValueError("merge needs at least two input models and an output folder: hf-moe-mt merge A B OUTPUT")
    report = merge(args.paths[:-1], args.paths[-1], shared=args.shared, overwrite=args.overwrite)
    print(json.dumps({key: report[key] for key in ("output", "num_experts", "shared", "num_parameters")}))
    return 0


def run_upcycle(args) -> int:
    from .upcycle import upcycle

    report = upcycle(args.dense, args.output, args.num_experts, top_k=args.top_k, sparse_step=args.sparse_step,
                     encoder_sparse_step=args.encoder_sparse_step, decoder_sparse_step=args.decoder_sparse_step,
                     expert_noise=args.expert_noise, seed=args.seed, tokenizer=args.tokenizer,
                     overwrite=args.overwrite)
    print(json.dumps({key: report[key] for key in ("output", "source_model_type", "num_experts", "top_k", "layers",
                                                   "num_parameters", "activated_parameters")}))
    return 0


def run_analyze(args) -> int:
    from .analyze import analyze
    from .evaluate import parse_directions

    report = analyze(args.model, args.corpus, split=args.split, directions=parse_directions(args.directions),
                     max_sentences=args.max_sentences, batch_size=args.batch_size, output_dir=args.output,
                     overwrite=args.overwrite)
    statistics = {layer: round(stats["normalized_entropy"], 3) for layer, stats in report["statistics"].items()}
    print(json.dumps({"output": report["output"], "normalized_entropy": statistics}))
    return 0
