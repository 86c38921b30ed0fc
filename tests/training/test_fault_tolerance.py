"""`kill -9` during training (in the middle of writing a checkpoint), then `hf-moe-mt train --resume`: the run
continues from the last complete checkpoint and reproduces the uninterrupted run's loss curve and weights
bit for bit (same seed, same data order, RNG restored; dropout, RTS and capacity on), with sentence batches
and with token batches (the resumed run skips the same batches of the same epoch)."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from .conftest import check_ok, run_cli, train_argv, training_logs

KILL_WORKER = os.path.join(os.path.dirname(__file__), "workers", "kill_during_save.py")
RUN = ["training.max_steps=12", "training.save_steps=4", "training.logging_steps=1", "training.eval_strategy=no",
       "evaluation.bleu_steps=0", "evaluation.plots=false", "training.report_to=none"]


# max_tokens=1000: 6 batches per epoch of the fixture corpus, so checkpoints 4 and 8 fall inside epochs 0 and 1
@pytest.mark.parametrize("batching", [[], ["data.max_tokens=1000"]], ids=["sentences", "tokens"])
def test_sigkill_mid_checkpoint_then_resume_reproduces_the_uninterrupted_run(batching, fixture_data, tmp_path):
    run = [*RUN, *batching]
    # 1. the uninterrupted run
    check_ok(run_cli(train_argv(fixture_data, tmp_path / "a", *run)))
    # 2. the same run, killed while checkpoint-8 is being written
    killed = run_cli(train_argv(fixture_data, tmp_path / "b", *run), launcher=[KILL_WORKER],
                     env={"KILL_AT_CHECKPOINT": "8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "b"))
    assert "checkpoint-4" in names and "checkpoint-8" not in names and ".tmp-checkpoint-8" in names, names
    staged = os.listdir(tmp_path / "b" / ".tmp-checkpoint-8")
    assert "model.safetensors" in staged and "trainer_state.json" not in staged  # half written, never renamed
    # 3. --resume picks checkpoint-4 and finishes
    check_ok(run_cli(train_argv(fixture_data, tmp_path / "b", *run, resume="last")))
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith(".tmp-")]
    # 4. same loss curve, same weights
    uninterrupted = training_logs(tmp_path / "a" / "checkpoint-12")
    interrupted = training_logs(tmp_path / "b" / "checkpoint-12")
    assert sorted(uninterrupted) == list(range(1, 13))
    assert [interrupted[s]["loss"] for s in range(1, 13)] == [uninterrupted[s]["loss"] for s in range(1, 13)]
    assert [interrupted[s]["grad_norm"] for s in range(5, 13)] == [uninterrupted[s]["grad_norm"] for s in range(5, 13)]
    final_a, final_b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("a", "b"))
    assert all(torch.equal(final_a[name], final_b[name]) for name in final_a)
    assert uninterrupted[12]["loss"] != uninterrupted[5]["loss"]  # the steps after the resume did train
