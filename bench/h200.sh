#!/usr/bin/env bash
# The H200 throughput run (issue: throughput vs mlx_lm.lora), on the device machine:
#   source .whl/b/install.sh && bash bench/h200.sh "$OUT" [part]
# part "variable" (default "all"): the Llama-3.2-1B-shaped model on variable-length data, tunetop
# packed vs mlx_lm.lora; part "fixed": fixed 512-token rows, and tunetop packed at the token budget
# of mlx-lm's fixed-length batch (for the memory comparison), and tunetop at batch 16; part
# "ablation": tunetop on variable-length data with mlx-lm's float32 LoRA products; part "memory":
# the issue's memory condition and speed goal in one run (below); "memory-sweep": the settings
# that led there; part "engine": `tunetop train` and `tunetop test` end to end; part "attention":
# bench/attention_paths.py (fused vs unfused attention by length); part "budget": `tunetop train`
# with only training.memory_budget_gb set (the 1B shape at 20 GB, an 8B shape quantized to 4 bits by
# mlx_lm.convert at 16 and 24 GB) against mlx_lm.lora, printing each run's plan, tokens/s, peak
# and MFU; part "equal": equal work per step against mlx_lm.lora and PyTorch + PEFT, and the time
# to the first step on the 1B model. Memory capped at 100 GB. Every tunetop-only run prints a RESULT line (JSON); the summary lists them.
set -uo pipefail
out=${1:-/tmp/h200-out}
part=${2:-all}
mkdir -p "$out"
export TUNETOP_CACHE=/tmp/tunetop-cache PYTHONUNBUFFERED=1
# No pip registry there: tunetop runs from this checkout through a view of the installed package.
bash .ci/source-view /tmp/tunetop-src
export PYTHONPATH=/tmp/tunetop-src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())' | tee -a "$out/gpu.txt"
[ -d /tmp/bench1b/model ] || python3 bench/make_bench_model.py /tmp/bench1b --shape llama-1b --rows 3000 2>&1 | tail -2
peak=0
if [ "$part" != engine ] && [ "$part" != budget ] && [ "$part" != equal ]; then  # MFU's denominator, for the throughput parts
  peak=$(python3 bench/throughput.py --measure-peak | awk '/^PEAK/ {print $2}')
  echo "bf16 matmul peak: $peak TFLOP/s" | tee -a "$out/gpu.txt"
fi
common=(--model /tmp/bench1b/model --num-layers 16 --rank 8 --memory-limit-gb 100 --scratch /tmp/tt-scratch --peak-tflops "$peak")
if [ "$part" = all ] || [ "$part" = variable ]; then
  python3 bench/throughput.py "${common[@]}" --batch-size 8 --data /tmp/bench1b/variable --iters 200 --report 20 2>&1 | tee "$out/variable.txt" | tail -6
fi
if [ "$part" = all ] || [ "$part" = fixed ]; then
  python3 bench/throughput.py "${common[@]}" --batch-size 8 --data /tmp/bench1b/fixed512 --iters 150 --report 15 2>&1 | tee "$out/fixed512.txt" | tail -6
  # 2 packed rows of 2048 = 4,096 tokens a step, mlx-lm's fixed-length batch of 8 x 512: the memory goal.
  python3 bench/throughput.py "${common[@]}" --which ours --batch-size 2 --pack-length 2048 --data /tmp/bench1b/variable --iters 200 --report 20 2>&1 | tee "$out/variable-b2.txt" | grep RESULT
  python3 bench/throughput.py "${common[@]}" --which ours --batch-size 16 --data /tmp/bench1b/fixed512 --iters 100 --report 10 2>&1 | tee "$out/fixed512-b16.txt" | grep RESULT
fi
if [ "$part" = all ] || [ "$part" = ablation ]; then
  python3 bench/throughput.py "${common[@]}" --which ours --lora-precision float32 --batch-size 8 --data /tmp/bench1b/variable --iters 100 --report 20 2>&1 | tee "$out/variable-f32lora.txt" | grep RESULT
fi
# The memory goal, in one run: mlx-lm's fixed-length batch-8 peak is the bar, and its variable-length
# batch-8 speed the base; tunetop packs 4 rows of 2048 (about 9 examples a step; mlx-lm's batch
# holds 8) under a soft memory cap (training.memory_limit_gb), with chunked cross-entropy and the
# first 6 of 16 blocks recomputing (training.grad_checkpoint_blocks). "memory-sweep": the variants.
ours=(python3 bench/throughput.py "${common[@]}" --which ours --data /tmp/bench1b/variable --report 20)
best=(--batch-size 4 --memory-limit-gb 15 --ce-chunk-tokens 2048 --grad-checkpoint-blocks 6)
if [ "$part" = memory ]; then
  python3 bench/throughput.py "${common[@]}" --which mlx_lm --batch-size 8 --data /tmp/bench1b/fixed512 --iters 150 --report 15 2>&1 | tee "$out/memory-mlx-fixed.txt" | grep RESULT
  python3 bench/throughput.py "${common[@]}" --which mlx_lm --batch-size 8 --data /tmp/bench1b/variable --iters 200 --report 20 2>&1 | tee "$out/memory-mlx-variable.txt" | grep RESULT
  "${ours[@]}" --iters 200 "${best[@]}" 2>&1 | tee "$out/memory-ours.txt" | grep RESULT
  "${ours[@]}" --iters 200 --batch-size 4 2>&1 | tee "$out/memory-ours-uncapped.txt" | grep RESULT
  python3 bench/memory_table.py "$out"/memory-mlx-fixed.txt "$out"/memory-mlx-variable.txt "$out"/memory-ours.txt "$out"/memory-ours-uncapped.txt
fi
if [ "$part" = memory-sweep ]; then
  for flags in "" "--memory-limit-gb 15" "--memory-limit-gb 15 --ce-chunk-tokens 2048" \
      "--ce-chunk-tokens 2048 --grad-checkpoint-blocks 8" \
      "--memory-limit-gb 15 --ce-chunk-tokens 2048 --grad-checkpoint-blocks 8" \
      "--memory-limit-gb 15 --ce-chunk-tokens 2048 --grad-checkpoint-blocks 6" \
      "--ce-chunk-tokens 2048 --grad-checkpoint"; do
    # shellcheck disable=SC2086
    echo "4 rows $flags $("${ours[@]}" --iters 120 --batch-size 4 $flags 2>&1 | grep RESULT)" | tee -a "$out/memory-sweep.txt"
  done
  for flags in "--ce-chunk-tokens 2048 --grad-checkpoint" "--memory-limit-gb 15 --ce-chunk-tokens 2048 --grad-checkpoint"; do
    # shellcheck disable=SC2086
    echo "8 rows $flags $("${ours[@]}" --iters 90 --batch-size 8 $flags 2>&1 | grep RESULT)" | tee -a "$out/memory-sweep.txt"
  done
  for flags in "" "--memory-limit-gb 15" "--memory-limit-gb 13"; do
    # shellcheck disable=SC2086
    echo "fixed512 $flags $(python3 bench/throughput.py "${common[@]}" --which ours --batch-size 8 --data /tmp/bench1b/fixed512 --iters 150 --report 15 $flags 2>&1 | grep RESULT)" | tee -a "$out/memory-sweep.txt"
  done
fi
# The engine end to end on the GPU: `tunetop train` (its own process, journal, checkpoints) with the
# memory settings of the "memory" part, then `tunetop test` on the saved adapters and the base model.
if [ "$part" = engine ]; then
  export TUNETOP_HOME=/tmp/tt-home
  cat > /tmp/e2e.toml <<TOML
[model]
path = "/tmp/bench1b/model"
[data]
path = "/tmp/bench1b/variable"
[lora]
num_layers = 16
rank = 8
[training]
batch_size = 4
iterations = 30
steps_per_report = 10
steps_per_eval = 30
validation_batches = 4
memory_limit_gb = 15
ce_chunk_tokens = 2048
grad_checkpoint = true
grad_checkpoint_blocks = 6
[optimizer]
learning_rate = 5e-4
[checkpoints]
save_every = 15
TOML
  python3 -m tunetop.cli train /tmp/e2e.toml > "$out/engine-train.txt" 2>&1; echo "train exit $?"
  python3 -m tunetop.cli events | grep -E '"type":"(train|validation|save|finished)"' | cut -c1-240 | tee "$out/engine-events.txt"
  for flags in "" "--checkpoint 15" "--base"; do
    # shellcheck disable=SC2086
    echo "test --split valid $flags: $(python3 -m tunetop.cli test --split valid --batches 10 $flags 2>&1 | tail -1)" | tee -a "$out/engine-test.txt"
  done
fi
# Lean by default: `tunetop train` with training.memory_budget_gb and nothing else about memory; the
# engine picks memory_limit_gb, ce_chunk_tokens and the recomputing blocks from the model's shape and
# says so in its log ("memory budget ..."). 1B: 8 packed rows of 2048 (49.6 GB uncapped) in 20 GB;
# 8B, 4-bit: 2 rows of 2048 (the issue's QLoRA run, every block recomputing: 15.5 GB) in 16 and 24
# GB, against mlx_lm.lora with --grad-checkpoint at batch 4 under a 16 GB cap (the issue's anchor).
budget_run() {  # NAME MODEL ROWS BUDGET_GB ITERATIONS
  cat > "/tmp/$1.toml" <<TOML
name = "$1"
[model]
path = "$2"
[data]
path = "/tmp/bench1b/variable"
[lora]
num_layers = 16
rank = 8
[training]
batch_size = $3
iterations = $5
steps_per_report = 10
steps_per_eval = 100000
memory_budget_gb = $4
[optimizer]
learning_rate = 1e-4
[checkpoints]
save_every = 100000
TOML
  python3 -m tunetop.cli train "/tmp/$1.toml" > "$out/$1.txt" 2>&1; echo "$1: train exit $?"
  python3 -m tunetop.cli events "$1" | python3 bench/run_summary.py "$1" "$peak" | tee -a "$out/$1.txt" "$out/budget.txt"
}
if [ "$part" = budget ] || [ "$part" = equal ]; then
  export TUNETOP_HOME=/tmp/tt-home-$part
  rm -rf "$TUNETOP_HOME"
  peak=$(python3 bench/throughput.py --measure-peak | awk '/^PEAK/ {print $2}')
  echo "bf16 matmul peak: $peak TFLOP/s" | tee -a "$out/gpu.txt"
fi
if [ "$part" = budget ]; then
  budget_run budget-1b-20 /tmp/bench1b/model 8 20 80
  [ -d /tmp/bench8b/model ] || python3 bench/make_bench_model.py /tmp/bench8b --shape llama-8b --quantize 4 --rows 64 2>&1 | tail -2
  budget_run budget-8b-16 /tmp/bench8b/model 2 16 40
  budget_run budget-8b-24 /tmp/bench8b/model 2 24 40
  # BASELINE=0: the tunetop runs only (a plan change checked again; mlx-lm's figure is the part's last run)
  [ "${BASELINE:-1}" = 0 ] || python3 bench/throughput.py --model /tmp/bench8b/model --num-layers 16 --rank 8 --memory-limit-gb 16 --scratch /tmp/tt-scratch \
    --peak-tflops "$peak" --which mlx_lm --mlx-lm-grad-checkpoint --batch-size 4 --data /tmp/bench1b/variable --iters 30 --report 5 \
    2>&1 | tee "$out/mlx-8b-16.txt" | grep RESULT | tee -a "$out/budget.txt"
fi
# Equal work. Variable-length data: tunetop's 4 packed rows of 2048 hold about 9 examples, so
# mlx_lm.lora at batch 9 (both unconstrained: the speed of the same work, not the memory goal).
# Fixed 512-token rows at batch 8, one example a row on every side: tunetop (--packing off),
# mlx_lm.lora, and PyTorch + PEFT (bench/peft_throughput.py). Then the first step on the 1B model.
if [ "$part" = equal ]; then
  eq=(--model /tmp/bench1b/model --num-layers 16 --rank 8 --memory-limit-gb 100 --scratch /tmp/tt-scratch --peak-tflops "$peak")
  python3 bench/throughput.py "${eq[@]}" --which ours --batch-size 4 --pack-length 2048 --data /tmp/bench1b/variable --iters 80 --report 10 2>&1 | tee "$out/eq-variable-ours.txt" | grep RESULT | tee -a "$out/equal.txt"
  python3 bench/throughput.py "${eq[@]}" --which mlx_lm --batch-size 9 --data /tmp/bench1b/variable --iters 60 --report 10 2>&1 | tee "$out/eq-variable-mlx.txt" | grep RESULT | tee -a "$out/equal.txt"
  python3 bench/throughput.py "${eq[@]}" --which ours --packing off --batch-size 8 --data /tmp/bench1b/fixed512 --iters 80 --report 10 2>&1 | tee "$out/eq-fixed-ours.txt" | grep RESULT | tee -a "$out/equal.txt"
  python3 bench/throughput.py "${eq[@]}" --which mlx_lm --batch-size 8 --data /tmp/bench1b/fixed512 --iters 60 --report 10 2>&1 | tee "$out/eq-fixed-mlx.txt" | grep RESULT | tee -a "$out/equal.txt"
  python3 bench/peft_throughput.py --model /tmp/bench1b/model --data /tmp/bench1b/fixed512 --batch-size 8 --iters 60 --report 10 --peak-tflops "$peak" 2>&1 | tee "$out/eq-fixed-peft.txt" | grep RESULT | tee -a "$out/equal.txt"
  python3 bench/first_step.py --rounds 2 --model /tmp/bench1b/model --data /tmp/bench1b/variable 2>&1 | tee "$out/first-step.txt" | tail -4
fi
# What fits 8 (or 4, 6) packed rows of 2048 of the 1B shape in 20 GB, fastest: the settings the
# budget's plan chooses between (cross-entropy chunking, recomputing blocks), under a 19 GB cap.
if [ "$part" = budget-sweep ]; then
  sw=(--model /tmp/bench1b/model --num-layers 16 --rank 8 --scratch /tmp/tt-scratch --which ours --data /tmp/bench1b/variable
      --pack-length 2048 --iters 60 --report 10 --memory-limit-gb 19)
  for setting in "8 2048 0" "8 4096 4" "8 2048 6" "8 0 10" "6 2048 2" "4 0 0" "4 2048 0" "4 4096 2"; do
    read -r rows chunk blocks <<< "$setting"
    gc=(); [ "$blocks" -gt 0 ] && gc=(--grad-checkpoint-blocks "$blocks")
    echo "rows $rows ce_chunk_tokens $chunk blocks $blocks: $(python3 bench/throughput.py "${sw[@]}" --batch-size "$rows" \
      --ce-chunk-tokens "$chunk" "${gc[@]}" 2>&1 | grep RESULT | cut -c1-400)" | tee -a "$out/budget-sweep.txt"
  done
fi
if [ "$part" = all ] || [ "$part" = attention ]; then
  python3 bench/attention_paths.py 2>&1 | tee "$out/attention.txt"
fi
echo "== summary"; tail -n 5 "$out"/*.txt
