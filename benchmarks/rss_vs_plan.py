"""Measured, not only planned: a CPU run's peak RSS against what `leantrain plan` predicts for the same settings.

    python benchmarks/rss_vs_plan.py --out benchmarks/results/rss_vs_plan.json

The run: the 1B flavor cut to 4 blocks with an 8192-entry vocabulary (260M parameters), seq 256, batch 4, 3 steps,
gradient release with clipping at 1.0 (the recipe a 24 GB fine-tune uses: bf16-factored-no-m by default), no
activation checkpointing, each in a fresh process. The planner counts what the model and its training need
(weights, gradients alive at once, optimizer state, activations); the process also holds Python, torch's
libraries, the tokenizer and the data, which no plan of a GPU would count. So the same command is run once more
with the `debug` flavor (0.1M parameters: nothing but that runtime), and the comparison is of the differences:

    measured = peak RSS(260M run) - peak RSS(debug run)      (while training: the last step's logged peak, before
                                                             the final weights are saved)
    planned  = plan total(260M run) - plan total(debug run)   (params + grads + optimizer + activations, AC none)

    python benchmarks/rss_vs_plan.py --device cuda       # on a GPU (benchmarks/gpu.sh): 8B if it fits, else 1B
    python benchmarks/rss_vs_plan.py --breakdown         # where the 260M run's memory goes, phase by phase
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

RUN = {
    "data.seq_len": "256",
    "data.local_batch_size": "4",
    "training.steps": "3",
    "eval.steps": "1",
    "eval.interval": "0",
    "lr_scheduler.warmup_steps": "0",
    "optimizer.in_backward": "true",
    "training.max_norm": "1.0",
    "activation_checkpoint.mode": "none",
    "compile.enable": "false",
    "metrics.log_freq": "1",
}
MODELS = {
    "260M": {"model.flavor": "1B", "model.n_layers": "4", "model.vocab_size": "8192"},
    "debug": {"model.flavor": "debug"},
}


def measured_peak(overrides: dict) -> dict:
    folder = tempfile.mkdtemp()
    args = [f"--{k}={v}" for k, v in overrides.items()]
    subprocess.run(
        [sys.executable, "-m", "leantrain", "train", "--metrics.progress=false", f"--job.dump_folder={folder}", *args],
        check=True,
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:  # the peak while training, before the final save
        summary["training_peak_rss_bytes"] = [json.loads(line) for line in f][-1]["peak_memory_bytes"]
    return summary


def planned_total(overrides: dict, recipe: str, checkpointed: bool = False) -> int:
    from leantrain.config import load_config
    from leantrain.plan import plan

    cfg = load_config(None, {k: v for k, v in overrides.items() if k != "recipe"})
    planned = plan(cfg, [recipe], 1, 2**40)["recipes"][f"{recipe} + in_backward"]
    return planned["total_bytes_per_gpu_checkpointed" if checkpointed else "total_bytes_per_gpu"]


def _rss_mib() -> tuple[int, int]:
    """(resident, high-water mark) of this process, MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def phases(recipe: str) -> None:
    """In this process: the RSS and its high-water mark after the imports, after the run is built (model, state)
    and after each of 3 steps of the 260M model at seq 32, batch 1 (activations negligible), as JSON lines."""
    rows = [("start", *_rss_mib())]
    from leantrain.config import load_config
    from leantrain.runplan import resolve
    from leantrain.step import train_step
    from leantrain.train import build_run

    rows.append(("imports", *_rss_mib()))
    overrides = {
        **RUN,
        **MODELS["260M"],
        "recipe": recipe,
        "data.seq_len": "32",
        "data.local_batch_size": "1",
        "metrics.progress": "false",
        "job.dump_folder": tempfile.mkdtemp(),
    }
    run = build_run(resolve(load_config(None, overrides)))
    rows.append(("built", *_rss_mib()))
    for i in range(3):
        train_step(run.state, [run.state.data.next_batch()], run.ctx)
        rows.append((f"step {i + 1}", *_rss_mib()))
    for name, rss, hwm in rows:
        print(json.dumps({"phase": name, "rss_mib": rss, "hwm_mib": hwm}))


def breakdown(recipe: str) -> None:
    """`phases` in a fresh process, with glibc's default allocator settings and with its mmap threshold fixed at
    128 KiB (MALLOC_MMAP_THRESHOLD_: freed blocks above it go back to the system at once)."""
    print("| phase | RSS (MiB) | high-water mark (MiB) | with MALLOC_MMAP_THRESHOLD_=131072: RSS | high-water mark |")
    print("|---|---:|---:|---:|---:|")
    out = []
    for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "131072"}):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--phases", "--recipe", recipe],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT, **env},
        )
        out.append([json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")])
    for a, b in zip(*out):
        print(f"| {a['phase']} | {a['rss_mib']} | {a['hwm_mib']} | {b['rss_mib']} | {b['hwm_mib']} |")


def gpu(args) -> None:
    """On a GPU the allocator's peak (torch.cuda.max_memory_allocated) holds no Python or library: it is compared
    with the plan directly, for Llama 3 8B where the card's memory holds its plan, else 1B; seq 2048, batch 1, full
    activation checkpointing (the 24 GB fine-tune's settings)."""
    import torch

    gib, free = 2**30, torch.cuda.mem_get_info()[1]
    for flavor in ("8B", "1B"):
        overrides = {
            **RUN,
            "model.flavor": flavor,
            "data.seq_len": "2048",
            "data.local_batch_size": "1",
            "activation_checkpoint.mode": "full",
            "compile.enable": "true",
            "recipe": args.recipe,
        }
        planned = planned_total(overrides, args.recipe, checkpointed=True)
        if planned < 0.9 * free:
            break
    measured = measured_peak(overrides)["training_peak_rss_bytes"]
    print(
        f"{args.recipe} + in_backward on {torch.cuda.get_device_name()}, llama3 {flavor}, seq 2048, batch 1, AC full: "
        f"peak allocated {measured / gib:.2f} GiB, planned {planned / gib:.2f} GiB, ratio {measured / planned:.3f}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "recipe": args.recipe,
                    "flavor": flavor,
                    "measured_bytes": measured,
                    "planned_bytes": planned,
                    "ratio": measured / planned,
                },
                f,
                indent=1,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="bf16-factored-no-m")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="instead: where the 260M run's memory goes, phase by phase, at seq 32 (activations negligible)",
    )
    ap.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)  # --breakdown's child process
    args = ap.parse_args()
    if args.phases:
        return phases(args.recipe)
    if args.breakdown:
        return breakdown(args.recipe)
    if args.device == "cuda":
        return gpu(args)
    mib = 2**20
    rows = {}
    for name, model in MODELS.items():
        overrides = {**RUN, **model, "recipe": args.recipe}
        summary = measured_peak(overrides)
        rows[name] = {
            "num_params": summary["num_params"],
            "peak_rss_bytes": summary["training_peak_rss_bytes"],
            "peak_rss_bytes_with_final_save": summary["peak_memory_bytes"],
            "planned_total_bytes": planned_total(overrides, args.recipe),
            "state_bytes_per_param": summary["state_bytes_per_param"],
        }
    measured = rows["260M"]["peak_rss_bytes"] - rows["debug"]["peak_rss_bytes"]
    planned = rows["260M"]["planned_total_bytes"] - rows["debug"]["planned_total_bytes"]
    print(f"recipe {args.recipe} + in_backward, max_norm 1.0, seq 256, batch 4, AC none\n")
    print("| model | parameters | peak RSS while training (MiB) | with the final save (MiB) | planned total (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['num_params']:,} | {r['peak_rss_bytes'] / mib:.0f} | "
            f"{r['peak_rss_bytes_with_final_save'] / mib:.0f} | {r['planned_total_bytes'] / mib:.0f} |"
        )
    print(
        f"\nmeasured (260M - debug): {measured / mib:.0f} MiB; planned: {planned / mib:.0f} MiB; "
        f"measured / planned = {measured / planned:.3f}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "recipe": args.recipe,
                    "run": RUN,
                    "rows": rows,
                    "measured_bytes": measured,
                    "planned_bytes": planned,
                    "ratio": measured / planned,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
