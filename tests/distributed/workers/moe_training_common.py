"""Shared by the training workers (DeepSpeed and DDP): a tiny MoE model, its data, the single-process reference, configs.

Model: embedding → SparseMoE → SparseMoE → LayerNorm → head (residuals around the MoE layers),
dropless top-2 routing without RTS (RTS would order each expert's rows by a random priority, so
gradient sums would depend on the RNG state even though no token is dropped), loss = cross-entropy + 0.1·mean aux loss. Each rank's loss is a mean over its
own shard (aux loss over its own tokens, as in data parallel training), so the reference's loss is the
mean of the per-shard losses of one process holding every expert.
"""

import importlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from hf_moe_mt.moe import SparseMoE
from hf_moe_mt.parallel import is_expert_parameter

VOCAB, HIDDEN, FFN, EXPERTS, SEQ, MICRO_BATCH = 32, 16, 24, 4, 6, 2
LR, WEIGHT_DECAY, MAX_GRAD_NORM, AUX_COEF = 1e-2, 0.1, 0.3, 0.1


class TinyMoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(
            SparseMoE(HIDDEN, FFN, EXPERTS, top_k=2, drop_tokens=False, use_rts=False, activation="gelu") for _ in range(2))
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


def build_model(seed: int = 0) -> TinyMoEModel:
    torch.manual_seed(seed)
    return TinyMoEModel()


def global_batches(world: int, steps: int, seed: int = 1):
    """[world·MICRO_BATCH, SEQ] ids and labels per step, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (world * MICRO_BATCH, SEQ), generator=generator),
             torch.randint(0, VOCAB, (world * MICRO_BATCH, SEQ), generator=generator)) for _ in range(steps)]


def shard(batch, rank: int):
    ids, labels = batch
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    return ids[rows], labels[rows]


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + step)  # changes every step: a resumed scheduler must be exact


def reference_training(batches, world: int, weight_decay_everywhere: bool = False,
                       with_scheduler: bool = False):
    """One process, every expert: AdamW with the Trainer's decay rule, torch clip_grad_norm_.
    Returns (losses, state_dict); loss = mean over the ranks' shards."""
    model = build_model()
    if weight_decay_everywhere:
        param_groups = [{"params": list(model.parameters()), "weight_decay": WEIGHT_DECAY}]
    else:
        decay = [p for n, p in model.named_parameters() if is_decayed(n)]
        no_decay = [p for n, p in model.named_parameters() if not is_decayed(n)]
        param_groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(param_groups, lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if with_scheduler else None
    losses = []
    for batch in batches:
        loss = torch.stack([model(*shard(batch, r)) for r in range(world)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def is_decayed(name: str) -> bool:
    """The HF Trainer's rule for this model: no decay for biases and LayerNorm."""
    return not (name.endswith("bias") or name.startswith("layer_norm"))


def deepspeed_config(world: int, stage: int, offload: bool = False, optimizer_section: bool = False) -> dict:
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
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW: DeepSpeedCPUAdam needs a C++ JIT build
    if optimizer_section:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}}
    return config


def train_engine(engine, batches, rank: int, world: int) -> list[float]:
    """DeepSpeed steps on this rank's shards; returns the global (all-rank mean) losses."""
    losses = []
    for batch in batches:
        loss = engine(*shard(batch, rank))
        engine.backward(loss)
        engine.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    return losses


def max_abs_diff(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys(), sorted(set(state) ^ set(reference))
    return max((state[name] - reference[name]).abs().max().item() for name in reference)


def assert_expert_replicas_identical(model, groups) -> None:
    """Expert-DP replicas (same experts, different data) must stay bitwise equal under ZeRO sharding."""
    for name, param in model.named_parameters():
        if is_expert_parameter(param):
            replicas = [torch.empty_like(param) for _ in range(groups.edp_size)]
            dist.all_gather(replicas, param.detach().contiguous(), group=groups.edp_group)
            assert all(torch.equal(r, replicas[0]) for r in replicas), name
