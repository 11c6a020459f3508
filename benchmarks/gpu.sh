#!/usr/bin/env bash
# One NVIDIA GPU, under 8 minutes: the 1B flavor (Llama 3.2-1B dimensions) with torch.compile under
# fp32, bf16-mixed, bf16, bf16-kahan and bf16-int8; tokens/s, MFU and peak torch.cuda.max_memory_allocated.
#
#     bash benchmarks/gpu.sh                 # writes benchmarks/results/gpu/<recipe>/ and prints the table
#
# Knobs (environment): FLAVOR (1B), SEQ (2048), BATCH (4), STEPS (30), COMPILE (true), RECIPES,
# PEAK_TFLOPS (the GPU's dense bf16 peak; by default read from the device name, e.g. 989 for H100/H200).
# Also runs on CPU for a dry run: FLAVOR=debug SEQ=64 BATCH=2 STEPS=3 COMPILE=false bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FLAVOR=${FLAVOR:-1B}; SEQ=${SEQ:-2048}; BATCH=${BATCH:-4}; STEPS=${STEPS:-30}; COMPILE=${COMPILE:-true}
RECIPES=${RECIPES:-"fp32 bf16-mixed bf16 bf16-kahan bf16-int8"}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
for r in $RECIPES; do
  rm -rf "$OUT/$r"
  timeout 90 "$PY" -m leantrain train --recipe="$r" --model.flavor="$FLAVOR" --data.seq_len="$SEQ" \
    --data.local_batch_size="$BATCH" --training.steps="$STEPS" --compile.enable="$COMPILE" \
    --lr_scheduler.warmup_steps=5 --metrics.log_freq=5 --eval.interval=0 --eval.steps=1 \
    --metrics.progress=false --job.dump_folder="$OUT/$r" || echo "recipe $r failed or timed out"
done
"$PY" benchmarks/gpu_report.py "$OUT" $RECIPES
