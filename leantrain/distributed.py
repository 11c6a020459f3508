"""The distributed facts, in one place: which rank this process is, how many there are, its device, and the
local shard of a DTensor. Every other module asks here. It imports nothing of leantrain's, and not torch
either until asked (the command line asks for the rank before it knows whether it needs torch)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Mapping, NamedTuple

if TYPE_CHECKING:
    import torch


class Launch(NamedTuple):
    """What torchrun told this process: its global rank, its rank on the node, and the number of processes."""

    rank: int
    local_rank: int
    world_size: int


def launch(env: Mapping[str, str] = os.environ) -> Launch:
    """torchrun's RANK, LOCAL_RANK and WORLD_SIZE; a plain process is rank 0 of 1."""
    return Launch(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))


def initialized() -> bool:
    """A process group exists (torchrun, after parallel.init_distributed, or a caller's own). None can before
    torch.distributed is imported."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's RANK (also before the group starts, e.g.
    in a signal handler), else 0."""
    return sys.modules["torch.distributed"].get_rank() if initialized() else launch().rank


def world_size() -> int:
    if initialized():
        return sys.modules["torch.distributed"].get_world_size()
    return launch().world_size


def is_main() -> bool:
    """Rank 0 writes the run's files and prints; the other ranks keep quiet."""
    return rank() == 0


def barrier() -> None:
    if initialized():
        sys.modules["torch.distributed"].barrier()


def default_device(local_rank: int = 0) -> torch.device:
    """This rank's GPU when there are GPUs, else the CPU."""
    import torch

    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP2 shard). None can exist before torch.distributed.tensor is imported, and importing it
    costs a second, so commands that never shard do not."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes go to the DTensor), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def split_dim(placement) -> int | None:
    """The tensor dimension a DTensor placement splits over its mesh dimension (Shard, and FSDP2's _StridedShard
    of a tensor-parallel dimension, which torch does not count as `is_shard()`); None for Replicate and Partial."""
    return getattr(placement, "dim", None)


def part_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, the same on every rank) as DTensor ``like`` holds it: this rank's part, cut without
    communication (every rank has the whole); a plain ``like``: ``full`` itself."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def settle_gradient(p: torch.Tensor) -> None:
    """Give ``p.grad`` its parameter's placements. Under tensor parallelism without FSDP2, a parameter replicated over
    tp that sequence parallelism applies to a part of the sequence (the blocks' norms) gets a gradient of partial
    sums (DTensor's Partial: each rank its own tokens' share); they are summed here (one small all-reduce)."""
    g = p.grad
    if is_dtensor(g) and g.placements != p.placements:
        p.grad = g.redistribute(g.device_mesh, p.placements)
