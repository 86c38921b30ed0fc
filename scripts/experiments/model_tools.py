"""The expert tools' experiments, resumable: every finished step leaves a file and a rerun skips it.

  pruning    keep ∈ {100 %, 50 %, 25 %, 1 expert} × {utilization, random, per-language} of a trained MoE:
             parameters, weight memory, peak memory, translation sentences/s, BLEU and chrF (test split)
  aoe        Aggregation of Experts: models A and B (given, or trained here with seeds 0/1; with --aoe-branch-step S
             B branches from A's step S) merged; dev loss at step 0 and after a short fine-tune, against a model
             with the merged number of experts trained from scratch for the same total steps (A's + B's + the
             fine-tune)
  upcycling  a dense model (given, or trained here) upcycled to an MoE and trained N more steps, against the dense
             model continued for the same N steps: dev loss and BLEU

Training goes through `hf_moe_mt.training.run.run_training` with the YAML config given by --config plus the
trailing `section.key=value` overrides (every run also gets data.corpus and data.tokenizer, so all models share one
tokenizer). Dev loss is `hf_moe_mt.tools.evaluate.teacher_forced_loss` on the validation split (token
cross-entropy, no label smoothing, no router losses), the same function for every model.
Outputs: OUTPUT/{pruning,aoe,upcycling}.json + .png; models and runs under WORK.

    python scripts/experiments/model_tools.py --corpus runs/bible/train/corpus --moe runs/bible/model \\
        --dense runs/bible-dense/model --config configs/bible-small.yaml --sections pruning,aoe,upcycling
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

KEEPS = "1.0,0.5,0.25,1"
METHODS = "utilization,random,per-language"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus every model was trained on (validation/test split)")
    parser.add_argument("--output", default="results/model_tools", help="JSON + PNG tables")
    parser.add_argument("--work-dir", default="runs/model_tools", help="pruned/merged/upcycled models and runs")
    parser.add_argument("--sections", default="pruning,aoe,upcycling")
    parser.add_argument("--config", help="training YAML for every run here (the recipe the given models used)")
    parser.add_argument("--tokenizer", help="tokenizer of from-scratch runs (default: the --moe or --dense model's)")
    parser.add_argument("--moe", help="trained MoE model folder (pruning; its tokenizer is used)")
    parser.add_argument("--keep", default=KEEPS, help=f"kept experts per layer (default {KEEPS})")
    parser.add_argument("--methods", default=METHODS, help=f"pruning methods (default {METHODS})")
    parser.add_argument("--usage-split", default="validation", help="split the pruning usage is counted on")
    parser.add_argument("--test-sentences", type=int, default=200, help="test pairs translated per direction")
    parser.add_argument("--dev-sentences", type=int, default=500, help="validation pairs per direction (dev loss)")
    parser.add_argument("--directions", help="SRC-TGT list evaluated (default: every direction of the split)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="evaluate in this process (peak memory is then not measured)")
    parser.add_argument("--aoe-a", help="trained model A (default: train one here, seed 0)")
    parser.add_argument("--aoe-b", help="trained model B (default: train one here, seed 1)")
    parser.add_argument("--aoe-steps", type=int, default=1000, help="steps of A and B when trained here")
    parser.add_argument("--aoe-finetune-steps", type=int, default=200)
    parser.add_argument("--aoe-branch-step", type=int, default=0, metavar="S",
                        help="B continues A's checkpoint-S (optimizer and schedule included) with seed 1 instead of "
                        "starting from its own initialisation: branch-train-merge, under which averaging the shared "
                        "weights is sound (default 0: independent A and B)")
    parser.add_argument("--dense", help="trained dense model (default: train one here with sparse steps 0)")
    parser.add_argument("--dense-steps", type=int, default=1000, help="steps of the dense model when trained here")
    parser.add_argument("--upcycle-experts", type=int, default=8)
    parser.add_argument("--upcycle-top-k", type=int, default=2)
    parser.add_argument("--upcycle-steps", type=int, default=500, help="N: further steps of both models")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="training config overrides")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- resumable steps

def cached(path: Path, compute):
    """The JSON at `path`, computing and writing it (atomically) first if it is not there yet."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(staging, path)
    return result


def train(args, name: str, *overrides: str, branch_from: Path | None = None) -> dict:
    """One `hf-moe-mt train` run under WORK/runs/NAME (continued if interrupted, skipped when finished);
    returns its summary (model_dir, global_step, ...). `branch_from`: a checkpoint of another run that a new run
    resumes from (its weights, optimizer, schedule and step), continued under this run's overrides."""
    from hf_moe_mt.training.checkpoints import last_complete_checkpoint
    from hf_moe_mt.training.config import load_train_config
    from hf_moe_mt.training.run import SUMMARY_FILE, run_training

    if not args.config:
        raise SystemExit(f"training run {name!r} needs --config (the recipe's YAML)")
    output_dir = Path(args.work_dir) / "runs" / name
    if (output_dir / SUMMARY_FILE).is_file():
        return json.loads((output_dir / SUMMARY_FILE).read_text())
    config = load_train_config(args.config, [f"data.corpus={args.corpus}", f"training.output_dir={output_dir}",
                                             *args.overrides, *(o for o in overrides if o)])
    resume = last_complete_checkpoint(str(output_dir)) is not None
    print(f"[model_tools] training {name} ({'resumed' if resume else 'branched' if branch_from else 'new'})", flush=True)
    return run_training(config, resume=True if resume else str(branch_from) if branch_from else None)


def steps_of(model_dir: str) -> int:
    """Optimizer steps a model was trained for: its run's train_summary.json or its training_info.json."""
    folder = Path(model_dir)
    for file, key in ((folder.parent / "train_summary.json", None), (folder / "training_info.json", "train_summary")):
        if file.is_file():
            data = json.loads(file.read_text())
            summary = data if key is None else data.get(key) or {}
            if "global_step" in summary:
                return int(summary["global_step"])
    raise SystemExit(f"cannot tell how many steps {model_dir} was trained for (no train_summary.json); "
                     "train A and B here with --aoe-steps instead")


# --------------------------------------------------------------------------- measurements

def evaluate(args, model_dir, directions=None) -> dict:
    """Translation scores, speed and memory of one model folder; in a fresh process when isolating, so its
    peak memory is that model's alone."""
    options = {"directions": directions, "max_sentences": args.test_sentences, "num_beams": args.num_beams,
               "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    if not args.isolate:  # this process's peak also holds every model loaded before: not the model's own
        return {**evaluate_here(str(model_dir), args.corpus, options), "peak_memory_mib": None}
    run = subprocess.run([sys.executable, __file__, "_evaluate", str(model_dir), args.corpus, json.dumps(options)],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"evaluating {model_dir} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def evaluate_here(model_dir: str, corpus: str, options: dict) -> dict:
    from hf_moe_mt.tools.evaluate import evaluate_model

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = evaluate_model(model_dir, corpus, device="cuda" if torch.cuda.is_available() else None,
                            directions=[tuple(d) for d in options["directions"]] if options["directions"] else None,
                            max_sentences=options["max_sentences"], num_beams=options["num_beams"],
                            max_new_tokens=options["max_new_tokens"], batch_size=options["batch_size"], progress=False)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    return {"directions": report["directions"], "averages": report["averages"],
            "sentences_per_second": report["sentences_per_second"], "peak_memory_mib": peak / 2**20}


def model_size(model_dir) -> dict:
    from transformers import AutoModelForSeq2SeqLM

    from hf_moe_mt.tools.export import parameter_counts

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    total, activated = parameter_counts(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"parameters": total, "activated_parameters": activated, "weights_mib": weights / 2**20}


def dev_loss(args, model_dir) -> dict:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_moe_mt.tools.evaluate import load_direction_pairs, teacher_forced_loss

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = load_direction_pairs(args.corpus, "validation", parse_directions(args.directions),
                                    args.dev_sentences, tokenizer.language_codes)
    return teacher_forced_loss(model, tokenizer, pairs, batch_size=args.batch_size)


def parse_directions(text):
    from hf_moe_mt.tools.evaluate import parse_directions as parse

    return parse(text)


def summary_scores(evaluation: dict) -> dict:
    """Average BLEU/chrF over every evaluated direction, plus the pivot averages."""
    results = evaluation["directions"].values()
    row = {"bleu": sum(r["bleu"] for r in results) / len(results), "chrf": sum(r["chrf"] for r in results) / len(results)}
    for name, average in evaluation["averages"].items():
        row[f"bleu_{name}"], row[f"chrf_{name}"] = average["bleu"], average["chrf"]
    return row


# --------------------------------------------------------------------------- pruning

def pruning_usage(args, work: Path):
    """Expert usage of the MoE on the usage split, counted once (cached as analyze's expert_usage.json)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_moe_mt.tools.analyze import count_expert_usage
    from hf_moe_mt.tools.evaluate import load_direction_pairs
    from hf_moe_mt.tools.prune import load_usage

    def count():
        model = AutoModelForSeq2SeqLM.from_pretrained(args.moe, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.moe)
        pairs, _ = load_direction_pairs(args.corpus, args.usage_split, parse_directions(args.directions),
                                        args.dev_sentences, tokenizer.language_codes)
        return count_expert_usage(model, tokenizer, pairs, batch_size=args.batch_size).to_dict()

    cached(work / "expert_usage.json", count)
    return load_usage(work / "expert_usage.json")


def measure_pruned(args, folder: Path, per_language: bool) -> dict:
    """One table row: size of one (pruned) model, translation of every direction it serves."""
    if not per_language:
        return {**model_size(folder), **scores_of(evaluate(args, folder, parse_directions(args.directions)))}
    report = json.loads((folder / "pruning.json").read_text())
    evaluations = [evaluate(args, folder / language, [d.split("-") for d in model["directions"]])
                   for language, model in report["models"].items()]
    merged = {"directions": {k: v for e in evaluations for k, v in e["directions"].items()}, "averages": {}}
    seconds = sum(r["seconds"] for r in merged["directions"].values())
    merged["sentences_per_second"] = sum(r["sentences"] for r in merged["directions"].values()) / seconds
    merged["averages"] = pivot_averages(merged["directions"])
    peaks = [e["peak_memory_mib"] for e in evaluations if e["peak_memory_mib"] is not None]
    merged["peak_memory_mib"] = max(peaks) if peaks else None
    return {**model_size(folder / next(iter(report["models"]))), "models": len(report["models"]), **scores_of(merged)}


def pivot_averages(directions: dict) -> dict:
    from hf_moe_mt.tools.evaluate import pivot_averages as averages

    return averages(directions, "en")


def scores_of(evaluation: dict) -> dict:
    return {**summary_scores(evaluation), "sentences_per_second": evaluation["sentences_per_second"],
            "peak_memory_mib": evaluation["peak_memory_mib"],
            "directions": {d: {"bleu": r["bleu"], "chrf": r["chrf"]} for d, r in evaluation["directions"].items()}}


def pruning_section(args) -> dict:
    """1. usage counts  2. the unpruned baseline  3. one pruned model per (keep, method), measured."""
    from hf_moe_mt.tools.prune import prune

    if not args.moe:
        raise SystemExit("the pruning section needs --moe MODEL (a trained MoE folder)")
    work = Path(args.work_dir) / "pruning"
    usage = pruning_usage(args, work)  # 1.
    rows = [{"keep": "100%", "method": "all (no pruning)", "experts": usage.num_experts,  # 2.
             **cached(work / "rows" / "baseline.json", lambda: measure_pruned(args, Path(args.moe), False))}]
    for keep in [k for k in args.keep.split(",") if k.strip() not in ("1.0", "100%")]:  # 3.
        for method in args.methods.split(","):
            folder = work / f"{method}-{keep}"
            per_language = method == "per-language"
            if not folder.exists():
                prune(args.moe, folder, keep, by="random" if method == "random" else "utilization",
                      per_language=per_language, usage=usage, progress=False)
            row = cached(work / "rows" / f"{method}-{keep}.json", lambda: measure_pruned(args, folder, per_language))
            experts = json.loads(((folder / "pruning.json") if per_language else (folder / "training_info.json"))
                                 .read_text())
            rows.append({"keep": keep, "method": method, "experts": _kept_count(experts), **row})
    return rows


def _kept_count(record: dict) -> int:
    if "keep" in record:  # pruning.json of a per-language prune
        return record["keep"]
    kept = record["derivation"][-1]["kept"]
    return len(next(iter(kept.values())))


# --------------------------------------------------------------------------- Aggregation of Experts

def shared_tokenizer(args) -> str:
    """The tokenizer of every from-scratch run: models must share token ids to be merged or compared."""
    tokenizer = args.tokenizer or args.moe or args.dense or args.aoe_a
    if not tokenizer:
        raise SystemExit("runs trained here need --tokenizer TOKDIR (or --moe/--dense, whose tokenizer is used)")
    return tokenizer


def aoe_section(args) -> dict:
    """1. A and B (B from its own initialisation, or a branch of A's checkpoint)  2. merged  3. merged + fine-tune, and
    the 2E model from scratch for A's + B's + F steps (a shared trunk counted once)  4. dev loss of every model."""
    from transformers import AutoConfig

    from hf_moe_mt.tools.merge import merge

    work = Path(args.work_dir) / "aoe"
    tokenizer = f"data.tokenizer={shared_tokenizer(args)}" if not (args.aoe_a and args.aoe_b) else None
    # 1.
    branch = args.aoe_branch_step
    if branch and (args.aoe_a or args.aoe_b or not 0 < branch < args.aoe_steps):
        raise SystemExit(f"--aoe-branch-step {branch} trains A and B here: drop --aoe-a/--aoe-b and keep it between 0 "
                         f"and --aoe-steps {args.aoe_steps}")
    keep_branch_point = (f"training.save_steps={branch}", "training.save_total_limit=null") if branch else ()
    a = args.aoe_a or train(args, "aoe-a", f"training.max_steps={args.aoe_steps}", "training.seed=0", tokenizer,
                            *keep_branch_point)["model_dir"]
    if branch:
        trunk = Path(a).parent / f"checkpoint-{branch}"  # A's run directory (A's model is RUN/model)
        if not trunk.is_dir():
            raise SystemExit(f"{trunk} is missing: A was trained before with other save steps; remove "
                             f"{trunk.parent} to retrain it")
        b = train(args, f"aoe-b-branch{branch}", f"training.max_steps={args.aoe_steps}", "training.seed=1",
                  tokenizer, branch_from=trunk)["model_dir"]
        work = work / f"branch{branch}"
    else:
        b = args.aoe_b or train(args, "aoe-b", f"training.max_steps={args.aoe_steps}", "training.seed=1",
                                tokenizer)["model_dir"]
    steps = steps_of(a) + steps_of(b) - branch  # the shared trunk once
    # 2.
    merged = work / "merged"
    if not merged.exists():
        merge([a, b], merged)
    num_experts = AutoConfig.from_pretrained(merged).num_experts
    # 3.
    suffix = f"-branch{branch}" if branch else ""
    finetuned = train(args, f"aoe-merged-finetune{suffix}", f"model.pretrained={merged}", "model.config={}",
                      f"training.max_steps={args.aoe_finetune_steps}")["model_dir"]
    scratch = train(args, f"aoe-scratch{suffix}", f"model.config.num_experts={num_experts}",
                    f"training.max_steps={steps + args.aoe_finetune_steps}", "training.seed=0",
                    f"data.tokenizer={merged}")["model_dir"]
    # 4.
    models = {"A": a, f"B (A's step {branch} + {args.aoe_steps - branch} steps, seed 1)" if branch else "B": b,
              "merged (step 0)": merged, f"merged + {args.aoe_finetune_steps} steps": finetuned,
              f"{num_experts} experts from scratch ({steps + args.aoe_finetune_steps} steps)": scratch}
    losses = {name: cached(work / f"dev-{index}.json", lambda path=path: dev_loss(args, path))["loss"]
              for index, (name, path) in enumerate(models.items())}
    return {"models": {name: str(path) for name, path in models.items()}, "dev_loss": losses,
            "steps": {"A": steps_of(a), "B": steps_of(b), "finetune": args.aoe_finetune_steps,
                      "scratch": steps + args.aoe_finetune_steps}, "merged_experts": num_experts,
            "branch_step": branch}


# --------------------------------------------------------------------------- upcycling

def upcycling_section(args) -> dict:
    """1. the dense model  2. upcycled  3. both trained N more steps  4. dev loss and BLEU at step 0 and N."""
    from hf_moe_mt.tools.upcycle import upcycle

    work = Path(args.work_dir) / "upcycling"
    # 1.
    dense = args.dense or train(args, "dense", "model.config.encoder_sparse_step=0",
                                "model.config.decoder_sparse_step=0", f"training.max_steps={args.dense_steps}",
                                f"data.tokenizer={shared_tokenizer(args)}")["model_dir"]
    # 2.
    upcycled = work / "upcycled"
    if not upcycled.exists():
        upcycle(dense, upcycled, args.upcycle_experts, top_k=args.upcycle_top_k)
    # 3.
    continued = {name: train(args, f"{name}-continued", f"model.pretrained={path}", "model.config={}",
                             f"training.max_steps={args.upcycle_steps}")["model_dir"]
                 for name, path in (("dense", dense), ("upcycled", upcycled))}
    # 4.
    points = {"dense (step 0)": dense, "upcycled (step 0)": upcycled,
              f"dense + {args.upcycle_steps} steps": continued["dense"],
              f"upcycled + {args.upcycle_steps} steps": continued["upcycled"]}
    rows = {}
    for index, (name, path) in enumerate(points.items()):
        rows[name] = cached(work / f"point-{index}.json", lambda path=path: {
            "dev_loss": dev_loss(args, path)["loss"], **model_size(path),
            **scores_of(evaluate(args, path, parse_directions(args.directions)))})
    return {"models": {name: str(path) for name, path in points.items()}, "points": rows,
            "num_experts": args.upcycle_experts, "top_k": args.upcycle_top_k, "steps": args.upcycle_steps}


# --------------------------------------------------------------------------- tables and plots

def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _lscpu().splitlines() if line.startswith("Model name")),
                 platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


def pruning_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| keep | method | experts | parameters | weights MiB | peak MiB | sent/s | BLEU | ΔBLEU | chrF |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = "–" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        lines.append(f"| {row['keep']} | {row['method']} | {row['experts']} | {row['parameters']:,} | "
                     f"{row['weights_mib']:.1f} | {peak} | {row['sentences_per_second']:.2f} | {row['bleu']:.2f} | "
                     f"{row['bleu'] - base['bleu']:+.2f} | {row['chrf']:.2f} |")
    return "\n".join(lines)


def plot_pruning(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    base = rows[0]
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        chosen = sorted([base] + [r for r in rows[1:] if r["method"] == method], key=lambda r: r["experts"])
        for axis, key in zip(axes, ("bleu", "chrf", "sentences_per_second")):
            axis.plot([r["experts"] for r in chosen], [r[key] for r in chosen], marker="o", label=method)
    for axis, label in zip(axes, ("BLEU", "chrF", "sentences/s")):
        axis.set_xlabel("experts kept per MoE layer")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("expert pruning (test split, average over directions)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_bars(values: dict[str, float], ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(values)), 3.8))
    axis.bar(range(len(values)), list(values.values()), color="tab:blue")
    axis.set_xticks(range(len(values)), list(values), rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_section(output: Path, name: str, result, machine_info: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps({"machine": machine_info, "result": result}, indent=1) + "\n")
    if name == "pruning":
        plot_pruning(result, output / "pruning.png")
        print(pruning_table(result))
    elif name == "aoe":
        plot_bars(result["dev_loss"], "dev loss (token cross-entropy)", "Aggregation of Experts", output / "aoe.png")
        print("\n".join(f"| {model} | {loss:.4f} |" for model, loss in result["dev_loss"].items()))
    else:
        points = result["points"]
        plot_upcycling(points, output / "upcycling.png")
        print("\n".join(f"| {name} | {p['dev_loss']:.4f} | {p['bleu']:.2f} | {p['chrf']:.2f} | {p['parameters']:,} |"
                        for name, p in points.items()))


def plot_upcycling(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, key, label in ((axes[0], "dev_loss", "dev loss"), (axes[1], "bleu", "BLEU")):
        axis.bar(range(len(points)), [p[key] for p in points.values()],
                 color=["tab:gray", "tab:orange", "tab:gray", "tab:orange"][:len(points)])
        axis.set_xticks(range(len(points)), list(points), rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(label)
    figure.suptitle("sparse upcycling vs continuing the dense model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


SECTIONS = {"pruning": pruning_section, "aoe": aoe_section, "upcycling": upcycling_section}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "_evaluate":  # one isolated evaluation (see `evaluate`)
        print(json.dumps(evaluate_here(argv[1], argv[2], json.loads(argv[3]))))
        return 0
    args = parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    info = machine()
    print(f"[model_tools] {info['cpu']}, {info['cores']} cores, torch {info['torch']}, gpu {info['gpu']}", flush=True)
    for name in args.sections.split(","):
        start = time.perf_counter()
        result = SECTIONS[name](args)
        write_section(Path(args.output), name, result, info)
        print(f"[model_tools] {name} done in {time.perf_counter() - start:.0f} s -> {args.output}/{name}.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
