"""Sharded (FSDP2 DTensor) parameters in the optimizer: which shard a rank holds, quantized moments' block scales
and int4's packed codes.

The math runs on each rank's local shard (`leantrain.distributed.local`). Ranks holding different shards must draw
different random bits, while replicas of one shard (HSDP, DDP) must draw the same ones; int8 blocks are cut from the
local shard.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..distributed import is_dtensor
from . import quant

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def shard_index(p: torch.Tensor) -> int:
    """Which shard of its parameter this rank holds: 0 for a plain tensor, the same for replicas."""
    if not is_dtensor(p):
        return 0
    mesh, coordinate, index = p.device_mesh, p.device_mesh.get_coordinate(), 0
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coordinate[dim]
    return index


def _check_dim0(p: DTensor) -> None:
    if any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
        raise ValueError(f"AdamW: quantized state needs parameters sharded on dim 0, got {p.placements}")


def sharded_block_scales(p: DTensor, fmt: quant.Format) -> DTensor:
    """Block scales of a sharded parameter: each rank cuts its own shard into blocks; row r of this
    [shards, blocks] DTensor (sharded like p, padded to the largest shard's block count) holds shard r's."""
    _check_dim0(p)
    mesh = p.device_mesh
    shards = math.prod(mesh.size(d) for d, pl in enumerate(p.placements) if pl.is_shard())
    largest = -(-p.shape[0] // shards) * (p.numel() // max(p.shape[0], 1))
    nb = fmt.num_blocks(largest)
    from torch.distributed.tensor import DTensor

    row = torch.zeros(1, nb, dtype=torch.float32, device=p.device)  # this rank's row
    return DTensor.from_local(row, mesh, p.placements, shape=torch.Size((shards, nb)), stride=(nb, 1))


def local_scale(scale: torch.Tensor, numel: int, fmt: quant.Format) -> torch.Tensor:
    """The flat scales of this rank's blocks (see sharded_block_scales)."""
    return scale.to_local()[0, : fmt.num_blocks(numel)] if is_dtensor(scale) else scale


def packed_codes(p: torch.Tensor, code: int) -> torch.Tensor:
    """int4 codes of parameter p, two per byte along its last dimension: p's shape with the last dimension halved,
    sharded like p (a DTensor's local rows are p's local rows)."""

    def halved(shape):
        return (*shape[:-1], shape[-1] // 2)

    if not is_dtensor(p):
        return torch.full(halved(p.shape), code, dtype=torch.uint8, device=p.device)
    _check_dim0(p)
    from torch.distributed.tensor import DTensor

    local = torch.full(halved(p.to_local().shape), code, dtype=torch.uint8, device=p.device)
    shape = torch.Size(halved(p.shape))
    return DTensor.from_local(
        local, p.device_mesh, p.placements, shape=shape, stride=torch.empty(shape, device="meta").stride()
    )
