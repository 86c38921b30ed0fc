"""`hf-moe-mt train --config CONFIG.yaml [--resume | --resume-from CHECKPOINT] [--time-budget MINUTES
[--cooldown FRACTION]] [section.key=value ...]`:
argparse over config.load_train_config and run.run_training. Errors are ValueError/FileNotFoundError, printed
as one line by cli.py (on every rank: each process checks the same things at startup)."""

from __future__ import annotations

import argparse
import json


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a MoE translation model (single process, accelerate launch, torchrun or deepspeed)",
        description="Train with MoESeq2SeqTrainer from a YAML config (sections data, model, training, evaluation, "
        "budget; see configs/). Multi-process: accelerate launch --config_file scripts/accelerate/<cfg>.yaml -m "
        "hf_moe_mt.cli train ...",
    )
    parser.add_argument("--config", required=True, help="YAML file (e.g. configs/tiny.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last complete checkpoint-N of training.output_dir")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint-N directory")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="stop after this many minutes of training (or at training.max_steps, whichever comes "
                        "first); a resumed run counts the time already spent. Sets budget.minutes")
    parser.add_argument("--cooldown", type=float, metavar="FRACTION",
                        help="decay the learning rate linearly to zero over this last fraction of the run (of the "
                        "time budget or of max_steps, whichever ends first), e.g. 0.2. Sets budget.cooldown")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config entries, e.g. training.max_steps=50 model.config.num_experts=8")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import load_train_config
    from .run import run_training

    flags = [f"budget.minutes={args.time_budget}"] if args.time_budget is not None else []
    flags += [f"budget.cooldown={args.cooldown}"] if args.cooldown is not None else []
    config = load_train_config(args.config, [*args.overrides, *flags])
    summary = run_training(config, resume=args.resume_from or args.resume or None)
    if _is_main_process():
        print(json.dumps(summary, default=str))
    leave_process_group()
    return 0


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def leave_process_group() -> None:
    """Leave together: a process that exits while its peers still hold the group can abort in gloo's threads.
    The trainer is kept alive by reference cycles (callbacks hold it); collecting them first frees the DDP
    reducer while its process group still exists, not during interpreter teardown."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def register(subparsers) -> None:
    """Called by hf_moe_mt/cli.py."""
    add_train_parser(subparsers)
