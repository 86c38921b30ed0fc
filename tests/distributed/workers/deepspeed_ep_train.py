"""Worker: DeepSpeed ZeRO-1/2 (+ CPU optimizer offload) over our expert-parallel model ≡ one process.

`python -m torch.distributed.run --nproc_per_node=N deepspeed_ep_train.py EP STAGE OPTIMIZER [offload]`
OPTIMIZER: `client` (torch AdamW over moe_optimizer_param_groups: what the HF Trainer builds when the
DeepSpeed config has no "optimizer" section) or `config` (an "optimizer" section: DeepSpeed splits the
groups itself). Every rank trains the single-process reference on the global batch, then the engine on
its shard, and compares losses and every (gathered) parameter after 3 steps.
"""

import os
import sys

from moe_training_common import (LR, assert_expert_replicas_identical, build_model, deepspeed_config,
                                 global_batches, max_abs_diff, reference_training, skip_deepspeed_shm_build,
                                 train_engine)

skip_deepspeed_shm_build()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hf_moe_mt.parallel import gather_full_state_dict  # noqa: E402
from hf_moe_mt.training.deepspeed_ep import moe_optimizer_param_groups, prepare_model_for_deepspeed  # noqa: E402

STEPS, TOLERANCE = 3, 1e-5


def main(ep_size: int, stage: int, optimizer: str, offload: bool) -> None:
    world = int(os.environ["WORLD_SIZE"])
    config = deepspeed_config(world, stage, offload=offload, optimizer_section=optimizer == "config")
    model = build_model()
    groups = prepare_model_for_deepspeed(model, ep_size, config)
    rank = dist.get_rank()
    batches = global_batches(world, STEPS)
    ref_losses, ref_state = reference_training(batches, world, weight_decay_everywhere=optimizer == "config")

    if optimizer == "client":
        groups_ = moe_optimizer_param_groups(model, weight_decay=0.1)
        assert any(g.get("moe") for g in groups_), groups_
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups_, lr=LR), config=config)
    else:
        params = [p for p in model.parameters() if p.requires_grad]  # what the HF Trainer passes
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    assert engine.has_moe_layers
    losses = train_engine(engine, batches, rank, world)
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
    param_diff = max_abs_diff(gather_full_state_dict(engine.module, groups), ref_state)
    moved = max_abs_diff(build_model().state_dict(), ref_state)
    assert loss_diff < TOLERANCE and param_diff < TOLERANCE, (loss_diff, param_diff, losses, ref_losses)
    assert moved > 100 * TOLERANCE, moved  # the comparison is not between two untouched models
    assert_expert_replicas_identical(engine.module, groups)
    dist.barrier()
    if rank == 0:
        print(f"OK ep={ep_size} world={world} stage={stage} optimizer={optimizer} offload={offload} "
              f"loss_diff={loss_diff:.2e} param_diff={param_diff:.2e} moved={moved:.2e}")
    dist.destroy_process_group()



if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], "offload" in sys.argv[4:])
