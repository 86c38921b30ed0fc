"""Checkpoint averaging: the mean of the weights of a run's last N checkpoints, as fairseq's
`average_checkpoints.py --num-update-checkpoints N` makes it.

Why: late in training the weights wander around a minimum with the noise of the last batches and the learning
rate; their mean sits closer to it. In neural MT it is a standard free gain at export time (no training, one
pass over N files); `hf-moe-mt export --average-last N` uses it. Every floating-point tensor is averaged in fp32
(router rows and experts included: a run's checkpoints share their expert order, so expert i of one checkpoint
is expert i of the next); integer buffers are taken from the newest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..training.checkpoints import checkpoint_step, checkpoints_by_step
from .export import load_trained_model


def checkpoints_to_average(checkpoint: str | os.PathLike, last: int) -> list[Path]:
    """The `last` newest `checkpoint-N` folders up to and including `checkpoint` (a `checkpoint-K` folder, or a run
    directory holding checkpoints: then its newest ones), oldest first."""
    if last < 1:
        raise ValueError(f"--average-last {last}: the number of checkpoints to average must be at least 1")
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint-N directory or a run directory")
    newest = checkpoint_step(path)
    run_dir = path.parent if newest is not None else path
    folders = [Path(folder) for step, folder in checkpoints_by_step(run_dir).items() if newest is None or step <= newest]
    if len(folders) < last:
        raise ValueError(f"--average-last {last} needs {last} checkpoints but {run_dir} has {len(folders)} "
                         f"{'up to ' + path.name if newest is not None else 'checkpoint-N folders'}; lower it, or "
                         "keep more checkpoints when training (training.save_total_limit)")
    return folders[-last:]


def average_checkpoints(paths: list[str | os.PathLike]):
    """The model of the newest (last) path, with every floating-point tensor replaced by the mean over `paths`.

    Checkpoints are read one at a time (memory: two models), and must have the same tensors and shapes."""
    if not paths:
        raise ValueError("no checkpoints to average")
    model = load_trained_model(paths[-1])
    state = model.state_dict()
    sums = {name: tensor.double() for name, tensor in state.items() if tensor.is_floating_point()}
    for path in paths[:-1]:
        other = load_trained_model(path).state_dict()
        for name, total in sums.items():
            if name not in other or other[name].shape != total.shape:
                found = "missing" if name not in other else f"of shape {tuple(other[name].shape)}"
                raise ValueError(f"cannot average {path} with {paths[-1]}: {name} is {found} there, "
                                 f"{tuple(total.shape)} here; average checkpoints of one training run")
            total += other[name].double()
    with torch.no_grad():
        for name, total in sums.items():
            state[name].copy_((total / len(paths)).to(state[name].dtype))
    return model
