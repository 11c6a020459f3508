"""The largest Llama 3 that each recipe fully fine-tunes on one GPU: `leantrain plan` for 1B, 3B, 8B and 70B at
seq 2048, batch 1, full activation checkpointing, one GPU (no sharding), with and without gradient release.

    python benchmarks/fits.py

The sizes are leantrain's published flavors (leantrain.model.FLAVORS: Llama 3.2-1B, 3.2-3B, 3.1-8B, 3.1-70B).
Planned, not measured: the state bytes are exact (the optimizer lays its state out on meta tensors), the
activations an estimate (leantrain/plan.py), and nothing is added for the allocator or the CUDA context.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leantrain.config import RECIPES, load_config  # noqa: E402
from leantrain.model import FLAVORS, TOKENIZER_SIZED_FLAVORS  # noqa: E402
from leantrain.plan import plan  # noqa: E402

MODELS = {size: {"model.flavor": size} for size in FLAVORS if size not in TOKENIZER_SIZED_FLAVORS}
GPUS_GIB = (24, 48, 80)


def main() -> None:
    gib = 2**30
    totals: dict[str, dict[str, float]] = {}
    per_param: dict[str, float] = {}
    for size, keys in MODELS.items():
        cfg = load_config(None, {**keys, "data.seq_len": "2048", "data.local_batch_size": "1",
                                 "activation_checkpoint.mode": "full"})
        p = plan(cfg, list(RECIPES), dp_shard=1, gpu_memory=80 * gib)
        for name, r in p["recipes"].items():
            totals.setdefault(name, {})[size] = r["total_bytes_per_gpu_checkpointed"]
            if size == "8B":
                per_param[name] = r["state_bytes_per_param"]
    print("| recipe | state bytes/param (8B) | " + " | ".join(f"{s} (GiB)" for s in MODELS) + " | "
          + " | ".join(f"largest on {g} GiB" for g in GPUS_GIB) + " |")
    print("|---" * (2 + len(MODELS) + len(GPUS_GIB)) + "|")
    for name, row in totals.items():
        fits = [[s for s in MODELS if row[s] <= g * gib] for g in GPUS_GIB]
        print(f"| {name} | {per_param[name]:.2f} | " + " | ".join(f"{row[s] / gib:.1f}" for s in MODELS) + " | "
              + " | ".join(f[-1] if f else "none" for f in fits) + " |")


if __name__ == "__main__":
    main()
