"""Block-wise 8-bit Adam moments (Dettmers et al., "8-bit Optimizers via Block-wise Quantization").

A moment tensor is cut into blocks of `BLOCK` (256) consecutive elements. Each block stores its
absolute maximum as an fp32 `scale` and every element as a uint8 *code*: the index of the
nearest entry of a fixed 256-entry code map after dividing by the scale. The map is the
"dynamic" (tree) data type: a sign bit (signed map only), a run of zeros that acts as a
unary-coded decimal exponent 10^-k, an indicator bit, then linear fraction bits - so small
values keep relative precision (down to 1e-7 of the block max) while large ones get more
fraction bits. exp_avg uses the signed map, exp_avg_sq (never negative) the unsigned one.

Storage: 1 byte per element plus 4 bytes per 256 elements, about 1.016 B per moment element.
Tensors with fewer than `MIN_NUMEL` elements are not worth it (norms, biases) and keep bf16
moments. The optimizer dequantizes to fp32, updates, and requantizes, each code written one of two ways:

* nearest (torchao's and bitsandbytes' way, `moments_rounding="nearest"`): the nearest code. An EMA change
  smaller than half the gap between two codes (beta2 = 0.999 moves v by 0.1% a step; the map's codes are at
  least 1.4% apart) is rounded away at every step, so the stored average goes stale: measured, the second
  moment runs 3-4.5% low and Adam's steps 2-3.5% large (benchmarks/moment_bias.py);
* stochastic (the default wherever moments are rounded stochastically): the code just below or just above the
  value, the upper one with probability (value - lower) / (upper - lower), so the stored value equals the fp32
  result in expectation, with 16 random bits per element from the optimizer's random fields (randbits.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

BLOCK = 256
MIN_NUMEL = 4096


@functools.lru_cache(maxsize=2)
def dynamic_map(signed: bool) -> tuple[float, ...]:
    """The 256 sorted values of the dynamic code map, in [-1, 1] (signed) or [0, 1] (unsigned).

    Layout (bitsandbytes' `create_dynamic_map` without its zero padding, as torchao uses it):
    for exponent i = 0..6 the values 10^(i-6) * m, where m are the midpoints of a linear grid on
    [0.1, 1] with 2^i (signed) or 2^(i+1) (unsigned) cells; negated copies for the signed map;
    plus 0 and 1.
    """
    exponent_bits, total_bits = 7, 8
    values: list[float] = []
    for i in range(exponent_bits):
        cells = 2 ** (i + (0 if signed else 1))
        grid = torch.linspace(0.1, 1, cells + 1)
        mids = ((grid[:-1] + grid[1:]) / 2.0) * (10 ** (i - (exponent_bits - 1)))
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2**total_bits, len(values)
    return tuple(sorted(values))


class Tables(NamedTuple):
    """The look-up tables of one code map on one device (see `_tables`)."""

    qmap: torch.Tensor  # [codes] fp32: each code's value
    cell_nearest: torch.Tensor  # [65536] int32: the nearest code of each bf16 cell's smallest value
    next_boundary: torch.Tensor  # [codes] fp32: the decision boundary above each code (inf for the last)
    cell_floor: torch.Tensor  # [65536] int32: the code just below (or at) each bf16 cell's smallest value
    next_value: torch.Tensor  # [codes] fp32: the value of the code above (inf for the last)
    gap: torch.Tensor  # [codes] fp32: next_value - qmap (0 for the last)


_TABLES: dict = {}


def _tables(signed: bool, device: torch.device) -> Tables:
    """The code map's tables on `device`.

    Code search without a binary search: the top 16 bits of an fp32 value name its "bf16 cell" (the values
    that truncate to the same bf16). No cell holds more than one decision boundary or more than one code value
    (the map's relative spacing, >= 1.4%, is wider than a cell, 0.8%; tested), so
    * the nearest code of x is `cell_nearest[h] + (x >= next_boundary[cell_nearest[h]])`, exactly
      torch.bucketize(x, boundaries, right=True);
    * the code at or below x is `cell_floor[h] + (x >= next_value[cell_floor[h]])`,
    each at the cost of two table look-ups.

    Cached in a plain dict rather than functools.lru_cache: torch.compile traces through an lru_cache
    wrapper (and cannot trace the tables' construction), while it reads a dict entry as a constant.
    The optimizer builds the tables eagerly before a compiled step uses them.
    """
    key = (signed, torch.device(device))
    if key in _TABLES:
        return _TABLES[key]
    qmap64 = torch.tensor(dynamic_map(signed), dtype=torch.float64)
    qmap = qmap64.float()
    boundaries = (qmap64[1:] + qmap64[:-1]).float() / 2  # fp32, as torchao computes them
    patterns = torch.arange(1 << 16, dtype=torch.int32)
    lo = (patterns << 16).view(torch.float32)
    nxt = ((patterns + 1) << 16).view(torch.float32)  # same sign, magnitude one bf16 ulp larger
    cell_min = torch.minimum(lo, nxt)  # value order: for negative cells the larger magnitude
    cell_min = torch.where(torch.isnan(cell_min), torch.zeros_like(cell_min), cell_min)
    inf = torch.tensor([float("inf")])
    tables = Tables(
        qmap=qmap,
        cell_nearest=torch.bucketize(cell_min, boundaries, right=True).to(torch.int32),
        next_boundary=torch.cat([boundaries, inf]),
        cell_floor=(torch.bucketize(cell_min, qmap, right=True) - 1).clamp_(min=0).to(torch.int32),
        next_value=torch.cat([qmap[1:], inf]),
        gap=torch.cat([qmap[1:] - qmap[:-1], torch.zeros(1)]),
    )
    _TABLES[key] = Tables(*(t.to(device) for t in tables))
    return _TABLES[key]


def build_tables(device: torch.device) -> None:
    """Build (once) both code maps' tables on `device`, eagerly: see `_tables`."""
    for signed in (True, False):
        _tables(signed, device)


def zero_code(signed: bool) -> int:
    """The code whose value is 0.0 (initial state)."""
    return dynamic_map(signed).index(0.0)


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _per_block(x: torch.Tensor, values: torch.Tensor, op: str) -> torch.Tensor:
    """In place: multiply or divide each 256-block of flat `x` by its entry of `values`."""
    n = x.numel()
    full = n // BLOCK * BLOCK
    if full:
        getattr(x[:full].view(-1, BLOCK), op)(values[: full // BLOCK].view(-1, 1))
    if full < n:
        getattr(x[full:], op)(values[-1])
    return x


def _block_absmax(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    full = n // BLOCK * BLOCK
    amax = x[:full].view(-1, BLOCK).abs().amax(dim=1)
    if full < n:
        amax = torch.cat([amax, x[full:].abs().amax().view(1)])
    return amax


def quantize_(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, signed: bool,
              rand: torch.Tensor | None = None) -> None:
    """Quantize flat fp32 `x` into flat uint8 `codes` and per-block fp32 `scale` (in place).

    Without `rand`: round to the nearest code (ties up), like torchao's `quantize_8bit_with_qmap`. With `rand`
    (a random field: int32 uniform in [0, 2^16)): stochastically, to the code below or the code above, the upper
    one when `value - lower > u * (upper - lower)`, u = rand / 2^16, so that E[stored] = x (up to the 2^-16
    resolution of u and the fp32 rounding of the threshold). The block scale is the block's absmax, for stochastic
    signed codes divided by the map's smallest value's magnitude (see below).
    `x` is clobbered (it is divided by the block scales).
    """
    t = _tables(signed, x.device)
    amax = _block_absmax(x)
    if rand is not None and signed:
        # The signed map reaches +1 but only -0.99297 (torchao's and bitsandbytes' map): a block whose largest
        # magnitude is negative would store it 0.7% short, always, under either rounding. Stochastic codes are
        # unbiased only for values inside the map, so their blocks are scaled to [-0.99297, 0.99297] instead.
        # The map, and the meaning of a code, stay the same (checkpoints of either rounding read the same).
        amax = amax / -t.qmap[0]
    scale.copy_(amax)
    _per_block(x, amax.clamp(min=torch.finfo(torch.float32).tiny), "div_")
    cell = (x.view(torch.int32) >> 16).bitwise_and_(0xFFFF)
    if rand is None:
        code = t.cell_nearest.index_select(0, cell)
        up = x >= t.next_boundary.index_select(0, code)
    else:
        code = t.cell_floor.index_select(0, cell)
        code += (x >= t.next_value.index_select(0, code)).to(torch.int32)
        if not signed:
            # Zero excluded for the second moment (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"):
            # rounded down to 0, a small v makes Adam's step m / (sqrt(0) + eps) enormous. Measured
            # (benchmarks/moment_bias.py): with 0 allowed, 0.01% of v stored as 0 made steps up to 15% too large in
            # aggregate. A value below the smallest nonzero code is stored as that code (a bias upwards of less
            # than 3.3e-7 of its block's largest v).
            code.clamp_(min=1)
        threshold = rand.float().mul_(2.0**-16).mul_(t.gap.index_select(0, code)).add_(t.qmap.index_select(0, code))
        up = x > threshold
    # int32 + int32, narrowed by the copy (torch.compile makes slow code of add_ on a bool viewed as uint8)
    codes.copy_(code.add_(up.to(torch.int32)))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """Flat uint8 `codes` and per-block `scale` -> new flat fp32 tensor."""
    out = _tables(signed, codes.device).qmap.index_select(0, codes.to(torch.int32))
    return _per_block(out, scale, "mul_")


def boundaries(signed: bool) -> torch.Tensor:
    """The 255 decision boundaries between neighbouring codes (fp32), for tests."""
    return _tables(signed, torch.device("cpu")).next_boundary[:-1]
