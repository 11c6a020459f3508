"""Tokens/s and measured state bytes of leantrain's recipes on `small`, interleaved A/B, as ratios to fp32.

    python benchmarks/recipe_speed.py --recipes fp32,bf16-mixed,bf16,bf16-sr --repeats 3 --steps 30 --out bench.json

Each repeat runs every recipe once, in turn, in a fresh process (so a noisy neighbour slows all of
them alike); the table reports the median over repeats of each run's median tokens/s, and each
recipe's median ratio to the first recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(recipe: str, steps: int, folder: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "leantrain", "train", f"--recipe={recipe}", "--model.flavor=small",
           f"--training.steps={steps}", "--metrics.log_freq=5", "--eval.interval=0", "--eval.steps=1",
           "--metrics.progress=false", "--lr_scheduler.warmup_steps=0", f"--job.dump_folder={folder}", *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    with open(os.path.join(folder, "summary.json")) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="fp32,bf16-mixed,bf16,bf16-sr")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="")
    ap.add_argument("extra", nargs="*", help="more train options, e.g. --data.seq_len=512")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    results: dict[str, list[dict]] = {r: [] for r in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for r in recipes:
                results[r].append(run(r, args.steps, os.path.join(tmp, f"{r}-{rep}"), args.extra))
                print(f"repeat {rep} {r}: {results[r][-1]['tokens_per_sec']:.0f} tok/s", file=sys.stderr)
    base = recipes[0]
    rows = []
    for r in recipes:
        tps = [s["tokens_per_sec"] for s in results[r]]
        ratios = [s["tokens_per_sec"] / b["tokens_per_sec"] for s, b in zip(results[r], results[base])]
        rows.append({"recipe": r, "tokens_per_sec": statistics.median(tps), f"ratio_to_{base}": statistics.median(ratios),
                     "state_bytes_per_param": results[r][0]["state_bytes_per_param"],
                     "peak_rss_bytes": statistics.median(s["peak_memory_bytes"] for s in results[r])})
    print(f"| recipe | tokens/s (median) | ratio to {base} | state bytes/param | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | {row['tokens_per_sec']:.0f} | {row[f'ratio_to_{base}']:.2f} | "
              f"{row['state_bytes_per_param']:.2f} | {row['peak_rss_bytes'] / 2**20:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "runs": results, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
