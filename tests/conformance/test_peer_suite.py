"""transformers' own common model tests (ModelTesterMixin, GenerationTesterMixin, ConfigTester, 5.24) pass on MoE-MT.

The tester `test_transformers_common.py` runs through `../shared/peer-tests/run-transformers-common.sh`, a copy of
transformers' test tree kept next to the repository (not in it; CI lays it there). Without that folder the test
skips. Every skip the suite reports must be one the tester lists, with its reason, in `EXPECTED_SKIPS`.
"""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEER_TESTS = ROOT.parent / "shared" / "peer-tests"
RUNNER = PEER_TESTS / "run-transformers-common.sh"
TESTER = Path(__file__).with_name("test_transformers_common.py")


def expected_skips() -> dict[str, str]:
    """The tester's EXPECTED_SKIPS ({test name pattern: reason}), read without importing the tester (its relative
    imports only resolve inside transformers' test tree)."""
    for node in ast.parse(TESTER.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXPECTED_SKIPS":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{TESTER.name} defines no EXPECTED_SKIPS")


def peer_suite_version() -> str:
    """The transformers release the peer suite comes from, read from its folder name (transformers-5.24)."""
    folders = sorted(PEER_TESTS.glob("transformers-*"))
    assert len(folders) == 1, f"expected one transformers-X.Y folder in {PEER_TESTS}, found {folders}"
    return folders[0].name.removeprefix("transformers-")


def run_suite(report: Path) -> tuple[subprocess.CompletedProcess, list[tuple[str, str, str]]]:
    """Runs the suite; returns the process and (test name, outcome, message) per test from pytest's JUnit report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(["bash", str(RUNNER), sys.executable, str(TESTER), f"--junitxml={report}"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=1800)
    results = []
    for case in ET.parse(report).iter("testcase") if report.exists() else ():
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome, message = kind, element.get("message", "")
                break
        results.append((case.get("name"), outcome, message))
    return process, results


def test_transformers_common_model_tests_pass(tmp_path):
    if not RUNNER.is_file():
        pytest.skip(f"transformers' common model tests not found at {PEER_TESTS}: they live next to the repository "
                    "(../shared/peer-tests), not in it")
    suite_version = peer_suite_version()
    installed = importlib.metadata.version("transformers")
    assert installed.startswith(suite_version + "."), (
        f"the peer suite is transformers {suite_version}'s own tests but transformers {installed} is installed: "
        f"bash scripts/setup.sh installs the matching release (or pip install 'transformers=={suite_version}.*')")
    for module in ("parameterized", "httpx"):
        assert importlib.util.find_spec(module), f"{module} is missing: pip install -e '.[dev]'"
    process, results = run_suite(tmp_path / "report.xml")
    summary = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else process.stderr[-2000:]
    failed = [(name, message) for name, outcome, message in results if outcome in ("failure", "error")]
    assert process.returncode == 0 and not failed, f"{summary}\n{failed}\n{process.stdout[-6000:]}"
    passed = [name for name, outcome, _ in results if outcome == "passed"]
    assert len(passed) > 100, summary  # the mixins really ran
    patterns = expected_skips()
    unexplained = [(name, message) for name, outcome, message in results
                   if outcome == "skipped" and not any(re.fullmatch(p, name) for p in patterns)]
    assert not unexplained, f"skips not listed in EXPECTED_SKIPS of {TESTER.name}: {unexplained}"
    print(summary)
