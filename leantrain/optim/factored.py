"""Adafactor's factored second moment (Shazeer & Stern 2018), as FactoredAdamW keeps it for a matrix.

Instead of v per element, two fp32 vectors: R, the EMA of g²'s row means, and C, the EMA of its column means. The
estimate of v is their outer product over their mean, v_ij ~ R_i C_j / mean(C) (mean(C) = mean(R) = the EMA of
g²'s mean): exact when g² is a rank-1 matrix, Adafactor's estimator otherwise. Both EMAs start at 0 and are
updated with Adam's beta2, so the estimate carries Adam's bias (1 - beta2^t), which the update divides out as
Adam's does. Memory: rows + cols fp32 values per matrix instead of rows * cols.

Under FSDP2 (and HSDP, and tensor parallelism's column-wise matrices) a matrix is sharded by rows: each rank holds
whole rows, so the row means are local; the column means need every row, and are all-reduced (sum) over the mesh
dimensions that shard the rows, one small all-reduce per matrix and step, on the device. Tensor parallelism's
row-wise matrices are sharded by columns too: their row means are all-reduced over the dimensions that shard the
columns. So R is a DTensor sharded like the rows and C like the columns (each replicated over the other
dimensions); DCP saves each as such, so both reshard with the model.

The statistics are computed eagerly once per matrix and step (one read of the gradient, a block of rows at a time),
before the update, which then runs chunk by chunk (whole rows) and reads its rows of R and the scaled C
(update.update_weight).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import is_dtensor, local, split_dim

_CPU_CHUNK = 1 << 18  # elements of g² in fp32 at a time (1 MiB: in cache on a CPU)
_CHUNK = 1 << 24  # elsewhere (64 MiB)


def allocate(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero (row, column) factors for matrix `p`: a DTensor's row factor is sharded like its rows, its column factor
    like its columns."""
    rows, cols = p.shape
    if not is_dtensor(p):
        return (
            torch.zeros(rows, dtype=torch.float32, device=p.device),
            torch.zeros(cols, dtype=torch.float32, device=p.device),
        )
    return _factor_like(p, 0), _factor_like(p, 1)


def _factor_like(p: torch.Tensor, dim: int) -> torch.Tensor:
    """A zero fp32 vector as long as `p`'s dimension `dim`, sharded over the mesh dimensions that shard that
    dimension of p (with p's own placement, FSDP2's strided one included), replicated over the others."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    placements = [(pl if dim == 0 else Shard(0)) if split_dim(pl) == dim else Replicate() for pl in p.placements]
    return DTensor.from_local(
        torch.zeros(local(p).shape[dim], dtype=torch.float32, device=p.device),
        p.device_mesh,
        placements,
        shape=torch.Size((p.shape[dim],)),
        stride=(1,),
    )


def update_(
    p: torch.Tensor, row: torch.Tensor, col: torch.Tensor, beta2: float, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """Fold p's gradient into the factors (in place) and return the column factor over its mean, the vector the
    update multiplies this rank's rows of R with. `gate` (0-dim bool or None): where False the factors keep their
    bits (a NaN/Inf gradient's statistics are not folded in)."""
    g = local(p.grad)
    row_mean, col_mean = _square_means(g)
    if _sharded_on(p, 1):  # a column shard: the row means are this rank's columns' share of the whole row's
        row_mean.mul_(g.shape[1] / p.shape[1])
        _sum_over_shards(row_mean, p, 1)
    _sum_over_shards(col_mean, p, 0)
    col_mean.div_(p.shape[0])
    r, c = local(row), local(col)
    for stored, new in ((r, row_mean), (c, col_mean)):
        ema = stored * beta2 + new * (1.0 - beta2)
        stored.copy_(ema if gate is None else torch.where(gate, ema, stored))
    # mean(C) is g²'s mean: the estimate R_i C_j / mean(C). tiny: a zero gradient so far gives v = 0, not NaN
    return c / _mean(c, p).clamp(min=torch.finfo(torch.float32).tiny)


def _mean(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The mean of the whole column factor, of which `c` is this rank's part."""
    if not _sharded_on(p, 1):
        return c.mean()
    total = c.sum()
    _sum_over_shards(total, p, 1)
    return total / p.shape[1]


def _square_means(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g²'s row means and column sums in fp32, a block of rows at a time: no fp32 copy of the whole gradient exists
    (Llama 3 8B's largest matrix would make a 235 MiB one, in the memory gradient release exists to save)."""
    rows, cols = g.shape
    row_mean = torch.empty(rows, dtype=torch.float32, device=g.device)
    col_sum = torch.zeros(cols, dtype=torch.float32, device=g.device)
    chunk = _CPU_CHUNK if g.device.type == "cpu" else _CHUNK
    step = max(1, chunk // max(cols, 1))
    for a in range(0, rows, step):
        g2 = g[a : a + step].float().square()  # not in place: an fp32 gradient is the gradient itself
        row_mean[a : a + step] = g2.mean(dim=1)
        col_sum += g2.sum(dim=0)
    return row_mean, col_sum


def _sharded_on(p: torch.Tensor, dim: int) -> bool:
    return is_dtensor(p) and any(split_dim(pl) == dim for pl in p.placements)


def _sum_over_shards(sums: torch.Tensor, p: torch.Tensor, dim: int) -> None:
    """All-reduce this rank's sums over the ranks that hold p's other parts along dimension `dim` (rows: 0, columns:
    1; none for a plain tensor)."""
    if not is_dtensor(p):
        return
    for mesh_dim, placement in enumerate(p.placements):
        if split_dim(placement) == dim:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=p.device_mesh.get_group(mesh_dim))
