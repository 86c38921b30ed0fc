"""Training for a time budget: the callback stops at the step that crosses the budget and asks for a save; a
resumed run counts the time recorded in the checkpoint; `hf-moe-mt train --time-budget` stops a real run
before max_steps with a checkpoint whose trainer_state.json carries the time spent."""

import json

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_moe_mt.training import budget
from hf_moe_mt.training.budget import TimeBudgetCallback
from tests.training.conftest import check_ok, run_cli, train_argv


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(budget.time, "monotonic", fake)
    return fake


def _step(callback, state, control):
    callback.on_step_end(ARGS, state, control)
    return control.should_training_stop, control.should_save


ARGS = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])


def test_stops_at_the_step_that_crosses_the_budget_and_saves_it(clock):
    callback, state, control = TimeBudgetCallback(1.0), TrainerState(), TrainerControl()
    callback.on_train_begin(ARGS, state, control)
    clock.now += 59.0
    assert _step(callback, state, control) == (False, False)
    clock.now += 1.5
    assert _step(callback, state, control) == (True, True)
    assert callback.state() == {"args": {"minutes": 1.0}, "attributes": {"elapsed_before": 60.5}}


def test_a_resumed_run_counts_the_time_its_checkpoint_recorded(clock):
    saved = {"TimeBudgetCallback": {"args": {"minutes": 1.0}, "attributes": {"elapsed_before": 50.0}}}
    callback, control = TimeBudgetCallback(1.0), TrainerControl()
    callback.on_train_begin(ARGS, TrainerState(global_step=7, stateful_callbacks=saved), control)
    clock.now += 9.0
    assert _step(callback, TrainerState(), control) == (False, False)
    clock.now += 1.0
    assert _step(callback, TrainerState(), control) == (True, True)
    # a fresh run (step 0) starts from zero whatever the state holds
    fresh = TimeBudgetCallback(1.0)
    fresh.on_train_begin(ARGS, TrainerState(global_step=0, stateful_callbacks=saved), TrainerControl())
    assert fresh.elapsed_seconds == 0.0


@pytest.mark.parametrize("minutes", [0, -1, float("nan")])
def test_the_budget_must_be_positive(minutes):
    with pytest.raises(ValueError, match="positive number of minutes"):
        TimeBudgetCallback(minutes)


def test_train_command_stops_on_its_budget_with_the_time_in_the_checkpoint(fixture_data, tmp_path):
    output = tmp_path / "run"
    # a budget of 6 ms is spent by the first step: training stops there, far before max_steps
    check_ok(run_cli(train_argv(fixture_data, output, "training.max_steps=40", "training.save_steps=100",
                                "training.eval_strategy=no", "evaluation.bleu_steps=0") + ["--time-budget", "0.0001"]))
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 1
    trainer_state = json.loads((output / "checkpoint-1" / "trainer_state.json").read_text())
    elapsed = trainer_state["stateful_callbacks"]["TimeBudgetCallback"]["attributes"]["elapsed_before"]
    assert elapsed >= 0.006
