"""Worker: torch DDP (what accelerate wraps) over our expert-parallel model ≡ one process.

`python -m torch.distributed.run --nproc_per_node=N ddp_ep_train.py EP`. Experts are kept out of DDP
(`exclude_experts_from_ddp`), their grads reduced over expert-DP (`reduce_expert_gradients`), and all
grads clipped by the global norm (`clip_grad_norm_`); 3 AdamW steps must equal the single-process
reference (torch AdamW + torch clip_grad_norm_ on the full model and global batch).
"""

import sys

from moe_training_common import (LR, MAX_GRAD_NORM, WEIGHT_DECAY, build_model, global_batches, is_decayed,
                                 max_abs_diff, reference_training, shard)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from hf_moe_mt.parallel import (clip_grad_norm_, create_expert_parallel_groups, exclude_experts_from_ddp,  # noqa: E402
                                gather_full_state_dict, parallelize_experts, reduce_expert_gradients)

STEPS, TOLERANCE = 3, 1e-5


def main(ep_size: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(world, STEPS)
    ref_losses, ref_state = reference_training(batches, world)

    model = build_model()
    groups = create_expert_parallel_groups(ep_size)
    parallelize_experts(model, groups)
    exclude_experts_from_ddp(model)
    ddp = DistributedDataParallel(model)
    decay = [p for n, p in model.named_parameters() if is_decayed(n)]
    no_decay = [p for n, p in model.named_parameters() if not is_decayed(n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    losses = []
    for batch in batches:
        loss = ddp(*shard(batch, rank))
        loss.backward()
        reduce_expert_gradients(model, groups)
        clip_grad_norm_(model, MAX_GRAD_NORM, groups)
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
    param_diff = max_abs_diff(gather_full_state_dict(model, groups), ref_state)
    assert loss_diff < TOLERANCE and param_diff < TOLERANCE, (loss_diff, param_diff, losses, ref_losses)
    dist.barrier()
    if rank == 0:
        print(f"OK ddp ep={ep_size} world={world} loss_diff={loss_diff:.2e} param_diff={param_diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
