"""What each fp32 island costs in a training step: leantrain's step with one island at a time replaced by its
all-bf16 version (the way benchmarks/plain_llama.py writes it), eager and compiled, side by side.

    python benchmarks/islands.py --repeats 3 --steps 12 --out benchmarks/results/islands.json

Variants (each a fresh process running leantrain.train.train on the `small` flavor, seq 256, batch 8, the
recipe bf16-sr unless said; repeats interleaved so a noisy neighbour slows all alike):
    islands     leantrain as it is: every island in fp32
    bf16-rmsnorm    island 2 in bf16: the statistics in the activations' dtype
    bf16-rope   island 1 in bf16: the tables rounded to bf16 and the rotation done in bf16
    bf16-loss   island 4 in bf16: F.cross_entropy on the bf16 logits
    bf16-clip   island 5 in bf16: torch.nn.utils.clip_grad_norm_ (norms in the gradients' dtype)
    bf16-all    the four above at once
    nearest     the recipe bf16 (round to nearest): what stochastic rounding of island 6's result costs
Island 3 (SDPA's fp32 softmax accumulation) is inside the attention kernel and costs nothing to keep. A variant's
cost is its step time's difference from `islands` within a repeat, as a share of the `islands` step (the median
over repeats). The islands are replaced here, in the benchmark's process only: this measures, it changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("islands", "bf16-rmsnorm", "bf16-rope", "bf16-loss", "bf16-clip", "bf16-all", "nearest")


def _bf16_rms_norm(x, weight, eps):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _bf16_apply_rotary(x, cos, sin):
    import torch

    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    if cos.dim() == 2:
        cos, sin = cos[None, : x.shape[1]], sin[None, : x.shape[1]]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def _bf16_linear_cross_entropy(hidden, weight, labels, chunk=None):
    import torch.nn.functional as F

    from leantrain.precision import IGNORE_INDEX

    return F.cross_entropy(F.linear(hidden, weight).flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


def _bf16_clip_grad_norm_(params, max_norm):
    import torch

    return torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf"), foreach=True)


def replace_islands(variant: str) -> None:
    """Swap the islands that ``variant`` names for their bf16 versions in this process."""
    from leantrain import precision, step

    off = {"bf16-rmsnorm", "bf16-rope", "bf16-loss", "bf16-clip"} if variant == "bf16-all" else {variant}
    if "bf16-rmsnorm" in off:
        precision.rms_norm = _bf16_rms_norm
    if "bf16-rope" in off:
        precision.apply_rotary = _bf16_apply_rotary
    if "bf16-loss" in off:
        precision.linear_cross_entropy = _bf16_linear_cross_entropy
    if "bf16-clip" in off:
        step.clip_grad_norm_ = _bf16_clip_grad_norm_


def worker(variant: str, steps: int, compile: str) -> None:
    sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
    from throughput import WARMUP, run_leantrain

    replace_islands(variant)
    times = run_leantrain("bf16" if variant == "nearest" else "bf16-sr", steps, compile)
    print(json.dumps({"variant": variant, "compile": compile, "step_s": statistics.median(times[WARMUP:])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", default="false,true", help="the compile.enable values to measure, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of them, comma-separated (islands first)")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "COMPILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, args.worker[1])
        return
    variants = args.variants.split(",")
    combos = [(v, c) for c in args.compile.split(",") for v in variants]
    runs: dict[tuple[str, str], list[float]] = {c: [] for c in combos}
    for rep in range(args.repeats):
        for variant, compile in combos:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", variant, compile, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            runs[(variant, compile)].append(json.loads(out.stdout.strip().splitlines()[-1])["step_s"])
            print(
                f"repeat {rep}: compile={compile} {variant:9s} {runs[(variant, compile)][-1]:.3f} s/step",
                file=sys.stderr,
                flush=True,
            )
    lines = [
        "| variant | " + " | ".join(f"compile={c}: s/step | share of the step" for c in args.compile.split(",")) + " |",
        "|---" * (1 + 2 * len(args.compile.split(","))) + "|",
    ]
    for v in variants:
        cells = []
        for c in args.compile.split(","):
            base = runs[("islands", c)]
            share = statistics.median((b - x) / b for x, b in zip(runs[(v, c)], base))
            cells.append(
                f"{statistics.median(runs[(v, c)]):.3f} | {share * 100:+.1f}%"
                if v != "islands"
                else f"{statistics.median(base):.3f} | -"
            )
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "table": lines, "runs": {f"{v}/compile={c}": x for (v, c), x in runs.items()}},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
