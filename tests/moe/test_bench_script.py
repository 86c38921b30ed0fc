"""scripts/bench_moe_layer.py runs end to end at tiny sizes and writes every number to --json."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe_mt.backends import cpu_count, cpu_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe_layer.py"
TINY = ["--tokens", "64", "--d-model", "16", "--ffn", "32", "--experts", "4,8", "--repeats", "2", "--warmup", "1"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_bench_script_tiny_run_writes_table_and_json(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--rows", "ours_cf1.25,ours_cf1.0,ours_dropless", "--no-plain", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| k | E | implementation |" in table and "THP_MEM_ALLOC_ENABLE=" in table
    assert f"machine: {cpu_model()}, {cpu_count()} CPUs" in table and "CPU backend: Linear GEMMs: " in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 5  # (k) × (E) × (two dense FFNs + three capacity settings)
    for r in rows:
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["peak_mib"] > 0
    for point in {(r["top_k"], r["experts"]) for r in rows}:  # the ratio anchor: the faster dense FFN
        dense = [r["ratio_to_dense"] for r in rows if (r["top_k"], r["experts"]) == point and
                 r["implementation"].startswith("dense")]
        assert len(dense) == 2 and min(dense) == 1.0
    assert "fastest MoE row" in table
    assert {r["capacity_factor"] for r in rows if r["implementation"].startswith("hf_moe_mt")} == {"1.25", "1.0", "dropless"}
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_script_rejects_unknown_rows():
    bench = _load_script()
    with pytest.raises(SystemExit, match="unknown --rows"):
        bench.parse_args(["--rows", "ours_cf1.25,megablocks"])


@pytest.mark.slow
def test_bench_script_all_rows_subprocess_no_thp(tmp_path):
    """Every row (DeepSpeed, transformers grouped_mm/eager, Switch, NLLB, ours without backend) at tiny sizes,
    THP off, and the second table from the plain child process."""
    out = tmp_path / "bench.json"
    rows = "dense,floor,ours_cf1.25,ours_cf1.0,ours_dropless,ours_standard,deepspeed,hf_grouped_mm,hf_eager,switch,nllb"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--rows", rows, "--no-thp", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "THP_MEM_ALLOC_ENABLE=0" in result.stdout
    report = json.loads(out.read_text())
    names = {r["implementation"] for r in report["rows"]}
    for expected in ("DeepSpeed", "grouped_mm", "eager", "SwitchTransformersSparseMLP", "NllbMoeSparseMLP", "no backend"):
        assert any(expected in n for n in names), (expected, names)
    assert "plain process: no THP or glibc settings" in result.stdout
    assert {r["implementation"] for r in report["plain_process"]["rows"]} == names
