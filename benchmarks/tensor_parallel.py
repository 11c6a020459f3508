"""Every recipe under tensor parallelism against one process: the largest relative difference of a step's loss.

    python benchmarks/tensor_parallel.py --out benchmarks/results/tensor_parallel.json

The debug model, seq 32, 3 steps (warm-up 1, the default lr), every step logged. Each recipe trains once in one
process with local_batch_size 8, and once on 4 gloo ranks of dp_shard = 2 x tp = 2 with local_batch_size 4 (the same
global batch and initial weights), all 4-rank runs in one torchrun launch of tests/distributed_jobs.py.
tests/test_tensor_parallel.py checks three of the recipes on every `make test`; this covers all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from leantrain.config import RECIPES  # noqa: E402
from leantrain.metrics import read_metrics  # noqa: E402

COMMON = [
    "--model.flavor=debug",
    "--compile.enable=false",
    "--data.seq_len=32",
    "--eval.steps=1",
    "--metrics.progress=false",
    "--lr_scheduler.warmup_steps=1",
    "--training.steps=3",
    "--metrics.log_freq=1",
    "--eval.interval=0",
]
LAYOUT = ["--parallelism.tp=2", "--parallelism.dp_shard=2", "--data.local_batch_size=4"]


def losses(folder: str) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(folder, "metrics.jsonl"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    recipes, root = args.recipes.split(","), tempfile.mkdtemp()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for r in recipes:
        one = [*COMMON, f"--recipe={r}", "--data.local_batch_size=8", f"--job.dump_folder={root}/one-{r}"]
        subprocess.run(
            [sys.executable, "-m", "leantrain", "train", *one], check=True, env=env, cwd=ROOT, capture_output=True
        )
    jobs = [[*COMMON, f"--recipe={r}", *LAYOUT, f"--job.dump_folder={root}/tp-{r}"] for r in recipes]
    with open(f"{root}/jobs.json", "w") as f:
        json.dump(jobs, f)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=4",
            os.path.join(ROOT, "tests", "distributed_jobs.py"),
            f"{root}/jobs.json",
        ],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    rows = {
        r: max(abs(a - b) / a for a, b in zip(losses(f"{root}/one-{r}"), losses(f"{root}/tp-{r}"))) for r in recipes
    }
    lines = ["| recipe | 2 x 2 vs one process |", "|---|---|"] + [f"| {r} | {d:.1e} |" for r, d in rows.items()]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "largest_relative_difference": rows, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
