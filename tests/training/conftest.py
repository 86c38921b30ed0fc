"""Shared by tests/training: a corpus and tokenizer built once from the data package's small JSONL/TSV
fixtures (never the Bible), and `hf-moe-mt train` arguments for a tiny, fast run of configs/tiny.yaml."""

import json
import os
import subprocess
import sys

import pytest

from hf_moe_mt.data import build_corpus, save_tokenizer, train_tokenizer
from tests.data.conftest import TINY_VOCAB, fixture_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
# configs/tiny.yaml with smaller sizes and a fixture corpus: ~20 steps/s on one CPU thread.
FAST = ["model.config.d_model=32", "model.config.encoder_ffn_dim=64", "model.config.decoder_ffn_dim=64",
        "model.config.expert_ffn_dim=48", "model.config.num_experts=4", "training.per_device_train_batch_size=4",
        "training.per_device_eval_batch_size=8", "training.warmup_steps=0", "evaluation.max_new_tokens=8"]


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory) -> dict[str, str]:
    """{"corpus": dir, "tokenizer": dir} built from tests/data/fixtures (7 languages × 20 sentences)."""
    root = tmp_path_factory.mktemp("training_data")
    corpus = build_corpus(fixture_config(root / "corpus"))
    save_tokenizer(train_tokenizer(corpus, vocab_size=TINY_VOCAB, model_type="bpe"), str(root / "tokenizer"))
    return {"corpus": str(root / "corpus"), "tokenizer": str(root / "tokenizer")}


def train_argv(fixture_data: dict, output_dir, *overrides: str, resume: str | None = None) -> list[str]:
    """`hf-moe-mt train` arguments: configs/tiny.yaml on the fixture corpus, made fast, plus `overrides`."""
    argv = ["train", "--config", TINY_CONFIG, f"data.corpus={fixture_data['corpus']}",
            f"data.tokenizer={fixture_data['tokenizer']}", f"training.output_dir={output_dir}", *FAST, *overrides]
    if resume is not None:
        argv += ["--resume"] if resume == "last" else ["--resume-from", str(resume)]
    return argv


def run_cli(argv: list[str], launcher: list[str] | None = None, timeout: int = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`hf-moe-mt ARGV` in fresh process(es) with one thread each (bitwise-reproducible numbers across runs).
    `launcher`: what runs the module instead of `python -m`, e.g. [python, -m, torch.distributed.run, ...] or
    a script path (then run as `python SCRIPT ARGV`)."""
    if launcher is None:
        command = [sys.executable, "-m", "hf_moe_mt.cli"]
    elif launcher[-1].endswith(".py"):
        command = [sys.executable, *launcher]
    else:
        command = [*launcher, "-m", "hf_moe_mt.cli"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    return subprocess.run(command + argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def log_history(checkpoint_dir) -> list[dict]:
    with open(os.path.join(checkpoint_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)["log_history"]


def training_logs(checkpoint_dir) -> dict[int, dict]:
    """{step: the training log of that step} (entries with a training "loss")."""
    return {entry["step"]: entry for entry in log_history(checkpoint_dir) if "loss" in entry}
