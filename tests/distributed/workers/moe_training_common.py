"""Shared by the training workers (DeepSpeed and DDP): tiny MoE models, data, the single-process reference.

Models: `tiny` = embedding → SparseMoE → SparseMoE → LayerNorm → head (residuals around the MoE layers),
loss = cross-entropy + 0.1·mean aux loss; `moe_mt` = a tiny MoEMTForConditionalGeneration (its own loss).
Routing is dropless top-2 without RTS (RTS orders each expert's rows by a random priority, so gradient
sums would depend on the RNG state although no token is dropped). Each rank's loss is a mean over its own
shard (aux loss over its own tokens, as in data parallel training), so the reference loss is the mean
of the per-shard losses of one process holding every expert.

Adam hyperparameters: Adam divides by sqrt(v) + eps, so a gradient element that is mathematically zero
(attention k_proj biases) or nearly so turns float rounding noise (~1e-9) into updates of up to lr.
eps = 1e-6 and lr = 1e-3 keep that far below the 1e-5 tolerance. Adam also hides a wrong gradient
*scale*; the workers therefore compare the global gradient norm of every step too.
"""

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from hf_moe_mt.moe import SparseMoE
from hf_moe_mt.parallel import is_expert_parameter

VOCAB, HIDDEN, FFN, EXPERTS, SEQ, MICRO_BATCH = 32, 16, 24, 4, 6, 2
LR, ADAM_EPS, WEIGHT_DECAY, MAX_GRAD_NORM, AUX_COEF = 1e-3, 1e-6, 0.1, 0.3, 0.1
ADAM = {"lr": LR, "eps": ADAM_EPS}


class TinyMoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(SparseMoE(HIDDEN, FFN, EXPERTS, top_k=2, drop_tokens=False, use_rts=False,
                                              activation="gelu") for _ in range(2))
        self.layer_norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB)
        for layer in self.layers:  # larger experts than the default 0.02 so they matter in 3 steps
            layer.experts.reset_parameters(std=0.3)

    def forward(self, input_ids, labels):
        hidden = self.embed_tokens(input_ids)  # [B, S, D]
        aux = []
        for layer in self.layers:
            out, info = layer(hidden)
            hidden = hidden + out
            aux.append(info.aux_loss)
        logits = self.lm_head(self.layer_norm(hidden))  # [B, S, V]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + AUX_COEF * torch.stack(aux).mean()


def skip_deepspeed_shm_build() -> None:
    """Skip DeepSpeed's ~100 s JIT build of its shared-memory inference all-reduce (training never uses
    it). Call before deepspeed initialises; patches the module object itself (`import deepspeed.comm.torch
    as m` binds torch.distributed's `torch`, see PLATFORM_NOTES)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# MoEMTForConditionalGeneration: 2+2 layers, MoE in layer 1 of each stack, dropless top-2, no dropout.
MOE_MT_CONFIG = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, expert_ffn_dim=FFN,
                     num_experts=EXPERTS, num_experts_per_tok=2, router_drop_tokens=False, router_use_rts=False,
                     router_z_loss_coef=0.01, max_position_embeddings=16, dropout=0.0, init_std=0.2)


def build_model(seed: int = 0, kind: str = "tiny") -> nn.Module:
    """`tiny` (TinyMoEModel) or `moe_mt` (a tiny MoEMTForConditionalGeneration), same weights per seed."""
    torch.manual_seed(seed)
    if kind == "tiny":
        return TinyMoEModel()
    from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration

    return MoEMTForConditionalGeneration(MoEMTConfig(**MOE_MT_CONFIG))


def model_loss(model, input_ids, labels) -> torch.Tensor:
    """The training loss of either model (or of a DeepSpeed engine / DDP wrapping one)."""
    out = model(input_ids=input_ids, labels=labels)
    return out if isinstance(out, torch.Tensor) else out.loss


def global_batches(world: int, steps: int, seed: int = 1):
    """[world·MICRO_BATCH, SEQ] ids and labels per step, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    # ids from 3: no pad/bos/eos token, so no position is padding.
    return [(torch.randint(3, VOCAB, (world * MICRO_BATCH, SEQ), generator=generator),
             torch.randint(3, VOCAB, (world * MICRO_BATCH, SEQ), generator=generator)) for _ in range(steps)]


def shard(batch, rank: int):
    ids, labels = batch
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    return ids[rows], labels[rows]


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + step)  # changes every step: a resumed scheduler must be exact


@dataclass
class Run:
    losses: list[float]  # global loss of every step (mean over the ranks' shards)
    grad_norms: list[float]  # global gradient norm of every step, before clipping
    state: dict | None = None  # the full state dict after the last step


def reference_training(batches, world: int, weight_decay_everywhere: bool = False,
                       with_scheduler: bool = False, kind: str = "tiny") -> Run:
    """One process, every expert: AdamW with the Trainer's decay rule, torch clip_grad_norm_."""
    model = build_model(kind=kind).train()
    if weight_decay_everywhere:
        param_groups = [{"params": list(model.parameters()), "weight_decay": WEIGHT_DECAY}]
    else:
        decay = [p for n, p in model.named_parameters() if is_decayed(n)]
        no_decay = [p for n, p in model.named_parameters() if not is_decayed(n)]
        param_groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(param_groups, **ADAM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if with_scheduler else None
    run = Run([], [])
    for batch in batches:
        loss = torch.stack([model_loss(model, *shard(batch, r)) for r in range(world)]).mean()
        loss.backward()
        run.grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        run.losses.append(loss.item())
    run.state = model.state_dict()
    return run


def assert_runs_match(run: Run, reference: Run, tolerance: float = 1e-5) -> dict[str, float]:
    """Losses and parameters within `tolerance`, gradient norms within `tolerance` relative; returns the
    parameter differences (and a readable failure message naming the worst parameters)."""
    loss_diff = max(abs(a - b) for a, b in zip(run.losses, reference.losses, strict=True))
    norm_diff = max(abs(a - b) / b for a, b in zip(run.grad_norms, reference.grad_norms, strict=True))
    diffs = abs_diffs(run.state, reference.state)
    worst = sorted(diffs.items(), key=lambda item: -item[1])[:3]
    assert loss_diff < tolerance and norm_diff < tolerance and worst[0][1] < tolerance, (
        f"loss diff {loss_diff:.2e}, grad-norm rel diff {norm_diff:.2e}, worst params {worst}, "
        f"losses {run.losses} vs {reference.losses}, norms {run.grad_norms} vs {reference.grad_norms}")
    return {"loss_diff": loss_diff, "grad_norm_rel_diff": norm_diff, "param_diff": worst[0][1]}


def is_decayed(name: str) -> bool:
    """The HF Trainer's rule for these models: no decay for biases and LayerNorms (all named *norm*)."""
    return not ("bias" in name or "norm" in name)


def deepspeed_config(world: int, stage: int, offload: bool = False, optimizer_section: bool = False,
                     torch_adam: bool = True) -> dict:
    """`optimizer_section`: DeepSpeed builds AdamW itself: torch's (`torch_adam`), or with offload its
    DeepSpeedCPUAdam (a one-time ~70 s C++ JIT build on 2 cores)."""
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # allow torch AdamW (DeepSpeedCPUAdam needs a JIT build)
    if optimizer_section:
        params = {**ADAM, "weight_decay": WEIGHT_DECAY, "torch_adam": torch_adam}
        config["optimizer"] = {"type": "AdamW", "params": params}
    return config


def train_engine(engine, batches, rank: int, world: int) -> Run:
    """DeepSpeed steps on this rank's shards; global losses and the engine's global gradient norms."""
    run = Run([], [])
    for batch in batches:
        loss = model_loss(engine, *shard(batch, rank))
        engine.backward(loss)
        engine.step()
        run.grad_norms.append(float(engine.get_global_grad_norm()))
        run.losses.append(global_mean(loss))
    return run


def global_mean(loss: torch.Tensor) -> float:
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def max_abs_diff(state: dict, reference: dict) -> float:
    return max(abs_diffs(state, reference).values())


def abs_diffs(state: dict, reference: dict) -> dict[str, float]:
    assert state.keys() == reference.keys(), sorted(set(state) ^ set(reference))
    return {name: (state[name] - reference[name]).abs().max().item() for name in reference}


def assert_expert_replicas_identical(model, groups) -> None:
    """Expert-DP replicas (same experts, different data) must stay bitwise equal under ZeRO sharding."""
    for name, param in model.named_parameters():
        if is_expert_parameter(param):
            replicas = [torch.empty_like(param) for _ in range(groups.edp_size)]
            dist.all_gather(replicas, param.detach().contiguous(), group=groups.edp_group)
            assert all(torch.equal(r, replicas[0]) for r in replicas), name
