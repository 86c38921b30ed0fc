"""MoE against dense at equal activated FLOPs (the paper's central claim, at small scale).

Arms: the recipe's model with every FFN dense, and with 8 and 16 experts in every other layer (top-1, capacity
1.0 in training / 2.0 in evaluation, Random Token Selection). Same d_model, layers, expert width = dense FFN
width, tokens per step, optimizer and schedule: a token meets the same number of FLOPs in every arm.
Reported: dev-loss curves against steps and training time, test BLEU/chrF per direction, and the first step at
which each MoE arm reaches the dense arm's final dev loss. Writes results/moe_vs_dense/{results.json,curves.png}.

  python scripts/experiments/moe_vs_dense.py                         # defaults: about an hour on 2 CPU cores
  python scripts/experiments/moe_vs_dense.py --seeds 0,1             # the headline comparison, two seeds
  python scripts/experiments/moe_vs_dense.py --eom 0.2                # adds 8 experts with expert output masking
  python scripts/experiments/moe_vs_dense.py --steps 20000 training.bf16=true data.max_tokens=16384   # a GPU
"""

from harness import Arm, Experiment, experiment_parser, plot_curves, steps_to_reach

ARMS = [
    Arm("dense", ["model.config.encoder_sparse_step=0", "model.config.decoder_sparse_step=0"], "dense"),
    Arm("moe8", ["model.config.num_experts=8"], "MoE, 8 experts"),
    Arm("moe16", ["model.config.num_experts=16"], "MoE, 16 experts"),
]
# The paper's routing, whatever the recipe says.
ROUTING = ["model.config.num_experts_per_tok=1", "model.config.capacity_factor=1.0",
           "model.config.eval_capacity_factor=2.0", "model.config.router_use_rts=true",
           "model.config.encoder_sparse_step=2", "model.config.decoder_sparse_step=2"]


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, default_steps=600)
    parser.add_argument("--eom", type=float, default=None,
                        help="also train 8 experts with expert output masking at this rate (model.config.moe_eom)")
    args = parser.parse_args(argv)
    experiment = Experiment("moe_vs_dense", args, ROUTING)
    arms = ARMS + ([Arm("moe8-eom", ["model.config.num_experts=8", f"model.config.moe_eom={args.eom}"],
                        f"MoE, 8 experts, EOM {args.eom}")] if args.eom else [])
    results = experiment.run_all(arms)
    runs = results["runs"]
    results["steps_to_dense_final_loss"] = {
        f"{run['arm']}-seed{run['seed']}": steps_to_reach(run["curve"], dense_final(runs, run["seed"]))
        for run in runs if run["arm"] != "dense"}
    experiment.write(results)
    plot_curves(runs, experiment.results_dir / "curves.png", "MoE vs dense at equal activated FLOPs")
    return 0


def dense_final(runs: list[dict], seed: int) -> float:
    dense = next(run for run in runs if run["arm"] == "dense" and run["seed"] == seed)
    return dense["curve"][-1]["dev_loss"]


if __name__ == "__main__":
    raise SystemExit(main())
