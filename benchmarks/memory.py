"""Measured memory per recipe (state bytes from live tensors, peak RSS) vs the planner, and activation
checkpointing's effect on peak memory.

    python benchmarks/memory.py --out benchmarks/results/memory.json

Part 1, where training state dominates memory: the 1B flavor cut to 4 blocks with an 8192-entry vocabulary
(260M parameters, none of them more than 6% of the whole, so that gradient release's one live gradient is
small), seq 32, batch 1, 2 steps, no clipping, each recipe in a fresh process, once with the normal step and
once with gradient release (optimizer.in_backward). Reports the measured state bytes/param (summary.json,
from the tensors' storages after the last step: a released run holds no gradient then), the planner's
prediction for the same run (summary.json's planned_state_bytes: for a released run, the largest gradient
alive at once), and the process's peak RSS.

Part 2, where activations dominate: `small`, seq 512, batch 8, bf16, 3 steps, activation_checkpoint.mode
none / full / selective: peak RSS and the per-step losses (which must be identical).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = [
    "fp32",
    "bf16-mixed",
    "bf16",
    "bf16-fp32state",
    "bf16-sr",
    "bf16-kahan",
    "bf16-int8",
    "bf16-int4",
    "bf16-int4-int8",
]
STATE_RUN = [
    "--model.flavor=1B",
    "--model.n_layers=4",
    "--model.vocab_size=8192",
    "--data.seq_len=32",
    "--data.local_batch_size=1",
    "--training.steps=2",
    "--eval.steps=1",
    "--lr_scheduler.warmup_steps=0",
    "--training.max_norm=0",
]
AC_RUN = [
    "--model.flavor=small",
    "--data.seq_len=512",
    "--data.local_batch_size=8",
    "--training.steps=3",
    "--eval.steps=1",
    "--lr_scheduler.warmup_steps=0",
    "--recipe=bf16",
    "--metrics.log_freq=1",
]


def run(args: list[str]) -> tuple[dict, list[dict]]:
    folder = tempfile.mkdtemp()
    subprocess.run(
        [sys.executable, "-m", "leantrain", "train", "--metrics.progress=false", f"--job.dump_folder={folder}", *args],
        check=True,
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return summary, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="part 1's recipes, comma-separated")
    ap.add_argument("--no-activations", action="store_true", help="part 1 only")
    args = ap.parse_args()
    mib = 2**20
    out: dict = {"recipes": {}, "activation_checkpoint": {}}
    print(
        "| recipe | optimizer.in_backward | state bytes/param (measured) | planned | "
        "params + grads + optimizer (MiB) | peak RSS (MiB) | peak RSS saved by release, bytes/param |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in args.recipes.split(","):
        for release in (False, True):
            s, _ = run([*STATE_RUN, f"--recipe={r}", f"--optimizer.in_backward={str(release).lower()}"])
            planned = sum(s["planned_state_bytes"].values()) / s["num_params"]
            name = f"{r} + in_backward" if release else r
            out["recipes"][name] = {
                "state_bytes_per_param": s["state_bytes_per_param"],
                "planned_bytes_per_param": planned,
                "state_bytes": s["state_bytes"],
                "peak_rss_bytes": s["peak_memory_bytes"],
            }
            saved = (
                (out["recipes"][r]["peak_rss_bytes"] - s["peak_memory_bytes"]) / s["num_params"] if release else None
            )
            print(
                f"| {r} | {str(release).lower()} | {s['state_bytes_per_param']:.3f} | {planned:.3f} | "
                f"{sum(s['state_bytes'].values()) / mib:.0f} | {s['peak_memory_bytes'] / mib:.0f} | "
                f"{'' if saved is None else f'{saved:.2f}'} |",
                flush=True,
            )
    if {"fp32", "bf16"} <= set(out["recipes"]):
        fp32, bf16 = out["recipes"]["fp32"]["peak_rss_bytes"], out["recipes"]["bf16"]["peak_rss_bytes"]
        print(f"\npeak RSS bf16 / fp32: {bf16 / fp32:.2f}\n")
    print("| activation_checkpoint.mode | peak RSS (MiB) | per-step losses |")
    print("|---|---|---|")
    for mode in () if args.no_activations else ("none", "full", "selective"):
        s, records = run([*AC_RUN, f"--activation_checkpoint.mode={mode}"])
        losses = [r["loss"] for r in records]
        out["activation_checkpoint"][mode] = {"peak_rss_bytes": s["peak_memory_bytes"], "losses": losses}
        print(f"| {mode} | {s['peak_memory_bytes'] / mib:.0f} | {', '.join(f'{x:.6f}' for x in losses)} |", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
