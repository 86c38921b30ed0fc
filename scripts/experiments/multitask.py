"""Multitask ablation: translation in both directions with and without the denoising task, on the same budget.

Arms: the recipe's MoE trained on translation only (`data.denoising_ratio=0`) and on translation + mBART-style
denoising of the non-English sides (`data.denoising_ratio`, default 0.25 as in the paper's multitask setup).
Same steps and tokens per step, so the denoising arm sees fewer translation examples: the question is whether
the extra task pays for its share of the budget. Reported: dev-loss curves (translation dev pairs only, both
arms), test BLEU/chrF per direction. Writes results/multitask/{results.json,curves.png}.

  python scripts/experiments/multitask.py
  python scripts/experiments/multitask.py --denoising-ratio 0.5 --seeds 0,1
"""

from harness import Arm, Experiment, experiment_parser, plot_curves


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, default_steps=400)
    parser.add_argument("--denoising-ratio", type=float, default=0.25, help="share of denoising examples")
    args = parser.parse_args(argv)
    arms = [Arm("translation", ["data.denoising_ratio=0.0"], "translation only"),
            Arm("multitask", [f"data.denoising_ratio={args.denoising_ratio}"],
                f"translation + denoising ({args.denoising_ratio:.0%})")]
    experiment = Experiment("multitask", args, ["data.both_directions=true"])
    runs = experiment.run_all(arms, denoising_ratio=args.denoising_ratio)["runs"]
    plot_curves(runs, experiment.results_dir / "curves.png", "translation only vs translation + denoising")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
