"""Several trainings in one torchrun launch, for tests/test_distributed.py (one process start-up, not one per run).

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_jobs.py JOBS.json

JOBS.json is a list of argument lists (``--section.key=value ...`` as on the command line). Each is trained with
the same code as ``leantrain train`` on the process group started here; then every rank writes
``rank<R>.json`` into the run's folder: its measured state bytes and a checksum of its own parameter shards
(replicas must agree bit for bit).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leantrain.config import load_config, parse_overrides  # noqa: E402
from leantrain.runplan import resolve  # noqa: E402
from leantrain.train import train  # noqa: E402


def local_checksum(model: torch.nn.Module) -> list[float]:
    out = []
    for p in model.parameters():
        local = (p.to_local() if hasattr(p, "to_local") else p).detach().double()
        out.append([local.sum().item(), local.abs().sum().item()])
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for args in jobs:
        cfg = load_config(None, parse_overrides(args))
        summary, model = train(resolve(cfg))
        with open(os.path.join(cfg.job.dump_folder, f"rank{rank}.json"), "w") as f:
            json.dump({"state_bytes": summary["state_bytes"], "checksum": local_checksum(model)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
