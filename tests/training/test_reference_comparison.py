"""scripts/compare_reference_training.py on a tiny config: three models train on the same token batches, their
curves reach JSON and PNG, our dense model tracks transformers' M2M100, and a lag beyond the tolerance fails."""

import json
import os
import subprocess
import sys

from .conftest import FAST, REPO, TINY_CONFIG

SCRIPT = os.path.join(REPO, "scripts", "compare_reference_training.py")


def _compare(fixture_data, output, *extra):
    argv = [sys.executable, SCRIPT, "--config", TINY_CONFIG, "--steps", "8", "--eval-every", "4", "--output",
            str(output), *extra, f"data.corpus={fixture_data['corpus']}", f"data.tokenizer={fixture_data['tokenizer']}",
            *FAST, "data.max_tokens=256", "training.logging_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)


def test_three_models_train_on_the_same_batches_and_dense_tracks_m2m100(fixture_data, tmp_path):
    result = _compare(fixture_data, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "reference_curves.json").read_text())
    curves = report["curves"]
    assert set(curves) == {"m2m100", "ours_dense", "ours_moe"} and report["lagging"] == []
    for name, curve in curves.items():
        assert [point["step"] for point in curve["dev"]] == [0, 4, 8], name
        assert [point["step"] for point in curve["train"]] == [2, 4, 6, 8], name
        assert curve["dev"][-1]["loss"] < curve["dev"][0]["loss"], name  # every model learned something
    assert curves["ours_moe"]["parameters"] > curves["ours_dense"]["parameters"] == curves["m2m100"]["parameters"]
    first = {name: curve["dev"][0]["loss"] for name, curve in curves.items()}
    assert abs(first["ours_dense"] / first["m2m100"] - 1) < 0.02  # same shape, same init scheme
    assert (tmp_path / "reference_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_lag_beyond_the_tolerance_fails_loudly(fixture_data, tmp_path):
    result = _compare(fixture_data, tmp_path, "--tolerance", "-0.5")  # any dense loss is "50 % too high"
    assert result.returncode == 1
    assert "FAIL: step 0: ours_dense dev loss" in result.stderr
    assert len(json.loads((tmp_path / "reference_curves.json").read_text())["lagging"]) == 3


def test_with_maxi_batches_the_models_see_the_trainers_batches_in_order():
    import importlib.util
    from types import SimpleNamespace

    import torch
    from datasets import Dataset

    from hf_moe_mt.data.batching import MaxiBatchSampler

    spec = importlib.util.spec_from_file_location("compare_reference_training", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lengths = [3, 9, 1, 7, 5, 2, 8, 4, 6, 10, 12, 11]
    dataset = Dataset.from_dict({"input_ids": [[0] * n for n in lengths], "labels": [[0] * n for n in lengths]})
    data = SimpleNamespace(max_tokens=None, maxi_batch=2)
    batches = script.train_batches(dataset, lambda rows: torch.tensor([len(r["labels"]) for r in rows]), data,
                                   batch_size=3, seed=7)
    expected = [[lengths[i] for i in batch] for epoch in (0, 1) for batch in
                MaxiBatchSampler(lengths, 3, 2, seed=7).batches(epoch)]
    assert [next(batches).tolist() for _ in expected] == expected
    assert all(batch == sorted(batch) for batch in expected)  # sorted within each pool, not shuffled sentences
