#!/usr/bin/env bash
# One GPU call for the engine: GPU tests, the decode profile, then the engine benchmark.
# Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_triton_ops.py \
  tests/gpu/test_triton_attention.py tests/gpu/test_engine_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
timeout 150 python -m loadtest.decode_profile --out-dir "$OUT" 2>&1 | grep -E "b1:|b64:|gemv|M=1" | cut -c1-400
timeout 330 python loadtest/engine_bench.py --out "$OUT/engine_bench.json" --log "$OUT/engine_bench.log" 2>&1 \
  | grep -v "^$" | tail -30
