#!/usr/bin/env bash
# One NVIDIA GPU, one script, at most 7.2 minutes of device time (every part has a timeout; they sum to 430 s, and
# to 470 s on a machine with 2 GPUs, where part 6 runs).
# It writes one results file, $OUT/results.md (default benchmarks/results/gpu/results.md), part by part:
#   1. correctness first (60 s): the device-capable tests on the GPU (tests/test_device.py: the random bits are the
#      CPU's, the eager step is the CPU's bit for bit, the Triton kernel is the eager step, a gradient-release
#      backward makes no host sync);
#   2. the optimizer step table (75 s, benchmarks/optimizer_step.py): leantrain's bf16-sr eager and compiled, the
#      int8 and factored steps, torch's fused AdamW on bf16 (torchtitan's training.dtype=bfloat16), torchao's
#      _AdamW(bf16_stochastic_round=True);
#   3. the recipe table (4 x 40 s): the 1B flavor (Llama 3.2-1B) compiled under fp32, bf16-sr, bf16-int8-factored
#      and bf16-factored-no-m: tokens/s, MFU, peak torch.cuda.max_memory_allocated;
#   4. compiled against eager (45 + 30 s): `small` both ways, and 1B bf16-sr eager beside part 3's compiled row;
#   5. the planner against the allocator's peak (60 s, benchmarks/rss_vs_plan.py --device cuda): bf16-factored-no-m
#      with gradient release and clipping, seq 2048, full activation checkpointing, 8B where its plan fits the card;
#   6. only on a machine with 2 GPUs or more (40 s): tensor parallelism on NCCL, `small` bf16-sr
#      with tp = 2 against one GPU, losses side by side (tests/test_tensor_parallel.py runs the same on gloo).
#
#     bash benchmarks/gpu.sh
#
# Knobs (environment): FLAVOR (1B), SEQ (2048), BATCH (4), STEPS (20), RECIPES, OUT, PEAK_TFLOPS (the GPU's dense
# bf16 peak; by default read from the device name, e.g. 989 for H100/H200).
# A dry run on CPU (no GPU parts): DEVICE=cpu FLAVOR=debug SEQ=64 BATCH=2 STEPS=3 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FLAVOR=${FLAVOR:-1B}; SEQ=${SEQ:-2048}; BATCH=${BATCH:-4}; STEPS=${STEPS:-20}
RECIPES=${RECIPES:-"fp32 bf16-sr bf16-int8-factored bf16-factored-no-m"}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
RESULTS="$OUT/results.md"
mkdir -p "$OUT"
echo "gpu.sh: device tests (60 s), the optimizer step table (75 s), $FLAVOR under $RECIPES (40 s each), compiled vs" \
     "eager for small and $FLAVOR (75 s), the planner vs the allocator (60 s), tensor parallelism where there are 2" \
     "GPUs (40 s): at most 7.2 minutes (7.9 with 2 GPUs); results: $RESULTS"
: > "$RESULTS"
part() { echo -e "\n## $1\n" | tee -a "$RESULTS"; }
keep() { tee -a "$RESULTS"; }

train() {  # train LABEL TIMEOUT FLAVOR COMPILE RECIPE: one run into $OUT/LABEL
  rm -rf "${OUT:?}/$1"
  timeout "$2" "$PY" -m leantrain train --recipe="$5" --model.flavor="$3" --data.seq_len="$SEQ" \
    --data.local_batch_size="$BATCH" --training.steps="$STEPS" --compile.enable="$4" \
    --lr_scheduler.warmup_steps=5 --metrics.log_freq=5 --eval.interval=0 --eval.steps=1 \
    --metrics.progress=false --job.dump_folder="$OUT/$1" > "$OUT/$1.log" 2>&1 || echo "run $1 failed or timed out" | keep
}

part "1. device tests"
LEANTRAIN_TEST_DEVICE="$DEVICE" timeout 60 "$PY" -m pytest -q tests/test_device.py 2>&1 | tail -15 | keep \
  || echo "device tests failed or timed out" | keep

part "2. the optimizer step"
timeout 75 "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --repeats 20 --warmup 3 \
  --only "torch AdamW fused (bf16)" --only "torchao _AdamW bf16_stochastic_round" --only "bf16 stochastic" \
  --only "bf16 none, compiled" --only "bf16 stochastic, compiled" --only "bf16 int8 (stochastic), compiled" \
  --only "bf16 int8-factored (stochastic), compiled" --out "$OUT/optimizer_step.json" 2>&1 | keep \
  || echo "optimizer step benchmark failed or timed out" | keep

part "3. recipes ($FLAVOR, seq $SEQ, batch $BATCH, compiled)"
for r in $RECIPES; do train "$r" 40 "$FLAVOR" true "$r"; done
"$PY" benchmarks/gpu_report.py "$OUT" $RECIPES | keep

part "4. compiled vs eager (bf16-sr)"
train small-compiled 30 small true bf16-sr
train small-eager 15 small false bf16-sr
train "$FLAVOR-eager" 30 "$FLAVOR" false bf16-sr
"$PY" benchmarks/gpu_report.py "$OUT" small-compiled small-eager bf16-sr "$FLAVOR-eager" | keep

if [ "$DEVICE" = cuda ]; then
  part "5. the planner against the allocator's peak"
  timeout 60 "$PY" benchmarks/rss_vs_plan.py --device cuda --out "$OUT/memory_vs_plan.json" 2>&1 | keep \
    || echo "memory vs plan check failed or timed out" | keep
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
  part "6. tensor parallelism on NCCL (small, bf16-sr, tp = 2 against one GPU)"
  TP_ARGS=(--recipe=bf16-sr --model.flavor=small --data.seq_len=512 --data.local_batch_size=8 --training.steps=10
           --metrics.log_freq=1 --eval.interval=0 --eval.steps=1 --metrics.progress=false --compile.enable=false)
  rm -rf "$OUT/tp1" "$OUT/tp2"
  timeout 15 "$PY" -m leantrain train "${TP_ARGS[@]}" --job.dump_folder="$OUT/tp1" > "$OUT/tp1.log" 2>&1 \
    || echo "one-GPU run failed or timed out" | keep
  timeout 25 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m leantrain train "${TP_ARGS[@]}" \
    --parallelism.tp=2 --parallelism.dp_shard=1 --job.dump_folder="$OUT/tp2" > "$OUT/tp2.log" 2>&1 \
    || echo "tp = 2 run failed or timed out" | keep
  "$PY" -c "import json, sys; l = lambda d: [json.loads(x)['loss'] for x in open(d + '/metrics.jsonl')]; \
a, b = l(sys.argv[1]), l(sys.argv[2]); print('step losses, 1 GPU vs tp = 2:', [f'{x:.4f}/{y:.4f}' for x, y in zip(a, b)]); \
print('largest relative difference: %.1e' % max(abs(x - y) / x for x, y in zip(a, b)))" "$OUT/tp1" "$OUT/tp2" 2>&1 | keep
fi
echo "done: $RESULTS"
