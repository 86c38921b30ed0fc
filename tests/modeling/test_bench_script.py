"""scripts/bench_model.py runs end to end at tiny sizes and writes its JSON report."""

import importlib.util
import json
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_model.py"


def test_bench_model_quick_runs_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    # dynamo tracing without code generation: checks the fullgraph compile in seconds (inductor: ~1 min here)
    report = bench.main(["--quick", "--rounds", "1", "--json", str(out), "--compile-backend", "eager"])
    assert json.loads(out.read_text())["median"] == report["median"]
    for metric in bench.TARGETS:
        assert report["ratio_ours_over_nllb"][metric] > 0
        assert len(report["per_round"]["ours"][metric]) == 1
    assert report["parameters"]["ours"] == report["parameters"]["nllb_moe"]  # same sizes on both sides
    assert report["expert_rows_per_token"]["ours"] == 2.0  # top-2, nothing dropped at eval capacity
    variants = report["gemm_variants"]  # ours on MKL, NLLB-MoE on oneDNN: both metrics measured every round
    assert set(variants) == {row for row, _, _ in bench.GEMM_VARIANTS}
    for variant in variants.values():
        assert set(variant["median"]) == set(bench.TARGETS) and min(variant["median"].values()) > 0
        assert all(len(values) == 1 for values in variant["per_round"].values())
    static_cache = report["static_cache"]  # beam translation with a static cache, eager and compiled (fullgraph)
    assert list(static_cache) == list(bench.COMPILE_ROWS)
    for row in static_cache.values():
        assert row["same_tokens_as_dynamic_cache"] and row["median"] > 0 and len(row["per_round"]) == 1
    bf16 = report["bf16"]  # both models train under bf16 autocast and translate with bf16 weights, every round
    assert list(bf16) == ["ours", "nllb_moe"]
    for row in bf16.values():
        assert set(row["median"]) == set(bench.TARGETS) and min(row["median"].values()) > 0
        assert all(len(values) == 1 for values in row["per_round"].values())
    assert re.match(r"(sdpa|eager) attention under bf16 autocast", report["bf16_attention"])  # ours', measured
