"""Training for a wall-clock budget: stop after N minutes of training, or at `max_steps`, whichever comes first.

Why: a run that must fit a time (the quickstart's minutes on a CPU, a job slot on a cluster) cannot know how
many steps the machine at hand will do; a fixed step count is too many on a slow machine and too few on a fast
one. The learning-rate schedules this package ships for it (warmup + inverse square root) do not depend on
`max_steps`, so stopping early leaves a correctly trained model, just a less trained one.

The time counts from the start of training (corpus, tokenizer and model building excluded; dev evaluations
and checkpoint saves during training included) and carries over a resume: the callback's elapsed time is saved
in every checkpoint's `trainer_state.json` (transformers' `ExportableState`) and read back from there. Under
several processes the slowest rank's clock decides, for all of them at the same step (one all-reduce of a
float per step): ranks that stopped at different steps would hang in the next collective.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .metrics import collective_device


class TimeBudgetCallback(TrainerCallback, ExportableState):
    """Stops training once `minutes` of training time are spent; the step that crosses the budget is saved."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ValueError(f"time budget must be a positive number of minutes, got {minutes!r}")
        self.minutes = float(minutes)
        self.elapsed_before = 0.0  # seconds spent by earlier runs of a resumed training
        self._started: float | None = None

    @property
    def elapsed_seconds(self) -> float:
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self.elapsed_before + running

    def state(self) -> dict:
        return {"args": {"minutes": self.minutes}, "attributes": {"elapsed_before": self.elapsed_seconds}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, dict):  # a resumed run: the checkpoint's trainer_state.json holds the time spent
            self.elapsed_before = float(saved.get("attributes", {}).get("elapsed_before", 0.0))
        self._started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_elapsed_seconds() >= 60 * self.minutes and not control.should_training_stop:
            control.should_training_stop = True
            control.should_save = True
        return control

    def _agreed_elapsed_seconds(self) -> float:
        elapsed = self.elapsed_seconds
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return elapsed
        value = torch.tensor([elapsed], dtype=torch.float64, device=collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item())
