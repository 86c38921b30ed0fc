"""What every experiment script shares: arms trained by `hf-moe-mt train`'s own code (`run_training`) on ONE
corpus and tokenizer, resumable, with dev-loss curves against steps and training time, test BLEU/chrF through
`hf-moe-mt evaluate`, and results written to `results/<experiment>/results.json` after every arm.

Resuming: an arm whose training finished is read back, one with checkpoints continues from the last complete
checkpoint (bit-exact, see tests/training/test_fault_tolerance.py), and a scored arm is not scored again. So
rerunning a stopped experiment script costs only the unfinished work.

Time: each arm records, at every logging step, the wall seconds and the process CPU seconds its training steps
took (evaluation excluded). On a machine shared with other jobs the CPU seconds of a single-threaded run are the
better measure of cost, and the results say which one a plot uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # a checkout needs no install

TIMING_FILE, SCORES_FILE = "timing.jsonl", "test_scores.json"


@dataclass
class Arm:
    """One training run of an experiment: a name (its folder) and config overrides on top of the common ones."""

    name: str
    overrides: list[str] = field(default_factory=list)
    label: str | None = None  # legend text; the name when None


def experiment_parser(description: str, default_steps: int) -> argparse.ArgumentParser:
    """The flags every experiment shares; `section.key=value` overrides scale it up (GPU: bigger batches)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "bible-small.yaml"),
                        help="the training recipe every arm starts from")
    parser.add_argument("--steps", type=int, default=default_steps, help="optimizer steps per arm")
    parser.add_argument("--eval-every", type=int, default=None, help="dev loss every N steps (default: steps/8)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every arm runs once per seed")
    parser.add_argument("--test-sentences", type=int, default=100,
                        help="test pairs scored per direction (every direction of the corpus, both ways)")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "experiments"),
                        help="checkpoints and models (not committed)")
    parser.add_argument("--results-dir", default=str(REPO / "results"), help="JSON and PNG (committed)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every arm")
    return parser


class ElapsedTime:
    """Holds a TrainerCallback (`.callback`) that appends the wall and CPU seconds of the training steps so far to
    `timing.jsonl` at each logging step. On resume the count continues from the line of the checkpoint's step."""

    def __init__(self, output_dir: Path):
        from transformers import TrainerCallback

        timing_file = output_dir / TIMING_FILE
        record = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if not record.resumed:  # the first step: state.global_step is the checkpoint's step by now
                    kept = [line for line in read_jsonl(timing_file) if line["step"] <= state.global_step]
                    record.wall, record.cpu = (kept[-1]["wall"], kept[-1]["cpu"]) if kept else (0.0, 0.0)
                    if args.should_save:
                        timing_file.write_text("".join(json.dumps(line) + "\n" for line in kept))
                    record.resumed = True
                record.started = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                record.wall += time.perf_counter() - record.started[0]
                record.cpu += time.process_time() - record.started[1]
                if args.should_save and (state.global_step % args.logging_steps == 0
                                         or state.global_step == state.max_steps):
                    with timing_file.open("a") as handle:
                        handle.write(json.dumps({"step": state.global_step, "wall": round(record.wall, 2),
                                                 "cpu": round(record.cpu, 2)}) + "\n")

        self.wall, self.cpu, self.started, self.resumed = 0.0, 0.0, (0.0, 0.0), False
        self.callback = Callback()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class Experiment:
    """Arms of one experiment on shared data. `run_arm` trains (or resumes, or reads back) and scores one arm."""

    def __init__(self, name: str, args: argparse.Namespace, extra_overrides: list[str] = ()):
        self.name, self.args = name, args
        self.work_dir = Path(args.work_dir) / name
        self.results_dir = Path(args.results_dir) / name
        eval_every = args.eval_every or max(args.steps // 8, 1)
        self.common = [f"training.max_steps={args.steps}", f"training.eval_steps={eval_every}",
                       f"training.save_steps={eval_every}", "training.eval_strategy=steps", "evaluation.bleu_steps=0",
                       "training.save_total_limit=2", *extra_overrides, *args.overrides]
        self.seeds = [int(seed) for seed in args.seeds.split(",")]
        self.corpus_dir: Path | None = None  # set by data_overrides()

    # ------------------------------------------------------------------ data shared by every arm

    def data_overrides(self) -> list[str]:
        """Build the corpus and tokenizer once (as the first arm would) and point every arm at them; a config that
        names both already is used as it is."""
        from hf_moe_mt.training.config import load_train_config
        from hf_moe_mt.training.run import prepare_corpus, prepare_tokenizer

        data_dir = self.work_dir / "data"
        config = load_train_config(self.args.config, [f"training.output_dir={data_dir}", *self.common])
        if config.data.corpus and config.data.tokenizer:
            self.corpus_dir = Path(config.data.corpus)
            return []
        training_args = config.training_arguments()
        corpus = prepare_corpus(config, training_args)
        prepare_tokenizer(config, corpus, training_args)
        self.corpus_dir = Path(config.data.corpus) if config.data.corpus else data_dir / "corpus"
        tokenizer = config.data.tokenizer or data_dir / "tokenizer"
        return [f"data.corpus={self.corpus_dir}", f"data.tokenizer={tokenizer}"]

    # ------------------------------------------------------------------ one arm

    def run_arm(self, arm: Arm, seed: int, data: list[str], callbacks=()) -> dict:
        """1. train or resume (skipped when finished)  2. score the test split (cached)  3. curves."""
        from hf_moe_mt.training.checkpoints import last_complete_checkpoint
        from hf_moe_mt.training.config import load_train_config
        from hf_moe_mt.training.run import FINAL_MODEL_DIR, SUMMARY_FILE, run_training

        output_dir = self.work_dir / f"{arm.name}-seed{seed}"
        overrides = [*self.common, *data, *arm.overrides, f"training.seed={seed}", f"training.output_dir={output_dir}"]
        # 1.
        if not (output_dir / SUMMARY_FILE).is_file():
            config = load_train_config(self.args.config, overrides)
            output_dir.mkdir(parents=True, exist_ok=True)
            resume = last_complete_checkpoint(str(output_dir)) is not None
            run_training(config, resume=resume or None, callbacks=[ElapsedTime(output_dir).callback, *callbacks])
        summary = json.loads((output_dir / SUMMARY_FILE).read_text())
        # 2.
        scores = self.test_scores(output_dir / FINAL_MODEL_DIR, output_dir / SCORES_FILE)
        # 3.
        return {"arm": arm.name, "label": arm.label or arm.name, "seed": seed, "overrides": arm.overrides,
                "summary": {key: summary.get(key) for key in ("global_step", "train_loss", "eval_loss",
                                                             "train_runtime")},
                "curve": dev_curve(output_dir), "scores": scores}

    def test_scores(self, model_dir: Path, cache: Path) -> dict:
        from hf_moe_mt.tools.evaluate import evaluate_model

        if cache.is_file():
            return json.loads(cache.read_text())
        report = evaluate_model(model_dir, self.corpus_dir, split="test", max_sentences=self.args.test_sentences)
        scores = {"directions": {name: {key: result[key] for key in ("bleu", "chrf", "sentences_per_second")}
                                 for name, result in report["directions"].items()},
                  "averages": report["averages"]}
        cache.write_text(json.dumps(scores, indent=1) + "\n")
        return scores

    # ------------------------------------------------------------------ every arm

    def run_all(self, arms: list[Arm], extra=None, **facts) -> dict:
        """Every arm for every seed, results.json rewritten after each (a stopped script keeps what it finished).
        `extra(arm, seed, data)` wraps one arm's run (e.g. with instrumentation) and may add keys to it."""
        data = self.data_overrides()
        runs: list[dict] = []
        results = {"experiment": self.name, "machine": machine(), "config": self.args.config,
                   "steps": self.args.steps, "overrides": self.common, **facts, "runs": runs}
        for seed in self.seeds:
            for arm in arms:
                runs.append(extra(arm, seed, data) if extra else self.run_arm(arm, seed, data))
                self.write(results)
        return results

    # ------------------------------------------------------------------ results

    def write(self, results: dict) -> Path:
        """results.json, staged and renamed (a stopped script never leaves a half-written file)."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / "results.json"
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        os.replace(staging, path)
        return path


def dev_curve(output_dir: Path) -> list[dict]:
    """[{step, dev_loss, wall, cpu}] from the last checkpoint's log history and the arm's timing log."""
    evaluations = logged_values(output_dir, "eval_loss")
    if not evaluations:
        return []
    timing = {line["step"]: line for line in read_jsonl(output_dir / TIMING_FILE)}
    curve = []
    for step, loss in evaluations:
        known = [s for s in timing if s <= step]
        at = timing[max(known)] if known else {"wall": 0.0, "cpu": 0.0}
        curve.append({"step": step, "dev_loss": round(loss, 5), "wall": at["wall"], "cpu": at["cpu"]})
    return curve


def logged_values(output_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of a training-log metric (e.g. `router/dropped_fraction`) from the last checkpoint's history."""
    from hf_moe_mt.training.checkpoints import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(str(output_dir))
    if checkpoint is None:
        return []
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], float(entry[key])) for entry in history if key in entry]


def machine() -> dict:
    """The CPU model, core count and torch version the results were produced with."""
    import platform

    import torch

    model = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first evaluated step whose dev loss is at or below `target` (None if never)."""
    return next((point["step"] for point in curve if point["dev_loss"] <= target), None)


def plot_curves(runs: list[dict], path: Path, title: str, time_key: str = "cpu") -> None:
    """Dev loss against steps and against training seconds, one line per arm and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in runs:
        curve = [point for point in run["curve"] if point["step"] > 0]
        label = f"{run['label']} (seed {run['seed']})"
        axes[0].plot([p["step"] for p in curve], [p["dev_loss"] for p in curve], marker="o", ms=3, label=label)
        timed = [point for point in curve if point.get(time_key) is not None]  # runs may lack a time record
        axes[1].plot([p[time_key] / 60 for p in timed], [p["dev_loss"] for p in timed], marker="o", ms=3, label=label)
    axes[0].set(xlabel="optimizer step", ylabel="dev loss (nats/token)")
    axes[1].set(xlabel=f"training time, {'CPU' if time_key == 'cpu' else 'wall'} minutes", ylabel="dev loss")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
