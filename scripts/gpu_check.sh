#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the CUDA tests, then the MoE layer benchmark in bf16 at
# the shape (T=4096, d=512, ffn=2048) and at a GPU-sized shape (T=32768, d=1024, ffn=4096)
# with a kernel profile, then the whole model against NLLB-MoE (fp32). Results go to $1 (default
# runs/gpu_check): tests.log, bench_*.md/json/log.
#
#   bash scripts/gpu_check.sh runs/gpu_check
#
# Uses the python3 on PATH as it is (a GPU machine's own torch); set PYTHONPATH to extra packages.
set -uo pipefail
out="${1:-runs/gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

timeout 240 python3 -m pytest tests/moe/test_cuda.py tests/modeling/test_cuda.py -q -rfE -p no:cacheprovider \
  2>&1 | tee "$out/tests.log" | tail -25

timeout 240 python3 scripts/bench_moe_layer.py --device cuda --dtype bf16 --warmup 3 --repeats 10 \
  --json "$out/bench_t4096.json" 2>"$out/bench_t4096.log" | tee "$out/bench_t4096.md"
tail -3 "$out/bench_t4096.log"

timeout 300 python3 scripts/bench_moe_layer.py --device cuda --dtype bf16 --tokens 32768 --d-model 1024 \
  --ffn 4096 --rows dense,ours_cf1.25,ours_cf1.0,ours_dropless,deepspeed,hf_grouped_mm,switch --warmup 3 \
  --repeats 10 --profile --json "$out/bench_t32768.json" 2>"$out/bench_t32768.log" | tee "$out/bench_t32768.md"
tail -3 "$out/bench_t32768.log"

timeout 150 python3 scripts/bench_model.py --device cuda --rounds 3 --json "$out/bench_model.json" \
  2>"$out/bench_model.log" | tee "$out/bench_model.md"
tail -3 "$out/bench_model.log"
