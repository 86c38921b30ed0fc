"""Training for a time budget: the callback stops at the step that crosses the budget and asks for a save; a
resumed run counts the time recorded in the checkpoint; `hf-moe-mt train --time-budget` stops a real run
before max_steps with a checkpoint whose trainer_state.json carries the time spent. The cooldown decays the
learning rate over the end of the budget or of max_steps, set by flags or by the config's `budget` section."""

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
    assert callback.state() == {"args": {"minutes": 1.0, "cooldown": 0.0}, "attributes": {"elapsed_before": 60.5}}


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


def test_cooldown_decays_the_schedule_linearly_to_zero_over_the_last_fraction_of_the_budget(clock):
    import torch

    from transformers.optimization import get_inverse_sqrt_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=1)
    callback, state, control = TimeBudgetCallback(1.0, cooldown=0.25), TrainerState(max_steps=10**6), TrainerControl()
    inverse_sqrt = scheduler.lr_lambdas[0]
    callback.on_train_begin(ARGS, state, control, lr_scheduler=scheduler)
    callback.on_train_begin(ARGS, state, control, lr_scheduler=scheduler)  # wraps once, not twice
    factors, rates = [], []
    for seconds in (30.0, 15.0, 7.5, 7.5):  # 30 s, 45 s (cooldown starts), 52.5 s, 60 s (budget spent)
        clock.now += seconds
        scheduler.step()  # the Trainer's order: optimizer and scheduler step, then the step counts and ends
        rates.append(scheduler.get_last_lr()[0] / inverse_sqrt(scheduler.last_epoch))
        state.global_step += 1
        callback.on_step_end(ARGS, state, control)
        factors.append(callback.lr_factor)
    assert factors == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert rates == pytest.approx([1.0, 1.0, 1.0, 0.5])  # each factor is read by the next scheduler step
    assert control.should_training_stop


def test_the_cooled_schedule_saves_as_plain_data_and_a_resumed_run_continues_the_decay(clock, tmp_path):
    import torch

    from transformers.optimization import get_inverse_sqrt_schedule

    def scheduler():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=1)

    first, callback = scheduler(), TimeBudgetCallback(1.0, cooldown=0.5)
    callback.on_train_begin(ARGS, TrainerState(max_steps=10**6), TrainerControl(), lr_scheduler=first)
    first.step()
    torch.save(first.state_dict(), tmp_path / "scheduler.pt")  # as the Trainer checkpoints it
    # a resumed run: 45 s of the 60 s budget spent, half-way through the 30 s cooldown
    saved = {"TimeBudgetCallback": {"args": {"minutes": 1.0, "cooldown": 0.5}, "attributes": {"elapsed_before": 45.0}}}
    resumed, callback = scheduler(), TimeBudgetCallback(1.0, cooldown=0.5)
    resumed.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    state = TrainerState(global_step=1, max_steps=10**6, stateful_callbacks=saved)
    callback.on_train_begin(ARGS, state, TrainerControl(), lr_scheduler=resumed)
    assert callback.lr_factor == pytest.approx(0.5)
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(0.5 * scheduler().lr_lambdas[0](resumed.last_epoch))


def test_cooldown_follows_max_steps_when_they_end_before_the_budget(clock):
    callback = TimeBudgetCallback(60.0, cooldown=0.5)
    assert callback.cooldown_factor(callback.progress(0.0, 50, 100)) == 1.0
    assert callback.cooldown_factor(callback.progress(0.0, 75, 100)) == pytest.approx(0.5)
    assert callback.cooldown_factor(callback.progress(30 * 60 * 1.5, 10, 100)) == pytest.approx(0.5)  # time leads


@pytest.mark.parametrize("cooldown", [-0.1, 1.0])
def test_the_cooldown_is_a_fraction_below_one(cooldown):
    with pytest.raises(ValueError, match=r"budget.cooldown \(--cooldown\) must be a fraction of the run in \[0, 1\)"):
        TimeBudgetCallback(1.0, cooldown)


@pytest.mark.parametrize("budget", [["--time-budget", "60", "--cooldown", "0.5"], ["budget.cooldown=0.5"]],
                         ids=["flags-with-a-long-budget", "config-section-without-a-budget"])
def test_train_command_cools_the_learning_rate_down_to_zero(fixture_data, tmp_path, budget):
    output = tmp_path / "run"
    # max_steps ends the run (a budget far longer than it, or none): the last half of the steps decays to zero
    check_ok(run_cli(train_argv(fixture_data, output, "training.max_steps=8", "training.save_steps=100",
                                "training.logging_steps=1", "training.warmup_steps=0",
                                "training.lr_scheduler_type=constant", "training.eval_strategy=no",
                                "evaluation.bleu_steps=0") + budget))
    history = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    rates = [row["learning_rate"] for row in history if "learning_rate" in row]
    peak = rates[0]
    # the factor agreed at the end of step s (progress s/8) is read by the scheduler in step s + 1, which sets
    # the rate step s + 2 uses (and logs): two steps of lag out of thousands in a real run
    assert rates == pytest.approx([peak] * 6 + [peak * 0.75, peak * 0.5])
    recorded = json.loads((output / "train_config.json").read_text())["budget"]
    assert recorded == {"minutes": 60.0 if "--time-budget" in budget else None, "cooldown": 0.5}


def test_without_a_budget_section_no_callback_is_added():
    from hf_moe_mt.training.config import BudgetConfig

    assert budget.budget_callback(BudgetConfig()) is None
    limited = budget.budget_callback(BudgetConfig(minutes=5))
    assert (limited.minutes, limited.cooldown) == (5.0, 0.0)
    cooled = budget.budget_callback(BudgetConfig(cooldown=0.2))
    assert cooled.minutes is None and cooled.progress(10**6, 50, 100) == 0.5  # no time limit: steps alone


@pytest.mark.parametrize("overrides, message", [
    (["budget.minutes=0"], r"budget.minutes \(--time-budget\) must be a positive number of minutes, got 0"),
    (["budget.cooldown=1.0"], r"budget.cooldown \(--cooldown\) must be a fraction of the run in \[0, 1\)"),
    (["budget.cooldown=0.2", "training.lr_scheduler_type=reduce_lr_on_plateau"],
     "reduce_lr_on_plateau has none"),
])
def test_bad_budget_settings_are_refused_in_one_line(fixture_data, tmp_path, overrides, message):
    import re

    result = run_cli(train_argv(fixture_data, tmp_path / "run", "training.max_steps=2", *overrides))
    assert result.returncode != 0
    assert re.search(message, result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
