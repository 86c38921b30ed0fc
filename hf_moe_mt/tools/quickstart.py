"""`hf-moe-mt quickstart`: the whole job end to end on the bundled default, as library calls —
build the offline Bible corpus → train a small MoE (configs/quickstart.yaml) for at most `--time-budget`
minutes → export an HF folder → translate the held-out test books with pipeline("translation") and score them
with sacrebleu. The time budget, not a step count, keeps the whole job within 15 minutes on a 2-core CPU:
machines differ by 2× in steps per minute (bf16, GEMM libraries), and the recipe's cooldown (budget.cooldown:
the learning rate decays to zero over the last fifth of the budget) ends the run cooled down wherever it stops.

Outputs under --output: train/ (corpus, tokenizer, checkpoints, plots, final model), model/ (the exported
folder), evaluation/ (`hf-moe-mt evaluate` of the test books: JSON, Markdown, chart, the scored texts),
quickstart.json (BLEU and chrF per direction, sample translations, stage timings).
Interrupted? Run the same command again: it continues from the last checkpoint (a finished training or export
is kept), so a rerun never starts over; --overwrite does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

CONFIG_NAME = "quickstart.yaml"
SETTINGS_FILE, REPORT_FILE = "quickstart_settings.json", "quickstart.json"
NUM_SAMPLES = 3
# Minutes of training: with corpus, tokenizer, export and evaluation (about a minute on 2 CPU cores) the
# quickstart fits 15 minutes; a faster machine reaches the config's max_steps first.
TIME_BUDGET_MINUTES = 12.0


def packaged_config(name: str = CONFIG_NAME) -> Path:
    """configs/<name> shipped inside the package (hf_moe_mt/configs; the repo's configs/ links to it)."""
    return Path(__file__).resolve().parents[1] / "configs" / name


def add_quickstart_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="build corpus → train a small MoE → export → translate + BLEU/chrF (minutes on a CPU)")
    parser.add_argument("--output", default="runs/quickstart", help="directory for every output")
    parser.add_argument("--config", default=None, help=f"training YAML (default: the packaged {CONFIG_NAME})")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--time-budget", type=float, default=TIME_BUDGET_MINUTES, metavar="MINUTES",
                        help="stop training after this many minutes (or at max_steps, whichever comes first; "
                        f"default {TIME_BUDGET_MINUTES:g}; 0 = no limit)")
    parser.add_argument("--test-sentences", type=int, default=None,
                        help="test pairs translated per direction (default: all; 200 verses per direction rank "
                        "models 1-1.5 BLEU apart unreliably)")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous quickstart in --output first")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra training config overrides")
    parser.set_defaults(func=run_quickstart_command)


def run_quickstart_command(args) -> int:
    report = run_quickstart(args.output, config=args.config, max_steps=args.max_steps,
                            time_budget=args.time_budget or None, test_sentences=args.test_sentences,
                            overwrite=args.overwrite, overrides=args.overrides)
    print(format_report(report))
    return 0


def run_quickstart(output: str | os.PathLike, *, config: str | None = None, max_steps: int | None = None,
                   time_budget: float | None = None, test_sentences: int | None = None, overwrite: bool = False,
                   overrides: list[str] = ()) -> dict:
    """1. train for at most `time_budget` minutes (builds corpus + tokenizer; resumes a run a previous call left
    unfinished, counting the time it spent)  2. export  3. translate the test books into English, BLEU + chrF
    4. write quickstart.json."""
    from ..training.config import load_train_config

    root = Path(output)
    settings = {"config": str(config or packaged_config()), "max_steps": max_steps, "time_budget": time_budget,
                "overrides": list(overrides), "test_sentences": test_sentences}
    _prepare_output(root, settings, overwrite)
    extra = [f"training.output_dir={root / 'train'}"] + ([f"training.max_steps={max_steps}"] if max_steps else [])
    extra += [f"budget.minutes={time_budget}"] if time_budget else []
    train_config = load_train_config(settings["config"], [*extra, *overrides])
    seconds = {}
    # 1.
    start = time.perf_counter()
    summary = _train_or_resume(train_config)
    seconds["train"] = time.perf_counter() - start
    # 2.
    start = time.perf_counter()
    model_dir = _export_once(root, summary)
    seconds["export"] = time.perf_counter() - start
    # 3.
    start = time.perf_counter()
    scores, samples = evaluate_test_split(model_dir, root / "train" / "corpus", test_sentences, root / "evaluation")
    seconds["evaluate"] = time.perf_counter() - start
    # 4.
    report = {"model_dir": str(model_dir), "scores": scores, "samples": samples,
              "train": {key: summary.get(key) for key in ("global_step", "train_loss", "eval_loss", "bf16")},
              "seconds": {stage: round(value, 1) for stage, value in seconds.items()}}
    (root / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def _train_or_resume(train_config) -> dict:
    """A finished training is read back; a run with checkpoints continues from the last complete one."""
    from ..training.checkpoints import last_complete_checkpoint
    from ..training.run import SUMMARY_FILE, run_training

    summary_file = Path(train_config.output_dir) / SUMMARY_FILE
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    resume = last_complete_checkpoint(train_config.output_dir) is not None
    return run_training(train_config, resume=resume or None)


def _export_once(root: Path, summary: dict) -> Path:
    from .export import export_model

    model_dir = root / "model"
    if (model_dir / "config.json").is_file():  # export renames a verified folder into place: it is complete
        return model_dir
    return export_model(summary["model_dir"], model_dir, root / "train" / "tokenizer").output_dir


def evaluate_test_split(model_dir: Path, corpus_dir: Path, per_direction: int | None,
                        output_dir: Path) -> tuple[dict, dict]:
    """`hf-moe-mt evaluate` of X→en on the first `per_direction` test pairs (None: all) of every language (into
    `output_dir`), and the first few translations of each direction as samples."""
    from ..data import load_corpus
    from .evaluate import TRANSLATIONS_DIR, evaluate_model

    languages = sorted(set(load_corpus(str(corpus_dir))["test"]["src_lang"]))
    report = evaluate_model(model_dir, corpus_dir, split="test", directions=[(code, "en") for code in languages],
                            max_sentences=per_direction, output_dir=output_dir, overwrite=True)
    scores = {name: {"bleu": round(result["bleu"], 2), "chrf": round(result["chrf"], 2)}
              for name, result in report["directions"].items()}
    samples = {}
    for name in scores:
        source, hypothesis, reference = ((output_dir / TRANSLATIONS_DIR / f"{name}.{suffix}").read_text().splitlines()
                                         for suffix in ("src", "hyp", "ref"))
        samples[name] = [{"source": s, "reference": r, "translation": h}
                         for s, h, r in list(zip(source, hypothesis, reference))[:NUM_SAMPLES]]
    return scores, samples


def format_report(report: dict) -> str:
    """The scores table and the sample translations, as the quickstart prints them."""
    lines = [f"model: {report['model_dir']}", "", f"{'direction':<10} {'BLEU':>6} {'chrF':>6}"]
    for direction, score in report["scores"].items():
        lines.append(f"{direction:<10} {score['bleu']:>6.1f} {score['chrf']:>6.1f}")
    for direction, samples in report["samples"].items():
        lines.append(f"\n{direction}")
        for sample in samples:
            lines += [f"  source      {sample['source']}", f"  reference   {sample['reference']}",
                      f"  translation {sample['translation']}", ""]
    train = report.get("train", {})
    if train.get("global_step"):
        precision = "bf16" if train.get("bf16") else "fp32"
        lines.append(f"trained {train['global_step']} steps ({precision}), dev loss {train.get('eval_loss') or 0:.3f}")
    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in report["seconds"].items())
    return "\n".join([*lines, timings])


def _prepare_output(root: Path, settings: dict, overwrite: bool) -> None:
    """A fresh or empty directory, or one of an earlier quickstart with the same settings (which then continues)."""
    settings_file = root / SETTINGS_FILE
    if overwrite and root.exists():
        import shutil

        shutil.rmtree(root)
    if root.exists() and any(root.iterdir()):
        if not settings_file.is_file():
            raise ValueError(f"{root} is not empty and holds no quickstart; choose another --output or pass "
                             "--overwrite")
        previous = json.loads(settings_file.read_text())
        if previous != settings:
            raise ValueError(f"{root} holds a quickstart with other settings ({previous}); rerun with those to "
                             "continue it, or pass --overwrite to start over")
        return
    root.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=1) + "\n")
