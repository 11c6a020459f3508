"""Sharded (FSDP2 and tensor-parallel DTensor) parameters in the optimizer: quantized moments' block scales and
int4's packed codes.

The math runs on each rank's local shard (`leantrain.distributed.local`), whatever its placement (FSDP2 cuts rows,
tensor parallelism rows or columns); each element draws the random bits of its global index (randbits.ElementBox);
int8 / int4 blocks are cut from the local shard.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..distributed import is_dtensor, split_dim
from . import quant

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _shard_count(p: DTensor) -> int:
    """How many different parts of `p` the ranks hold (replicas of a part count once)."""
    return math.prod(p.device_mesh.size(d) for d, pl in enumerate(p.placements) if split_dim(pl) is not None)


def _largest_local_numel(p: DTensor) -> int:
    """The most elements any rank holds of `p` (each sharded dimension cut into equal parts, the last smaller)."""
    shape = list(p.shape)
    for d, pl in enumerate(p.placements):
        if split_dim(pl) is not None:
            shape[pl.dim] = -(-shape[pl.dim] // p.device_mesh.size(d))
    return math.prod(shape)


def _parts_placements(p: DTensor) -> list:
    """Placements of a [parts, ...] tensor with one row per part of `p`: rows split over every mesh dimension that
    splits p (in mesh order, so row k is the part that mesh coordinate k holds), replicated over the others."""
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(0) if split_dim(pl) is not None else Replicate() for pl in p.placements]


def sharded_block_scales(p: DTensor, fmt: quant.Format) -> DTensor:
    """Block scales of a sharded parameter, whatever its placements (FSDP2's rows, tensor parallelism's rows or
    columns): each rank cuts its own part into blocks; row r of this [parts, blocks] DTensor (padded to the
    largest part's block count) holds part r's. The blocks follow the layout, so the codes resume on the same
    layout only (checkpoint.py refuses another)."""
    nb = fmt.num_blocks(_largest_local_numel(p))
    from torch.distributed.tensor import DTensor

    row = torch.zeros(1, nb, dtype=torch.float32, device=p.device)  # this rank's row
    return DTensor.from_local(
        row, p.device_mesh, _parts_placements(p), shape=torch.Size((_shard_count(p), nb)), stride=(nb, 1)
    )


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
    from torch.distributed.tensor import DTensor

    local = torch.full(halved(p.to_local().shape), code, dtype=torch.uint8, device=p.device)
    shape = torch.Size(halved(p.shape))
    return DTensor.from_local(
        local, p.device_mesh, p.placements, shape=shape, stride=torch.empty(shape, device="meta").stride()
    )
