"""Worker: DeepSpeed ZeRO-1/2 (+ CPU optimizer offload) over our expert-parallel model ≡ one process.

`python -m torch.distributed.run --nproc_per_node=N deepspeed_ep_train.py EP STAGE OPTIMIZER MODEL [offload]`
OPTIMIZER: `client` (torch AdamW over moe_optimizer_param_groups: what the HF Trainer builds when the
DeepSpeed config has no "optimizer" section), `config` (an "optimizer" section: DeepSpeed builds torch
AdamW and splits the groups itself) or `cpu_adam` (the same with DeepSpeedCPUAdam, for offload).
MODEL: `tiny` or `moe_mt` (see moe_training_common). Every rank trains the single-process reference on
the global batch, then the engine on its shard; after 3 steps losses, gradient norms and every
(gathered) parameter must match, and expert-DP replicas must hold identical experts.
"""

import os
import sys

from moe_training_common import (ADAM, assert_expert_replicas_identical, assert_runs_match, build_model,
                                 deepspeed_config, global_batches, max_abs_diff, reference_training,
                                 skip_deepspeed_shm_build, train_engine)

skip_deepspeed_shm_build()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hf_moe_mt.parallel import gather_full_state_dict  # noqa: E402
from hf_moe_mt.training.deepspeed_ep import moe_optimizer_param_groups, prepare_model_for_deepspeed  # noqa: E402

STEPS = 3


def main(ep_size: int, stage: int, optimizer: str, kind: str, offload: bool) -> None:
    world = int(os.environ["WORLD_SIZE"])
    config = deepspeed_config(world, stage, offload=offload, optimizer_section=optimizer != "client",
                              torch_adam=optimizer != "cpu_adam")
    model = build_model(kind=kind).train()
    groups = prepare_model_for_deepspeed(model, ep_size, config)
    batches = global_batches(world, STEPS)
    reference = reference_training(batches, world, weight_decay_everywhere=optimizer != "client", kind=kind)

    if optimizer == "client":
        param_groups = moe_optimizer_param_groups(model, weight_decay=0.1)
        assert any(group.get("moe") for group in param_groups), param_groups
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(param_groups, **ADAM),
                                          config=config)
    else:
        params = [p for p in model.parameters() if p.requires_grad]  # what the HF Trainer passes
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    assert engine.has_moe_layers
    run = train_engine(engine, batches, dist.get_rank(), world)
    run.state = gather_full_state_dict(engine.module, groups)
    diffs = assert_runs_match(run, reference)
    moved = max_abs_diff(build_model(kind=kind).state_dict(), reference.state)
    assert moved > 100 * 1e-5, moved  # the comparison is not between two (nearly) untouched models
    assert_expert_replicas_identical(engine.module, groups)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"OK ep={ep_size} world={world} stage={stage} optimizer={optimizer} model={kind} offload={offload} "
              + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()) + f" moved={moved:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], "offload" in sys.argv[5:])
