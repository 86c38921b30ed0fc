"""Top-1 against top-2 routing and the capacity factor (1.0 / 1.25 / dropless): the quality/speed trade-off.

Arms: top-k ∈ {1, 2} × capacity factor ∈ {1.0, 1.25, dropless}, the recipe's MoE otherwise, the same steps and
tokens per step. Top-2 runs two experts per token: more FLOPs per step, so the table reports training tokens per
second beside the quality (dev loss, test BLEU/chrF). Writes results/topk_capacity/{results.json,curves.png}.

  python scripts/experiments/topk_capacity.py
  python scripts/experiments/topk_capacity.py --seeds 0,1 --steps 4000
"""

from harness import Arm, Experiment, experiment_parser, logged_values, plot_curves

CAPACITIES = {"cf1.0": ["model.config.capacity_factor=1.0"], "cf1.25": ["model.config.capacity_factor=1.25"],
              "dropless": ["model.config.router_drop_tokens=false"]}
ARMS = [Arm(f"top{k}-{name}", [f"model.config.num_experts_per_tok={k}", *overrides], f"top-{k}, {name}")
        for k in (1, 2) for name, overrides in CAPACITIES.items()]


def main(argv=None) -> int:
    args = experiment_parser(__doc__, default_steps=300).parse_args(argv)
    experiment = Experiment("topk_capacity", args)

    def with_training_time(arm, seed, data):
        run = experiment.run_arm(arm, seed, data)
        run["training_seconds"] = run["curve"][-1]["cpu"] if run["curve"] else None
        # what the capacity does: the share of routed (token, expert) pairs dropped, over the last quarter of training
        drops = logged_values(experiment.work_dir / f"{arm.name}-seed{seed}", "router/dropped_fraction")
        late = [value for step, value in drops if step > 0.75 * args.steps] or [value for _, value in drops[-1:]]
        run["dropped_fraction"] = sum(late) / len(late) if late else None
        return run

    runs = experiment.run_all(ARMS, with_training_time)["runs"]
    plot_curves(runs, experiment.results_dir / "curves.png", "top-k and capacity factor at equal steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
