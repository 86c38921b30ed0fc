"""Run a worker script under torch.distributed.run on CPU (gloo) and fail with its output."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun(worker: str, *args: str, nproc: int = 2, timeout: int = 180, env: dict | None = None) -> str:
    """Launch `workers/<worker>` on `nproc` local processes; return stdout, raise with both streams."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKERS / worker), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"{worker} {' '.join(args)} failed (exit {result.returncode}):\n"
                             f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}")
    return result.stdout
