"""Training runs side by side, at equal steps: dev loss against steps and training minutes, and test BLEU/chrF of
the checkpoints at chosen steps. For comparisons longer than an experiment script's arms: runs of hours, trained
by `hf-moe-mt train --time-budget` (and resumed), compared where they are.

Dev loss comes from the newest checkpoint's `trainer_state.json` (the Trainer's own evaluations of the validation
split, so every run must evaluate on the same steps and data); training minutes from each checkpoint's
time-budget record (runs trained with `--time-budget`; others get no time axis). Test scores: the checkpoint of
each --test-steps step is exported and scored by `hf-moe-mt evaluate`'s code, both cached under RUN/compare/, so a
rerun does only new work. Writes RESULTS_DIR/NAME/{results.json,curves.png}.

  python scripts/experiments/compare_runs.py --name bible_small_moe_vs_dense --test-steps 3000,7000 \\
      --run "MoE, 8 experts=runs/bible-small" --run "dense=runs/bible-small-dense"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import REPO, logged_values, machine, plot_curves


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results/NAME/ receives results.json and curves.png")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=OUTPUT_DIR",
                        help="a training output folder (training.output_dir) and its legend label; repeat per run")
    parser.add_argument("--test-steps", default="", help="comma-separated steps whose checkpoints are scored on "
                        "the test split (each run needs a checkpoint-N there)")
    parser.add_argument("--corpus", help="corpus with the test split (default: the first run's OUTPUT_DIR/corpus)")
    parser.add_argument("--test-sentences", type=int, default=100, help="test pairs scored per direction")
    parser.add_argument("--results-dir", default=str(REPO / "results"))
    return parser.parse_args(argv)


def parse_runs(specs: list[str]) -> list[tuple[str, Path]]:
    runs = []
    for spec in specs:
        label, separator, folder = spec.rpartition("=")
        if not separator or not label:
            raise SystemExit(f"error: --run {spec!r} is not LABEL=OUTPUT_DIR")
        if not checkpoints(Path(folder)):
            raise SystemExit(f"error: --run {spec!r}: no checkpoint-N with a trainer_state.json in {folder}")
        runs.append((label, Path(folder)))
    return runs


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """step → complete checkpoint folder that holds the Trainer's state (its dev evaluations)."""
    from hf_moe_mt.training.checkpoints import checkpoints_by_step

    folders = checkpoints_by_step(run_dir) if run_dir.is_dir() else {}
    return {step: Path(folder) for step, folder in folders.items() if (Path(folder) / "trainer_state.json").is_file()}


def training_seconds(state: dict) -> float | None:
    """Training time up to a checkpoint, as `--time-budget` recorded it."""
    from hf_moe_mt.training.budget import TimeBudgetCallback

    record = state.get("stateful_callbacks", {}).get(TimeBudgetCallback.__name__)
    return float(record["attributes"]["elapsed_before"]) if isinstance(record, dict) else None


def dev_curve(run_dir: Path) -> list[dict]:
    """[{step, dev_loss, wall?}]: every evaluation in the last checkpoint's log history, with the training
    seconds where a checkpoint of that step recorded them."""
    seconds = {step: training_seconds(json.loads((path / "trainer_state.json").read_text()))
               for step, path in checkpoints(run_dir).items()}
    curve = []
    for step, loss in logged_values(run_dir, "eval_loss"):
        point = {"step": step, "dev_loss": round(loss, 5)}
        if seconds.get(step) is not None:
            point["wall"] = round(seconds[step], 3)
        curve.append(point)
    return curve


def run_seed(run_dir: Path) -> int | None:
    from hf_moe_mt.training.run import CONFIG_FILE

    config = run_dir / CONFIG_FILE  # written by `hf-moe-mt train` next to the checkpoints
    return json.loads(config.read_text())["training"]["seed"] if config.is_file() else None


def test_scores(run_dir: Path, step: int, corpus: Path, sentences: int) -> dict:
    """Export checkpoint-`step` and score its test split; cached per (step, sentences)."""
    from hf_moe_mt.tools.evaluate import evaluate_model
    from hf_moe_mt.tools.export import export_model

    checkpoint = checkpoints(run_dir).get(step)
    if checkpoint is None:
        raise SystemExit(f"error: {run_dir} has no checkpoint-{step}; pick --test-steps among "
                         f"{', '.join(map(str, checkpoints(run_dir)))}")
    folder = run_dir / "compare" / f"step-{step}"
    cache = folder / f"test_scores_{sentences}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    tokenizer = checkpoint if (checkpoint / "tokenizer.json").is_file() else run_dir / "tokenizer"
    if not (folder / "model" / "config.json").is_file():
        export_model(checkpoint, folder / "model", tokenizer, overwrite=True)
    report = evaluate_model(folder / "model", corpus, split="test", max_sentences=sentences)
    scores = {"step": step, "directions": {name: {key: result[key] for key in ("bleu", "chrf", "looping")}
                                           for name, result in report["directions"].items()},
              "averages": report["averages"]}
    cache.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def main(argv=None) -> int:
    options = parse_args(argv)
    runs = parse_runs(options.run)
    corpus = Path(options.corpus) if options.corpus else runs[0][1] / "corpus"
    steps = [int(step) for step in options.test_steps.split(",") if step.strip()]
    output = Path(options.results_dir) / options.name
    results = {"experiment": options.name, "machine": machine(), "test_sentences": options.test_sentences,
               "corpus": str(corpus), "runs": []}
    for label, run_dir in runs:
        results["runs"].append({"label": label, "seed": run_seed(run_dir), "output_dir": str(run_dir),
                                "curve": dev_curve(run_dir),
                                "scores": [test_scores(run_dir, step, corpus, options.test_sentences)
                                           for step in steps]})
    output.mkdir(parents=True, exist_ok=True)
    staging = output / "results.json.tmp"
    staging.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    staging.replace(output / "results.json")
    plot_curves(results["runs"], output / "curves.png", options.name, time_key="wall")
    for run in results["runs"]:
        for scores in run["scores"]:
            averages = ", ".join(f"{name} BLEU {value['bleu']:.2f} chrF {value['chrf']:.2f}"
                                 for name, value in scores["averages"].items())
            print(f"{run['label']} step {scores['step']}: {averages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
