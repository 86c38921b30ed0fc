"""Markdown tables of the experiment results (results/<experiment>/results.json, results/model_tools/*.json and
results/model_tools/<source model>/*.json),
as docs/RESULTS.md quotes them: rerun after an experiment and paste, so the document never drifts from the data.

  python scripts/experiments/tables.py                  # every result found under results/
  python scripts/experiments/tables.py --results results --only moe_vs_dense,pruning
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HARNESS_EXPERIMENTS = ("moe_vs_dense", "rts_vs_position", "multitask", "topk_capacity")
MODEL_TOOL_SECTIONS = ("pruning", "aoe", "upcycling")


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def harness_table(results: dict) -> str:
    """One row per arm and seed: final dev loss, steps, training CPU minutes, test BLEU/chrF per pivot average."""
    runs = results["runs"]
    averages = sorted({name for run in runs for name in run["scores"].get("averages", {})})
    drops = any("dropped_fraction" in run for run in runs)  # topk_capacity: what the capacity factor drops
    header = (["arm", "seed", "steps", "dev loss", "train CPU min"] + (["dropped, last ¼"] if drops else [])
              + [f"{m} {a}" for a in averages for m in ("BLEU", "chrF")])
    rows = []
    for run in runs:
        final = run["curve"][-1] if run["curve"] else {}
        cells = [run["label"], str(run["seed"]), str(final.get("step", "–")), _number(final.get("dev_loss"), 3),
                 _number(final["cpu"] / 60 if "cpu" in final else None, 1)]
        if drops:
            dropped = run.get("dropped_fraction")
            cells.append("–" if dropped is None else f"{100 * dropped:.1f} %")
        for average in averages:
            scores = run["scores"].get("averages", {}).get(average, {})
            cells += [_number(scores.get("bleu")), _number(scores.get("chrf"))]
        rows.append(cells)
    lines = [markdown(header, rows), "", curve_table(runs)]
    extra = {key: value for key, value in results.items() if key.startswith("steps_to")}
    for key, value in extra.items():
        lines.append(f"\n{key}: " + ", ".join(f"{arm} {step if step is not None else 'not reached'}"
                                              for arm, step in value.items()))
    return "\n".join(lines)


def curve_table(runs: list[dict]) -> str:
    """Dev loss of every arm at every evaluated step (a step an arm did not evaluate shows –)."""
    steps = sorted({point["step"] for run in runs for point in run["curve"] if point.get("dev_loss") is not None})
    one_seed = len({run["seed"] for run in runs}) == 1
    rows = []
    for run in runs:
        loss_at = {point["step"]: point.get("dev_loss") for point in run["curve"]}
        label = run["label"] if one_seed else f"{run['label']}, seed {run['seed']}"
        rows.append([label, *(_number(loss_at.get(step), 3) for step in steps)])
    return markdown(["dev loss at step", *(f"{step:,}" for step in steps)], rows)


def pruning_table(section: dict) -> str:
    """BLEU is the mean over the directions; the X→en / en→X columns appear when both averages were scored."""
    rows = section["result"]
    pivots = [key for key in ("bleu_x-en", "bleu_en-x") if all(key in row for row in rows)]
    header = ["kept", "method", "experts/layer", "parameters", "weights MiB", "peak MiB", "sent/s", "BLEU",
              *(("X→en" if key == "bleu_x-en" else "en→X") for key in pivots), "chrF"]
    return markdown(header, [[str(row["keep"]), row["method"], str(row["experts"]), f"{row['parameters']:,}",
                              _number(row["weights_mib"], 1), _number(row.get("peak_memory_mib"), 0),
                              _number(row["sentences_per_second"], 1), _number(row["bleu"]),
                              *(_number(row[key]) for key in pivots), _number(row["chrf"])]
                             for row in rows])


def aoe_table(section: dict) -> str:
    return markdown(["model", "dev loss"],
                    [[name, _number(loss, 3)] for name, loss in section["result"]["dev_loss"].items()])


def upcycling_table(section: dict) -> str:
    return markdown(["model", "parameters", "dev loss", "BLEU", "chrF"],
                    [[name, f"{point['parameters']:,}", _number(point["dev_loss"], 3), _number(point["bleu"]),
                      _number(point["chrf"])] for name, point in section["result"]["points"].items()])


SECTION_TABLES = {"pruning": pruning_table, "aoe": aoe_table, "upcycling": upcycling_table}


def all_tables(results_dir: Path, only: set[str] | None = None) -> list[tuple[str, str]]:
    tables = []
    for name in HARNESS_EXPERIMENTS:
        path = results_dir / name / "results.json"
        if path.is_file() and (only is None or name in only):
            tables.append((name, harness_table(json.loads(path.read_text()))))
    root = results_dir / "model_tools"  # one folder per source model: model_tools/ itself and its subfolders
    folders = [root, *sorted(path for path in root.iterdir() if path.is_dir())] if root.is_dir() else []
    for folder in folders:
        for name in MODEL_TOOL_SECTIONS:
            path = folder / f"{name}.json"
            if path.is_file() and (only is None or name in only):
                title = name if folder == root else f"{name} ({folder.name})"
                tables.append((title, SECTION_TABLES[name](json.loads(path.read_text()))))
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[2] / "results"))
    parser.add_argument("--only", default=None, help="comma-separated experiment or section names")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    tables = all_tables(Path(args.results), only)
    if not tables:
        raise SystemExit(f"no results under {args.results}; run an experiment script first")
    for name, table in tables:
        print(f"### {name}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
