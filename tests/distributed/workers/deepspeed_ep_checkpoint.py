"""Worker: engine.save_checkpoint → load_checkpoint under expert parallelism resumes exactly.

`python -m torch.distributed.run --nproc_per_node=N deepspeed_ep_checkpoint.py EP STAGE MODEL SAVE_DIR [offload]`
1. Run A: 2 steps, save (tag "step2"), 2 more steps: the uninterrupted run, also ≡ the single-process
   reference. 2. Run B: a model from another seed loads "step2" and takes 2 steps: every loss, gradient
   norm and parameter, the LR schedule and the step counter equal A's exactly. 3. The offline
   consolidation of the checkpoint equals the gathered model at save time. 4. Loading it at another
   ep_size raises a one-line error pointing to consolidation.
"""

import os
import sys

from moe_training_common import (ADAM, assert_expert_replicas_identical, assert_runs_match, build_model,
                                 deepspeed_config, global_batches, lr_lambda, max_abs_diff, reference_training,
                                 skip_deepspeed_shm_build, train_engine)

skip_deepspeed_shm_build()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hf_moe_mt.parallel import gather_full_state_dict  # noqa: E402
from hf_moe_mt.training.deepspeed_ep import (EXPERT_FILE, load_full_state_dict,  # noqa: E402
                                             moe_optimizer_param_groups, prepare_model_for_deepspeed)

TAG = "step2"


def make_engine(ep_size: int, config: dict, kind: str, seed: int):
    model = build_model(seed, kind).train()
    groups = prepare_model_for_deepspeed(model, ep_size, config)
    optimizer = torch.optim.AdamW(moe_optimizer_param_groups(model, weight_decay=0.1), **ADAM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine, groups


def main(ep_size: int, stage: int, kind: str, save_dir: str, offload: bool) -> None:
    world = int(os.environ["WORLD_SIZE"])
    config = deepspeed_config(world, stage, offload=offload)
    batches = global_batches(world, 4)
    # 1.
    engine, groups = make_engine(ep_size, config, kind, seed=0)
    rank = dist.get_rank()
    run_a = train_engine(engine, batches[:2], rank, world)
    engine.save_checkpoint(save_dir, tag=TAG)
    saved_state = gather_full_state_dict(engine.module, groups)
    after_save = train_engine(engine, batches[2:], rank, world)
    run_a.losses += after_save.losses
    run_a.grad_norms += after_save.grad_norms
    run_a.state = gather_full_state_dict(engine.module, groups)
    diffs = assert_runs_match(run_a, reference_training(batches, world, with_scheduler=True, kind=kind))
    assert_expert_replicas_identical(engine.module, groups)
    files = os.listdir(os.path.join(save_dir, TAG))
    assert {EXPERT_FILE.format(ep_size=ep_size, ep_rank=r) for r in range(ep_size)} <= set(files), files
    # 2.
    resumed, groups_b = make_engine(ep_size, config, kind, seed=123)
    assert max_abs_diff(gather_full_state_dict(resumed.module, groups_b), saved_state) > 0.01
    resumed.load_checkpoint(save_dir, tag=TAG)
    assert max_abs_diff(gather_full_state_dict(resumed.module, groups_b), saved_state) == 0.0
    assert resumed.global_steps == 2 and resumed.lr_scheduler.last_epoch == 2
    run_b = train_engine(resumed, batches[2:], rank, world)
    assert (run_b.losses, run_b.grad_norms) == (after_save.losses, after_save.grad_norms), (run_b, after_save)
    assert max_abs_diff(gather_full_state_dict(resumed.module, groups_b), run_a.state) == 0.0
    # 3.
    assert max_abs_diff(load_full_state_dict(save_dir), saved_state) == 0.0
    # 4.
    wrong, _ = make_engine(1 if ep_size > 1 else world, config, kind, seed=0)
    try:
        wrong.load_checkpoint(save_dir, tag=TAG)
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("loading at another ep_size did not raise")
    assert f"expert_parallel_size={ep_size}" in message and "consolidate" in message and "\n" not in message, message
    dist.barrier()
    if rank == 0:
        print(f"OK checkpoint ep={ep_size} world={world} stage={stage} model={kind} offload={offload} "
              + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()) + f" error={message!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], "offload" in sys.argv[5:])
