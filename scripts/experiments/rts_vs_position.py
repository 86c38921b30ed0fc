"""Random Token Selection against dropping by position, at capacity factor 1.0.

When an expert overflows, RTS keeps a uniformly random subset of its tokens; position-based dropping keeps the
first ones in the batch (the token order is sentence after sentence), so the last sentences of every batch lose
their expert FFN far more often. Arms: the recipe's MoE with `router_use_rts` on and off (top-1, capacity 1.0).
Reported: dev-loss curves, test BLEU/chrF, and for every arm the fraction of tokens dropped at each relative
position of the batch (10 bins over its real tokens, every MoE layer, every training step): flat for RTS,
rising for position dropping. Writes results/rts_vs_position/{results.json,curves.png,drops_by_position.png}.

  python scripts/experiments/rts_vs_position.py
  python scripts/experiments/rts_vs_position.py --seeds 0,1 --steps 4000
"""

import json

import torch

import hf_moe_mt.moe as moe_module
from harness import Arm, Experiment, experiment_parser, plot_curves

BINS = 10
ARMS = [Arm("rts", ["model.config.router_use_rts=true"], "Random Token Selection"),
        Arm("position", ["model.config.router_use_rts=false"], "drop by position")]
ROUTING = ["model.config.num_experts_per_tok=1", "model.config.capacity_factor=1.0",
           "model.config.router_drop_tokens=true"]


class DropsByPosition:
    """Counts, while `recording`, the kept and dropped first-choice pairs of every training-time routing plan by
    the token's relative position in the layer's token order. Installed around `hf_moe_mt.moe.plan_routing`,
    which SparseMoE looks up at call time."""

    def __init__(self):
        self.dropped, self.total = torch.zeros(BINS, dtype=torch.float64), torch.zeros(BINS, dtype=torch.float64)
        self.original = moe_module.plan_routing

    def plan_routing(self, probs, top_k, capacity, random_priority):
        plan = self.original(probs, top_k, capacity, random_priority)
        if capacity is not None and torch.is_grad_enabled() and plan.num_tokens:
            first_choice = plan.row_of_pair.view(plan.num_tokens, top_k)[:, 0].cpu()
            dropped = (first_choice >= plan.kept_pairs.shape[0]).double()
            bins = torch.arange(plan.num_tokens) * BINS // plan.num_tokens
            self.dropped += torch.zeros(BINS, dtype=torch.float64).index_add_(0, bins, dropped)
            self.total += torch.bincount(bins, minlength=BINS).double()
        return plan

    def __enter__(self):
        moe_module.plan_routing = self.plan_routing
        return self

    def __exit__(self, *exc):
        moe_module.plan_routing = self.original

    def save(self, path) -> None:
        """Add this process's counts to the ones a stopped earlier process saved (a resumed arm)."""
        counts = json.loads(path.read_text()) if path.is_file() else {"dropped": [0.0] * BINS, "total": [0.0] * BINS}
        counts = {key: [a + float(b) for a, b in zip(counts[key], getattr(self, key))] for key in counts}
        path.write_text(json.dumps(counts))


def fractions(path) -> list[float] | None:
    if not path.is_file():
        return None
    counts = json.loads(path.read_text())
    return [round(d / t, 5) if t else None for d, t in zip(counts["dropped"], counts["total"])]


def plot_drops(profiles: dict[str, list[float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    centers = [(i + 0.5) / BINS for i in range(BINS)]
    for label, fractions in profiles.items():
        axis.plot(centers, [100 * f for f in fractions], marker="o", label=label)
    axis.set(xlabel="relative position of the token in the batch", ylabel="tokens dropped (%)",
             title="capacity drops by position (training, all MoE layers)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = experiment_parser(__doc__, default_steps=400).parse_args(argv)
    experiment = Experiment("rts_vs_position", args, ROUTING)

    def with_drop_profile(arm, seed, data):
        profile_file = experiment.work_dir / f"{arm.name}-seed{seed}" / "drops_by_position.json"
        with DropsByPosition() as drops:
            run = experiment.run_arm(arm, seed, data)
        if drops.total.sum() > 0:  # this call trained
            drops.save(profile_file)
        run["drops_by_position"] = fractions(profile_file)
        return run

    runs = experiment.run_all(ARMS, with_drop_profile)["runs"]
    plot_curves(runs, experiment.results_dir / "curves.png", "RTS vs drop-by-position, capacity 1.0")
    plot_drops({f"{run['label']} (seed {run['seed']})": run["drops_by_position"] for run in runs
                if run["drops_by_position"]}, experiment.results_dir / "drops_by_position.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
