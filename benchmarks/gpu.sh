#!/usr/bin/env bash
# One NVIDIA GPU, at most 14.5 minutes (the timeouts: 150 + 180 + 5 x 60 + 240 s), four parts:
#   1. correctness first: the test suite's device-capable tests on the GPU (tests/test_device.py: the random bits
#      there are the CPU's, the eager step is the CPU's bit for bit, the Triton kernel is the eager step, a
#      gradient-release backward makes no host sync);
#   2. the optimizer step side by side (benchmarks/optimizer_step.py): leantrain's bf16-sr eager and compiled,
#      plain bf16, the quantized and factored (FactoredAdamW) steps, torch's fused AdamW on bf16 (torchtitan's
#      training.dtype=bfloat16) and torchao's _AdamW(bf16_stochastic_round=True);
#   3. training: the 1B flavor (Llama 3.2-1B dimensions) with torch.compile under each recipe, the default bf16-sr
#      among them; tokens/s, MFU and peak torch.cuda.max_memory_allocated;
#   4. the planner against the allocator's peak (benchmarks/rss_vs_plan.py --device cuda): bf16-factored-no-m with
#      gradient release and clipping, seq 2048, full activation checkpointing, 8B where its plan fits the card.
#
#     bash benchmarks/gpu.sh                 # writes benchmarks/results/gpu/ and prints the tables
#
# Knobs (environment): FLAVOR (1B), SEQ (2048), BATCH (4), STEPS (30), COMPILE (true), RECIPES,
# PEAK_TFLOPS (the GPU's dense bf16 peak; by default read from the device name, e.g. 989 for H100/H200).
# Also runs on CPU for a dry run: DEVICE=cpu FLAVOR=debug SEQ=64 BATCH=2 STEPS=3 COMPILE=false bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FLAVOR=${FLAVOR:-1B}; SEQ=${SEQ:-2048}; BATCH=${BATCH:-4}; STEPS=${STEPS:-30}; COMPILE=${COMPILE:-true}
RECIPES=${RECIPES:-"fp32 bf16-sr bf16-int8 bf16-int8-factored bf16-factored-no-m"}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
LEANTRAIN_TEST_DEVICE="$DEVICE" timeout 150 "$PY" -m pytest -q tests/test_device.py 2>&1 | tail -15 \
  | tee "$OUT/device-tests.txt" || echo "device tests failed or timed out"
timeout 180 "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --repeats 20 --warmup 3 \
  --only "torch AdamW fused (bf16)" --only "torchao _AdamW bf16_stochastic_round" --only "bf16 none" \
  --only "bf16 stochastic" --only "bf16 none, compiled" --only "bf16 stochastic, compiled" \
  --only "bf16 kahan, compiled" --only "bf16 int8 (stochastic), compiled" --only "bf16 int4 (stochastic), compiled" \
  --only "bf16 int4-int8 (stochastic), compiled" --only "bf16 int8 (stochastic)" \
  --only "bf16 int8-factored (stochastic), compiled" --only "bf16 int4-int8-factored (stochastic), compiled" \
  --only "torch AdamW foreach (bf16), compiled" --out "$OUT/optimizer_step.json" \
  || echo "optimizer step benchmark failed or timed out"
for r in $RECIPES; do
  rm -rf "$OUT/$r"
  timeout 60 "$PY" -m leantrain train --recipe="$r" --model.flavor="$FLAVOR" --data.seq_len="$SEQ" \
    --data.local_batch_size="$BATCH" --training.steps="$STEPS" --compile.enable="$COMPILE" \
    --lr_scheduler.warmup_steps=5 --metrics.log_freq=5 --eval.interval=0 --eval.steps=1 \
    --metrics.progress=false --job.dump_folder="$OUT/$r" || echo "recipe $r failed or timed out"
done
# the planner against the allocator's peak: the no-m recipe with release and clipping, 8B where it fits the card
if [ "$DEVICE" = cuda ]; then
  timeout 240 "$PY" benchmarks/rss_vs_plan.py --device cuda --out "$OUT/memory_vs_plan.json" \
    || echo "memory vs plan check failed or timed out"
fi
"$PY" benchmarks/gpu_report.py "$OUT" $RECIPES
