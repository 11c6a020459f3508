"""Where one leantrain training step's time goes: torch.profiler over a few steps of `small` (seq 256, batch 8) as
leantrain.train.train runs them, each step's phases marked (forward and loss, backward, clipping, the optimizer
step, the rest), then the ops by their own time.

    python benchmarks/step_profile.py --recipe bf16-sr --compile true --out benchmarks/results/step_profile.json

benchmarks/islands.py measures what each fp32 island costs by replacing it; this says which phase holds the time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import leantrain.train as train_module  # noqa: E402
from leantrain import step as step_module  # noqa: E402
from leantrain.config import load_config  # noqa: E402
from leantrain.runplan import resolve  # noqa: E402

PHASES = ("forward+loss", "backward", "clip", "optimizer", "step")


def _marked(fn, name):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="bf16-sr")
    ap.add_argument("--compile", default="true")
    ap.add_argument("--steps", type=int, default=12, help="steps run; the last 4 are profiled")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    prof = profile(activities=[ProfilerActivity.CPU])
    steps_seen = []
    train_step = step_module.train_step

    def profiled_step(state, batches, ctx, count_lost_updates=False):
        steps_seen.append(state.step + 1)
        if len(steps_seen) == args.steps - 3:
            prof.__enter__()
        with record_function("step") if len(steps_seen) > args.steps - 4 else contextlib.nullcontext():
            out = train_step(state, batches, ctx, count_lost_updates)
        if len(steps_seen) == args.steps:
            prof.__exit__(None, None, None)
        return out

    # the phases, marked where train_step calls them
    step_module.batch_loss = _marked(step_module.batch_loss, "forward+loss")
    step_module.clip_grad_norm_ = _marked(step_module.clip_grad_norm_, "clip")
    torch.Tensor.backward = _marked(torch.Tensor.backward, "backward")
    train_module.train_step = profiled_step
    folder = tempfile.mkdtemp()
    cfg = load_config(
        None,
        {
            "recipe": args.recipe,
            "model.flavor": "small",
            "data.seq_len": "256",
            "data.local_batch_size": "8",
            "training.steps": str(args.steps),
            "metrics.log_freq": "5",
            "eval.interval": "0",
            "eval.steps": "1",
            "metrics.progress": "false",
            "job.dump_folder": folder,
            "compile.enable": args.compile,
        },
    )
    plan = resolve(cfg)
    build_run = train_module.build_run

    def build_marked_run(plan, hooks):
        run = build_run(plan, hooks)
        run.state.optimizer.step = _marked(run.state.optimizer.step, "optimizer")
        return run

    train_module.build_run = build_marked_run
    train_module.train(plan)
    events = prof.key_averages()
    total = next(e for e in events if e.key == "step").cpu_time_total
    rows = [
        {"name": name, "share": next(e.cpu_time_total for e in events if e.key == name) / total}
        for name in PHASES[:-1]
        if any(e.key == name for e in events)
    ]
    rows.append({"name": "rest (data to device, guard, meter, logging)", "share": 1 - sum(r["share"] for r in rows)})
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    lines = [
        f"recipe {args.recipe}, compile.enable={args.compile}: one step {total / 4 / 1e3:.0f} ms (4 steps)",
        "",
        "| phase | share of the step |",
        "|---|---|",
    ]
    lines += [f"| {r['name']} | {100 * r['share']:.1f}% |" for r in rows]
    lines += ["", "| op | self time share |", "|---|---|"]
    lines += [f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% |" for e in ops]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
