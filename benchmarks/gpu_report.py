"""A table of benchmarks/gpu.sh's training runs: tokens/s, MFU and peak memory per run, from each run's summary.json.

    python benchmarks/gpu_report.py OUT RUN...     # each RUN a folder under OUT (gpu.sh names them)

MFU = tokens/s x FLOPs per token / the device's dense bf16 peak. FLOPs per token of training (forward and
backward) = 6 x parameters (the matmuls; the embedding lookup is counted too, as is common) + 12 x layers x
dim x seq_len (attention scores and weighted sum, PaLM's formula).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leantrain.config import load_config  # noqa: E402
from leantrain.model import model_args  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_flops() -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def main() -> None:
    warnings.simplefilter("ignore")  # each run's config warnings were shown when it trained
    out, runs = sys.argv[1], sys.argv[2:]
    peak = peak_flops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s\n")
    print("| run | recipe | flavor | compile | tokens/s | MFU | peak memory (GiB) | state bytes/param | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        path = os.path.join(out, r, "summary.json")
        if not os.path.exists(path):
            print(f"| {r} | failed (see {r}.log) | | | | | | | |")
            continue
        s = json.load(open(path))
        cfg = load_config(os.path.join(out, r, "config.toml"))
        a = model_args(cfg.model.flavor)
        flops = 6 * s["num_params"] + 12 * a.n_layers * a.dim * cfg.data.seq_len
        mfu = f"{100 * s['tokens_per_sec'] * flops / peak:.1f}%" if peak else "n/a"
        print(
            f"| {r} | {cfg.recipe} | {cfg.model.flavor} | {cfg.compile.enable} | {s['tokens_per_sec']:.0f} | {mfu} | "
            f"{s['peak_memory_bytes'] / 2**30:.1f} | {s['state_bytes_per_param']:.2f} | {s['final_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
