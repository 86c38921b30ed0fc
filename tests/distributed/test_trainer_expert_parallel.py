"""`hf-moe-mt train` with expert_parallel_size=2 on 2 real processes (the shipped accelerate configs, gloo, CPU)
≡ one process holding every expert on the same global batch: the accelerate/DDP path and DeepSpeed ZeRO-2,
both with the Trainer-built optimizer. Losses, gradient norms and router metrics of every step, and every
parameter of the saved full model, within 1e-5; the DDP path resumes exactly from its EP checkpoint.

Routing is dropless top-1 without RTS and dropout is off (each rank routes its own micro-batch, as gradient
accumulation does in the reference: `gradient_accumulation_steps=2` over the same two micro-batches). Adam
uses lr 1e-3 and eps 1e-6 (eps 1e-8 turns rounding noise on zero-gradient params into visible updates);
clipping at 0.3 is active, so the global norm must be right.
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import (REPO, check_ok, fixture_data, log_history, run_cli, train_argv,  # noqa: F401
                                    training_logs)

pytestmark = pytest.mark.distributed

STEPS = 4
EQUIVALENT = [f"training.max_steps={STEPS}", "training.save_steps=2", "training.logging_steps=1",
              "training.eval_strategy=no", "evaluation.bleu_steps=0", "evaluation.plots=false",
              "training.report_to=none",
              "model.config.router_drop_tokens=false", "model.config.router_use_rts=false", "model.config.dropout=0.0",
              "training.learning_rate=1e-3", "training.adam_epsilon=1e-6", "training.max_grad_norm=0.3"]
EP2 = ["model.config.expert_parallel_size=2"]
# BLEU during training under EP: every rank generates (synced) or the all-to-alls would deadlock
BLEU = ["evaluation.bleu_steps=2", "evaluation.bleu_examples=4"]
TOLERANCE = 1e-5


def _accelerate(config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO, "scripts", "accelerate", config)]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def reference(fixture_data, tmp_path_factory):  # noqa: F811
    """One process, every expert, the two ranks' micro-batches accumulated into one step."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    check_ok(run_cli(train_argv(fixture_data, output_dir, *EQUIVALENT, "training.gradient_accumulation_steps=2")))
    return output_dir


def _final_model(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_matches_reference(run_dir, reference_dir) -> None:
    run, ref = training_logs(run_dir / f"checkpoint-{STEPS}"), training_logs(reference_dir / f"checkpoint-{STEPS}")
    assert sorted(run) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        router_keys = [key for key in ref[step] if key.startswith("router/")]
        assert len(router_keys) == 10 and set(router_keys) <= set(run[step])
        for key in ["loss", *router_keys]:
            assert abs(run[step][key] - ref[step][key]) < TOLERANCE, (step, key, run[step][key], ref[step][key])
        assert abs(run[step]["grad_norm"] / ref[step]["grad_norm"] - 1) < TOLERANCE, (step, run[step], ref[step])
        assert ref[step]["grad_norm"] > 0.3  # clipping was active
    model, expected = _final_model(run_dir), _final_model(reference_dir)
    assert model.keys() == expected.keys()
    worst = max((model[name] - expected[name]).abs().max().item() for name in expected)
    assert worst < TOLERANCE, worst
    first = load_file(str(reference_dir / "checkpoint-2" / "model.safetensors"))
    # steps 3-4 moved the weights far beyond the tolerance (lr decays to 0.25e-3 at step 4)
    assert max((first[name] - expected[name]).abs().max().item() for name in expected) > 50 * TOLERANCE


def test_accelerate_ddp_ep2_matches_one_process_and_resumes_exactly(fixture_data, reference, tmp_path):  # noqa: F811
    run_a = tmp_path / "a"
    # predict_with_generate: the final dev evaluation also generates under EP (synced decoding steps)
    check_ok(run_cli(train_argv(fixture_data, run_a, *EQUIVALENT, *EP2, *BLEU, "training.predict_with_generate=true"),
                     launcher=_accelerate("cpu_ddp_ep2.yaml")))
    assert_matches_reference(run_a, reference)
    assert [e["step"] for e in log_history(run_a / "checkpoint-4") if "eval_bleu" in e] == [2, 4]
    checkpoint = run_a / "checkpoint-2"
    assert {"optimizer_ep_02_rank_00.safetensors", "optimizer_ep_02_rank_01.safetensors"} <= set(os.listdir(checkpoint))
    # A fresh launch resumes from A's step-2 checkpoint (torchrun this time): steps 3-4 and the weights equal A's.
    # It also evaluates at step 4 and reloads the best checkpoint at the end (checkpoint-4: the same weights).
    run_b = tmp_path / "b"
    best_model = ["training.eval_strategy=steps", "training.eval_steps=2", "training.load_best_model_at_end=true"]
    check_ok(run_cli(train_argv(fixture_data, run_b, *EQUIVALENT, *EP2, *best_model, resume=str(checkpoint)),
                     launcher=TORCHRUN))
    assert log_history(run_b / "checkpoint-4")[-1]["eval_loss"] > 0
    logs_a, logs_b = training_logs(run_a / "checkpoint-4"), training_logs(run_b / "checkpoint-4")
    assert [logs_b[s]["loss"] for s in (3, 4)] == [logs_a[s]["loss"] for s in (3, 4)]
    assert [logs_b[s]["grad_norm"] for s in (3, 4)] == [logs_a[s]["grad_norm"] for s in (3, 4)]
    model_a, model_b = _final_model(run_a), _final_model(run_b)
    assert all(torch.equal(model_a[name], model_b[name]) for name in model_a)


def test_accelerate_deepspeed_zero2_ep2_matches_one_process(fixture_data, reference, tmp_path):  # noqa: F811
    pytest.importorskip("deepspeed")
    run = tmp_path / "zero2"
    check_ok(run_cli(train_argv(fixture_data, run, *EQUIVALENT, *EP2, *BLEU), launcher=_accelerate("ds_zero2_ep.yaml")))
    assert_matches_reference(run, reference)
    assert [e["step"] for e in log_history(run / "checkpoint-4") if "eval_bleu" in e] == [2, 4]
    tag = (run / "checkpoint-2" / "latest").read_text().strip()
    files = set(os.listdir(run / "checkpoint-2" / tag))
    assert {"experts_ep_02_rank_00.safetensors", "experts_ep_02_rank_01.safetensors"} <= files


def test_torchrun_ddp_ep2_by_edp2_on_four_processes_matches_one_process(fixture_data, tmp_path):  # noqa: F811
    """world 4 = ep 2 × expert-data-parallel 2: expert grads are also reduced over the expert-DP group, and only
    expert-DP rank 0 of each EP rank writes its optimizer file."""
    micro_batch = ["training.per_device_train_batch_size=2"]
    reference_dir = tmp_path / "reference"
    check_ok(run_cli(train_argv(fixture_data, reference_dir, *EQUIVALENT, *micro_batch,
                                "training.gradient_accumulation_steps=4")))
    run = tmp_path / "ep2_edp2"
    launcher = [*TORCHRUN[:-1], "--nproc_per_node=4"]
    check_ok(run_cli(train_argv(fixture_data, run, *EQUIVALENT, *EP2, *micro_batch), launcher=launcher, timeout=240))
    assert_matches_reference(run, reference_dir)
    assert sorted(n for n in os.listdir(run / "checkpoint-2") if n.startswith("optimizer")) == [
        "optimizer_ep_02_rank_00.safetensors", "optimizer_ep_02_rank_01.safetensors"]
