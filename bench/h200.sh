#!/usr/bin/env bash
# The H200 throughput run (issue: throughput vs mlx_lm.lora), in one command on the device machine:
#   source .whl/b/install.sh && bash bench/h200.sh "$OUT"
# Builds the Llama-3.2-1B-shaped model and the datasets there, then runs bench/throughput.py on
# variable-length and fixed 512-token data, both trainers, batch 8, memory capped at 100 GB.
set -uo pipefail
out=${1:-/tmp/h200-out}
mkdir -p "$out"
export TUNETOP_CACHE=/tmp/tunetop-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())' | tee -a "$out/gpu.txt"
python3 bench/make_bench_model.py /tmp/bench1b --shape llama-1b --rows 3000 2>&1 | tail -2
common=(--model /tmp/bench1b/model --batch-size 8 --num-layers 16 --rank 8 --memory-limit-gb 100 --scratch /tmp/tt-scratch)
python3 bench/throughput.py "${common[@]}" --data /tmp/bench1b/variable --iters 300 --report 20 2>&1 | tee "$out/variable.txt" | tail -6
python3 bench/throughput.py "${common[@]}" --data /tmp/bench1b/fixed512 --iters 150 --report 15 2>&1 | tee "$out/fixed512.txt" | tail -6
echo "== summary"; tail -n 5 "$out/variable.txt" "$out/fixed512.txt"
