"""scripts/bench_moe_layer.py runs end to end at tiny sizes and writes every number to --json."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    bench.main(TINY + ["--rows", "ours_cf1.25,ours_cf1.0,ours_dropless", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| k | E | implementation |" in table and "THP_MEM_ALLOC_ENABLE=" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 4  # (k) × (E) × (dense + three capacity settings)
    for r in rows:
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["peak_mib"] > 0
    dense = [r for r in rows if r["implementation"].startswith("dense")]
    assert all(r["ratio_to_dense"] == 1.0 for r in dense)
    assert {r["capacity_factor"] for r in rows if r["implementation"].startswith("hf_moe_mt")} == {"1.25", "1.0", "dropless"}
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_script_rejects_unknown_rows():
    bench = _load_script()
    with pytest.raises(SystemExit, match="unknown --rows"):
        bench.parse_args(["--rows", "ours_cf1.25,megablocks"])


@pytest.mark.slow
def test_bench_script_all_rows_subprocess_no_thp(tmp_path):
    """Every anchor row (DeepSpeed, transformers grouped_mm/eager, Switch, NLLB) at tiny sizes, THP off."""
    out = tmp_path / "bench.json"
    rows = "dense,ours_cf1.25,ours_cf1.0,ours_dropless,deepspeed,hf_grouped_mm,hf_eager,switch,nllb"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--rows", rows, "--no-thp", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "THP_MEM_ALLOC_ENABLE=0" in result.stdout
    names = {r["implementation"] for r in json.loads(out.read_text())["rows"]}
    for expected in ("DeepSpeed", "grouped_mm", "eager", "SwitchTransformersSparseMLP", "NllbMoeSparseMLP"):
        assert any(expected in n for n in names), (expected, names)
