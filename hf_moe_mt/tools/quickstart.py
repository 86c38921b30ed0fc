"""`hf-moe-mt quickstart`: the whole job end to end on the bundled default, as library calls —
build the offline Bible corpus → train a tiny MoE (configs/tiny.yaml) → export an HF folder →
translate the held-out test books with pipeline("translation") and score them with sacrebleu.

Outputs under --output: train/ (corpus, tokenizer, checkpoints, plots, final model), model/ (the
exported folder), quickstart.json (BLEU per direction + sample translations).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_NAME = "tiny.yaml"


def packaged_config(name: str = CONFIG_NAME) -> Path:
    """configs/<name> shipped inside the package (hf_moe_mt/configs; the repo's configs/ links to it)."""
    return Path(__file__).resolve().parents[1] / "configs" / name


def add_quickstart_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="build corpus → train a tiny MoE → export → translate + BLEU (minutes on a CPU)")
    parser.add_argument("--output", default="runs/quickstart", help="directory for every output")
    parser.add_argument("--config", default=None, help=f"training YAML (default: the packaged {CONFIG_NAME})")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--test-sentences", type=int, default=50, help="test pairs translated per direction")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous quickstart in --output first")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra training config overrides")
    parser.set_defaults(func=run_quickstart_command)


def run_quickstart_command(args) -> int:
    report = run_quickstart(args.output, config=args.config, max_steps=args.max_steps,
                            test_sentences=args.test_sentences, overwrite=args.overwrite, overrides=args.overrides)
    print(json.dumps({key: report[key] for key in ("model_dir", "bleu")}, indent=1))
    return 0


def run_quickstart(output: str | os.PathLike, *, config: str | None = None, max_steps: int | None = None,
                   test_sentences: int = 50, overwrite: bool = False, overrides: list[str] = ()) -> dict:
    """1. train (builds corpus + tokenizer)  2. export  3. translate the test split into English + BLEU."""
    from ..training.config import load_train_config
    from ..training.run import run_training
    from .export import export_model

    root = Path(output)
    _prepare_output(root, overwrite)
    extra = [f"training.output_dir={root / 'train'}"] + ([f"training.max_steps={max_steps}"] if max_steps else [])
    train_config = load_train_config(str(config or packaged_config()), [*extra, *overrides])
    # 1.
    summary = run_training(train_config)
    # 2.
    exported = export_model(summary["model_dir"], root / "model", root / "train" / "tokenizer")
    # 3.
    bleu, samples = evaluate_test_split(exported.output_dir, root / "train" / "corpus", test_sentences)
    report = {"model_dir": str(exported.output_dir), "bleu": bleu, "samples": samples,
              "train": {key: summary.get(key) for key in ("global_step", "train_loss", "eval_loss")}}
    (root / "quickstart.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def evaluate_test_split(model_dir: Path, corpus_dir: Path, per_direction: int) -> tuple[dict, dict]:
    """BLEU of X→en on the first `per_direction` test pairs of every language, and one sample each."""
    from ..data import load_corpus
    from .scoring import corpus_bleu
    from .translate import load_translator, translate

    test = load_corpus(str(corpus_dir))["test"]
    bleu, samples = {}, {}
    for language in sorted(set(test["src_lang"])):
        rows = test.filter(lambda row, lang=language: row["src_lang"] == lang).select(
            range(min(per_direction, sum(1 for code in test["src_lang"] if code == language))))
        translator = load_translator(model_dir, language, "en")
        hypotheses = translate(translator, rows["src_text"], num_beams=4, max_new_tokens=64)
        bleu[f"{language}-en"] = round(corpus_bleu(hypotheses, rows["tgt_text"]).score, 2)
        samples[f"{language}-en"] = {"source": rows["src_text"][0], "reference": rows["tgt_text"][0],
                                     "translation": hypotheses[0]}
    return bleu, samples


def _prepare_output(root: Path, overwrite: bool) -> None:
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(f"{root} is not empty; pass --overwrite to start the quickstart again there")
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
