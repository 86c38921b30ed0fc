"""Training for a wall-clock budget: stop after N minutes of training, or at `max_steps`, whichever comes first.

Why: a run that must fit a time (the quickstart's minutes on a CPU, a job slot on a cluster) cannot know how
many steps the machine at hand will do; a fixed step count is too many on a slow machine and too few on a fast
one. The learning-rate schedules this package ships for it (warmup + inverse square root; warmup + a constant
rate with the cooldown below) do not depend on `max_steps` alone, so stopping early leaves a correctly trained
model, just a less trained one.

The time counts from the start of training (corpus, tokenizer and model building excluded; dev evaluations
and checkpoint saves during training included) and carries over a resume: the callback's elapsed time is saved
in every checkpoint's `trainer_state.json` (transformers' `ExportableState`) and read back from there. Under
several processes the slowest rank's clock decides, for all of them at the same step (one all-reduce of a
float per step): ranks that stopped at different steps would hang in the next collective.

`cooldown` > 0 ends the run with the learning rate decayed linearly to zero over that last fraction of the budget
(or of `max_steps`, whichever ends first; without a budget, of `max_steps`): the warmup-stable-decay idea for a
run whose step count is unknown in advance. The schedule's own lambda is multiplied by the cooldown factor, so a
resumed run continues the same decay (the factor depends only on the time spent and the step).

Both come from the config's `budget` section (`budget_callback`), which `--time-budget` and `--cooldown` set.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import BudgetConfig
from .metrics import collective_device


def budget_callback(budget) -> "TimeBudgetCallback | None":
    """The callback a config's `budget` section (BudgetConfig) asks for, or None when it asks for nothing."""
    if budget.minutes is None and not budget.cooldown:
        return None
    return TimeBudgetCallback(budget.minutes, budget.cooldown)


class TimeBudgetCallback(TrainerCallback, ExportableState):
    """Stops training once `minutes` of training time are spent (None: no limit); the step that crosses the
    budget is saved. With `cooldown`, the last fraction of the run decays the learning rate linearly to zero."""

    def __init__(self, minutes: float | None, cooldown: float = 0.0):
        BudgetConfig(minutes, cooldown)  # the config section's checks and one-line errors
        self.minutes = float(minutes) if minutes is not None else None
        self.cooldown = float(cooldown)
        self.elapsed_before = 0.0  # seconds spent by earlier runs of a resumed training
        self.lr_factor = 1.0  # the cooldown's multiplier on the schedule, read when the scheduler steps
        self._started: float | None = None

    @property
    def elapsed_seconds(self) -> float:
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self.elapsed_before + running

    def state(self) -> dict:
        return {"args": {"minutes": self.minutes, "cooldown": self.cooldown},
                "attributes": {"elapsed_before": self.elapsed_seconds}}

    def progress(self, elapsed_seconds: float, step: int, max_steps: int) -> float:
        """Fraction of the run done: of the time budget or of max_steps, whichever is further along."""
        by_steps = step / max_steps if max_steps and max_steps > 0 else 0.0
        by_time = elapsed_seconds / (60 * self.minutes) if self.minutes is not None else 0.0
        return max(by_time, by_steps)

    def cooldown_factor(self, progress: float) -> float:
        if self.cooldown == 0.0:
            return 1.0
        return min(1.0, max(0.0, (1.0 - progress) / self.cooldown))

    def _cooldown_factor_at(self, elapsed_seconds: float, state) -> float:
        return self.cooldown_factor(self.progress(elapsed_seconds, state.global_step, state.max_steps))

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, dict):  # a resumed run: the checkpoint's trainer_state.json holds the time spent
            self.elapsed_before = float(saved.get("attributes", {}).get("elapsed_before", 0.0))
        self._started = time.monotonic()
        if self.cooldown:
            self._scale_schedule(kwargs.get("lr_scheduler"))
            self.lr_factor = self._cooldown_factor_at(self.elapsed_before, state)

    def _scale_schedule(self, scheduler) -> None:
        """Multiply every lambda of the run's LambdaLR by `lr_factor` (closures, so the scheduler's state_dict
        stays as transformers saves it)."""
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(f"budget.cooldown (--cooldown) needs a LambdaLR schedule (training.lr_scheduler_type "
                             f"constant_with_warmup, inverse_sqrt, linear, cosine, ...), got "
                             f"{type(scheduler).__name__}; drop the cooldown, or change "
                             f"training.lr_scheduler_type (or remove the scheduler section of the DeepSpeed config)")
        if any(getattr(fn, "cooled_by", None) is self for fn in scheduler.lr_lambdas):
            return  # a second train() call on the same trainer
        scheduler.lr_lambdas = [self._cooled(inner) for inner in scheduler.lr_lambdas]

    def _cooled(self, inner):
        def cooled(step):
            return inner(step) * self.lr_factor

        cooled.cooled_by = self
        return cooled

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = self._agreed_elapsed_seconds()
        self.lr_factor = self._cooldown_factor_at(elapsed, state)
        if self.minutes is not None and elapsed >= 60 * self.minutes and not control.should_training_stop:
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
