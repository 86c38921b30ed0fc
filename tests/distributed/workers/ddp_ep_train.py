"""Worker: torch DDP (what accelerate wraps) over our expert-parallel model ≡ one process.

`python -m torch.distributed.run --nproc_per_node=N ddp_ep_train.py EP MODEL` (MODEL: tiny | moe_mt).
Experts are kept out of DDP (`exclude_experts_from_ddp`), their grads reduced over expert-DP
(`reduce_expert_gradients`), all grads clipped by the global norm (`clip_grad_norm_`); after 3 AdamW
steps losses, gradient norms and every (gathered) parameter must equal the single-process reference
(torch AdamW + torch clip_grad_norm_ on the full model and the global batch).
"""

import sys

from moe_training_common import (ADAM, MAX_GRAD_NORM, WEIGHT_DECAY, Run, assert_runs_match, build_model,
                                 global_batches, global_mean, is_decayed, model_loss, reference_training, shard)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from hf_moe_mt.parallel import (clip_grad_norm_, create_expert_parallel_groups, exclude_experts_from_ddp,  # noqa: E402
                                gather_full_state_dict, parallelize_experts, reduce_expert_gradients)

STEPS = 3


def main(ep_size: int, kind: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(world, STEPS)
    reference = reference_training(batches, world, kind=kind)

    model = build_model(kind=kind).train()
    groups = create_expert_parallel_groups(ep_size)
    parallelize_experts(model, groups)
    exclude_experts_from_ddp(model)
    ddp = DistributedDataParallel(model)
    decay = [p for n, p in model.named_parameters() if is_decayed(n)]
    no_decay = [p for n, p in model.named_parameters() if not is_decayed(n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], **ADAM)
    run = Run([], [])
    for batch in batches:
        loss = model_loss(ddp, *shard(batch, rank))
        loss.backward()
        reduce_expert_gradients(model, groups)
        run.grad_norms.append(clip_grad_norm_(model, MAX_GRAD_NORM, groups).item())
        optimizer.step()
        optimizer.zero_grad()
        run.losses.append(global_mean(loss))
    run.state = gather_full_state_dict(model, groups)
    diffs = assert_runs_match(run, reference)
    dist.barrier()
    if rank == 0:
        print(f"OK ddp ep={ep_size} world={world} model={kind} " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
