"""The largest Llama 3 that each recipe fully fine-tunes on one GPU of 24, 48 and 80 GiB: the planner's own
`leantrain plan --largest` (leantrain.plan.largest) for 1B, 3B, 8B and 70B at seq 2048, batch 1, full activation
checkpointing, one GPU (no sharding), with and without gradient release.

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
from leantrain.plan import LLAMA3_FLAVORS, largest, largest_that_fits, plan  # noqa: E402

GPUS_GIB = (24, 48, 80)


def main() -> None:
    gib = 2**30
    cfg = load_config(
        None, {"data.seq_len": "2048", "data.local_batch_size": "1", "activation_checkpoint.mode": "full"}
    )
    result = largest(cfg, list(RECIPES), dp_shard=1, gpu_memory=GPUS_GIB[0] * gib)
    per_param = {
        name: r["state_bytes_per_param"]
        for name, r in plan(load_config(None, {"model.flavor": "8B"}), list(RECIPES), 1, gib)["recipes"].items()
    }
    print(
        "| recipe | state bytes/param (8B) | "
        + " | ".join(f"{s} (GiB)" for s in LLAMA3_FLAVORS)
        + " | "
        + " | ".join(f"largest on {g} GiB" for g in GPUS_GIB)
        + " |"
    )
    print("|---" * (2 + len(LLAMA3_FLAVORS) + len(GPUS_GIB)) + "|")
    for name, r in result["recipes"].items():
        row = r["total_bytes_checkpointed"]
        print(
            f"| {name} | {per_param[name]:.2f} | "
            + " | ".join(f"{row[s] / gib:.1f}" for s in LLAMA3_FLAVORS)
            + " | "
            + " | ".join(largest_that_fits(row, g * gib) or "none" for g in GPUS_GIB)
            + " |"
        )


if __name__ == "__main__":
    main()
