"""Router metrics during training and the end-of-training plots.

Owns: `RouterMetrics` (forward hooks on every SparseMoE that accumulate, on device, what each training
forward routed: expert loads, routed pairs, aux and z losses; reduced over all ranks once per logging step),
the PNG heatmap of expert load per layer, the loss-curve PNG, and `TrainingPlotsCallback` which writes both
when training ends. Imports no deepspeed; never imported by modeling/configuration code.

Metrics (keys as logged; TensorBoard shows them under train/router/...):
    router/aux_loss, router/z_loss         mean over MoE layers and training forwards (what the loss adds)
    router/dropped_fraction                dropped (token, expert) pairs / all pairs, over every MoE layer
    router/load_cv                         mean over layers of the per-layer values below
    router/{layer}/load_cv                 coefficient of variation (std / mean) of the expert loads; 0 = balanced
    router/{layer}/max_load                busiest expert's load / mean load; 1 = balanced, E = one expert takes all
    router/{layer}/dropped_fraction        that layer's dropped pairs / pairs
Loads count the (token, expert) pairs an expert processed, summed over every rank's tokens.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..moe import SparseMoE


def layer_label(module_name: str) -> str:
    """'model.encoder.layers.1.mlp' → 'encoder.1' (short keys for loggers and plot axes)."""
    parts = [p for p in module_name.split(".") if p not in ("model", "layers", "mlp")]
    return ".".join(parts) or module_name


class RouterMetrics:
    """Accumulates routing statistics of every SparseMoE in `model` during training forwards.

    Hooks read the RouterInfo the layer returns anyway (no router logits are requested from the model) and
    add to device buffers: no host sync per step. `compute()` is collective under torch.distributed: every
    rank calls it at the same step (the Trainer logs on every rank). Layers recomputed by activation
    checkpointing are counted twice, which leaves every logged ratio and mean unchanged.
    """

    def __init__(self, model: torch.nn.Module):
        self.layer_names, self._handles, self.num_experts = [], [], 0
        for name, module in model.named_modules():
            if isinstance(module, SparseMoE):
                self._handles.append(module.register_forward_hook(self._hook(len(self.layer_names)), with_kwargs=True))
                self.layer_names.append(layer_label(name))
                self.num_experts = module.num_experts
        self._window: dict[str, torch.Tensor] | None = None
        self.total_load = torch.zeros(len(self.layer_names), self.num_experts, dtype=torch.float64)

    def _buffers(self, device) -> dict[str, torch.Tensor]:
        if self._window is None:
            num_layers = len(self.layer_names)
            self._window = {"load": torch.zeros(num_layers, self.num_experts, dtype=torch.float64, device=device),
                            **{key: torch.zeros(num_layers, dtype=torch.float64, device=device)
                               for key in ("pairs", "aux", "z", "calls")}}
        return self._window

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            if not module.training:
                return
            hidden_states = args[0] if args else kwargs["hidden_states"]
            padding_mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            _, info = output
            # real tokens × top-k = the pairs routing considered (padding is never routed)
            if padding_mask is None:
                tokens = torch.tensor(hidden_states.numel() // hidden_states.shape[-1], dtype=torch.float64)
            else:
                tokens = padding_mask.detach().sum()
            window = self._buffers(info.tokens_per_expert.device)
            window["load"][index] += info.tokens_per_expert.detach()
            window["pairs"][index] += tokens.to(window["pairs"].device) * module.top_k
            window["aux"][index] += info.aux_loss.detach()
            window["z"][index] += info.z_loss.detach()
            window["calls"][index] += 1
        return hook

    def _reduced_window(self) -> dict[str, torch.Tensor] | None:
        """This window's sums over every rank, on CPU (one collective, one host sync); resets the window.
        None when no rank ran a training forward since the last call."""
        window = self._window if self._window is not None else self._buffers("cpu")
        self._window = None
        flat = torch.cat([window[key].reshape(-1) for key in ("load", "pairs", "aux", "z", "calls")])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.to(collective_device())
            dist.all_reduce(flat)
        num_layers, num_experts = len(self.layer_names), self.num_experts
        load, pairs, aux, z, calls = torch.split(flat.cpu(), [num_layers * num_experts] + [num_layers] * 4)
        if calls.sum() == 0:
            return None
        return {"load": load.view(num_layers, num_experts), "pairs": pairs, "aux": aux, "z": z, "calls": calls}

    def compute(self) -> dict[str, float]:
        """Metrics of the training forwards since the last call (empty dict if there were none)."""
        if not self.layer_names:
            return {}
        window = self._reduced_window()
        if window is None:
            return {}
        load, pairs, calls = window["load"], window["pairs"], window["calls"].clamp_min(1)
        self.total_load += load
        metrics = {"router/aux_loss": float((window["aux"] / calls).mean()),
                   "router/z_loss": float((window["z"] / calls).mean()),
                   "router/dropped_fraction": float(1 - load.sum() / pairs.sum().clamp_min(1))}
        cvs = []
        for name, layer_load, layer_pairs in zip(self.layer_names, load, pairs):
            mean = layer_load.mean()
            cv = float(layer_load.std(unbiased=False) / mean) if mean > 0 else 0.0
            cvs.append(cv)
            metrics[f"router/{name}/load_cv"] = cv
            metrics[f"router/{name}/max_load"] = float(layer_load.max() / mean) if mean > 0 else 0.0
            metrics[f"router/{name}/dropped_fraction"] = float(1 - layer_load.sum() / layer_pairs.clamp_min(1))
        metrics["router/load_cv"] = sum(cvs) / len(cvs)
        return metrics

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- plots

def _save_figure(figure, path: str) -> None:
    """savefig to a temp name, then rename: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    temporary = f"{path}.tmp.png"
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    plt.close(figure)
    os.replace(temporary, path)


def plot_expert_load(total_load: torch.Tensor, layer_names: list[str], path: str) -> None:
    """Heatmap: rows = MoE layers, columns = experts, colour = that layer's share of routed pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = total_load / total_load.sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]
    num_layers, num_experts = share.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 0.35 * num_experts + 2), max(2.0, 0.45 * num_layers + 1.2)))
    image = axes.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
    axes.set_xlabel("expert")
    axes.set_yticks(range(num_layers), layer_names)
    axes.set_title(f"expert load per MoE layer (uniform = {1 / num_experts:.3f})")
    figure.colorbar(image, ax=axes, label="share of routed (token, expert) pairs")
    _save_figure(figure, path)


def plot_loss_curve(log_history: list[dict], path: str) -> None:
    """Training loss (and dev loss when evaluated) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "dev loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and math.isfinite(entry[key])]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    _save_figure(figure, path)


class TrainingPlotsCallback(TrainerCallback):
    """At the end of training: `expert_load.png` and `loss_curve.png` in the output directory.

    `on_train_end` runs on every rank; the last window of router statistics is reduced there (collective),
    then the main process draws.
    """

    EXPERT_LOAD_FILE, LOSS_CURVE_FILE = "expert_load.png", "loss_curve.png"

    def __init__(self, router_metrics: RouterMetrics | None):
        self.router_metrics = router_metrics

    def on_train_end(self, args, state, control, **kwargs):
        if self.router_metrics is not None:
            self.router_metrics.compute()
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        plot_loss_curve(state.log_history, os.path.join(args.output_dir, self.LOSS_CURVE_FILE))
        if self.router_metrics is not None and self.router_metrics.layer_names:
            plot_expert_load(self.router_metrics.total_load, self.router_metrics.layer_names,
                             os.path.join(args.output_dir, self.EXPERT_LOAD_FILE))
