"""Per-step losses of fixed runs, recorded before a refactor and checked after it (bit for bit).

    python benchmarks/behaviour.py --record benchmarks/results/behaviour.json   # before
    python benchmarks/behaviour.py --check benchmarks/results/behaviour.json    # after: exit 1 on any difference

The runs (each `python -m leantrain train` in a fresh process, 2 threads, every step logged):
fp32, bf16-sr, bf16-kahan, bf16-int8 on `debug`; a 2-rank FSDP2 bf16-sr run (torchrun, gloo); an SFT run;
and a resume (4 steps with checkpoints, then the same folder extended to 8). What is compared: every logged
key that the model's numbers decide (loss, grad_norm, lr, eval_loss, lost_update_fraction,
compensated_fraction), as exact floats. The SFT runs pass --data.packing=false: they were recorded with one
sample per padded row (before packing existed, and the default since), and check that padded SFT still computes
exactly that; packed SFT sees other batches (rows of several samples), so its losses differ by design.
`--allow KEY@RUN` names a key that may change in one run (the SFT
eval_loss when the eval mean changes), and the check prints by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--model.flavor=debug",
    "--data.seq_len=64",
    "--data.local_batch_size=4",
    "--eval.steps=2",
    "--metrics.progress=false",
    "--lr_scheduler.warmup_steps=2",
    "--metrics.log_freq=1",
    "--eval.interval=4",
    "--compile.enable=false",
]  # recorded eagerly (compiled blocks round differently)
KEYS = ("loss", "grad_norm", "lr", "eval_loss", "lost_update_fraction", "compensated_fraction")
# The same count, named by what the recipe does with it (stochastic rounding and Kahan lose nothing): compared
# as lost_update_fraction, so records from before the rename still match.
RENAMED = {"unchanged_update_fraction": "lost_update_fraction"}


def _sft_file(folder: str, n: int = 60) -> str:
    path = os.path.join(folder, f"sft{n}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Q: what is {i} plus {i * 3}?\nA: ",
                        "response": f"{i + 3 * i}" + " (checked)" * (i % 4),
                    }
                )
                + "\n"
            )
    return path


def _run(args: list[str], folder: str, nproc: int = 1) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "leantrain"]
        if nproc > 1
        else [sys.executable, "-m", "leantrain"]
    )
    proc = subprocess.run(
        [*launcher, "train", *TINY, *args, f"--job.dump_folder={folder}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"run {args} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    records = [{RENAMED.get(k, k): v for k, v in r.items()} for r in records]
    return [{k: r[k] for k in ("step", *KEYS) if k in r} for r in records]


def record(tmp: str) -> dict[str, list[dict]]:
    out = {}
    for recipe in ("fp32", "bf16-sr", "bf16-kahan", "bf16-int8"):
        out[recipe] = _run([f"--recipe={recipe}", "--training.steps=8"], os.path.join(tmp, recipe))
    out["fsdp2-bf16-sr"] = _run(
        ["--recipe=bf16-sr", "--training.steps=6", "--parallelism.dp_shard=2"], os.path.join(tmp, "fsdp"), nproc=2
    )
    out["sft"] = _run(
        [
            "--recipe=bf16-sr",
            "--training.steps=8",
            "--data.format=sft",
            "--data.packing=false",
            f"--data.path={_sft_file(tmp)}",
            "--data.seq_len=48",
            "--training.gradient_accumulation_steps=2",
        ],
        os.path.join(tmp, "sft"),
    )
    # 10 eval samples of different lengths in batches of 4, 4 and 2: the token-weighted eval mean differs from
    # the mean of the batch means here.
    out["sft-eval"] = _run(
        [
            "--recipe=bf16-sr",
            "--training.steps=4",
            "--data.format=sft",
            "--data.packing=false",
            "--eval.steps=3",
            f"--data.path={_sft_file(tmp, 200)}",
            "--data.seq_len=48",
        ],
        os.path.join(tmp, "sft-eval"),
    )
    resumed = os.path.join(tmp, "resume")
    common = ["--recipe=bf16-int8", "--checkpoint.enable=true", "--checkpoint.interval=2"]
    _run([*common, "--training.steps=4"], resumed)
    out["resume"] = _run([*common, "--training.steps=8"], resumed)
    return out


def compare(before: dict, after: dict, allowed: set[str]) -> list[str]:
    problems = []
    for run, records in before.items():
        if len(records) != len(after.get(run, [])):
            problems.append(f"{run}: {len(records)} records before, {len(after.get(run, []))} after")
            continue
        for old, new in zip(records, after[run]):
            for key in sorted(set(old) | set(new)):
                if old.get(key) == new.get(key):
                    continue
                line = f"{run} step {old['step']} {key}: {old.get(key)!r} -> {new.get(key)!r}"
                if f"{key}@{run}" in allowed and isinstance(old.get(key), float) and isinstance(new.get(key), float):
                    print(f"allowed change: {line} ({100 * (new[key] - old[key]) / old[key]:+.4f}%)")
                else:
                    problems.append(line)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", metavar="FILE")
    group.add_argument("--check", metavar="FILE")
    parser.add_argument("--allow", action="append", default=[], metavar="KEY@RUN")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = record(tmp)
    if args.record:
        with open(args.record, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"recorded {sum(map(len, result.values()))} records of {len(result)} runs in {args.record}")
        return 0
    with open(args.check, encoding="utf-8") as f:
        before = json.load(f)
    problems = compare(before, result, set(args.allow))
    for line in problems:
        print("DIFFERS:", line)
    print(f"{len(before)} runs: {'identical' if not problems else f'{len(problems)} differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
