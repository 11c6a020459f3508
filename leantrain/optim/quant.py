"""Block-wise 8-bit and 4-bit Adam moments (Dettmers et al., "8-bit Optimizers via Block-wise Quantization";
Li et al., "Memory Efficient Optimizers with 4-bit States", 2023).

A moment tensor is cut into blocks of consecutive elements (`Format.block`: 256 for int8, 128 for int4). Each block
stores its absolute maximum as an fp32 `scale` and every element as a *code*: an index into a fixed sorted code
map, after dividing by the scale. int8 codes are one uint8 each; int4 codes are packed two to a uint8 (element 2i
in the low nibble, 2i + 1 in the high one).

The maps:
* int8, both moments: the "dynamic" (tree) data type (bitsandbytes', as torchao uses it): a sign bit (signed map
  only), a run of zeros that acts as a unary-coded decimal exponent 10^-k, an indicator bit, then linear fraction
  bits - so small values keep relative precision (down to 1e-7 of the block max) while large ones get more
  fraction bits. exp_avg uses the signed map, exp_avg_sq (never negative) the unsigned one.
* int4, exp_avg: the 4-bit dynamic map (3 exponent bits: torchao's AdamW4bit and Li et al.'s first moment).
  exp_avg_sq: the linear map without zero, (1..16)/16 (Li et al.'s second moment, torchao's AdamW4bit): zero
  would turn a small v into an enormous step m / (sqrt(0) + eps). Chosen by measurement
  (benchmarks/moment_bias.py, stochastic codes): the 4-bit dynamic unsigned map with zero excluded keeps v's
  aggregate within 1.4% (the linear map stores v 5-7% high: everything below 1/16 of the block max is stored as
  1/16), but its codes are up to 2.7x apart at the low end, and the noise of stochastic codes that far apart makes
  the Adam steps 18-21% too large on aggregate (E[1/sqrt(v)] > 1/sqrt(E[v])), against 5% with the linear map. Li et al. also normalize v by rank-1 (row and
  column maxima) rather than by blocks; that is not built here (block-wise scales, as for m).

Storage: int8 1 byte per element plus 4 bytes per 256 elements (about 1.016 B per moment element); int4 half a
byte plus 4 bytes per 128 elements (about 0.53 B). Tensors with fewer than `MIN_NUMEL` elements are not worth it
(norms, biases) and keep bf16 moments, and so do int4 tensors whose last dimension is odd (the packed codes keep
the parameter's shape with the last dimension halved, so that they shard like it). The optimizer dequantizes to
fp32, updates, and requantizes, each code written one of two ways:

* nearest (torchao's and bitsandbytes' way, `moments_rounding="nearest"`): the nearest code. An EMA change
  smaller than half the gap between two codes (beta2 = 0.999 moves v by 0.1% a step; the int8 map's codes are at
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

BLOCK = 256  # int8's block (the CPU chunks of adamw.py are multiples of every format's block)
MIN_NUMEL = 4096


@functools.lru_cache(maxsize=8)
def dynamic_map(signed: bool, exponent_bits: int = 7, total_bits: int = 8) -> tuple[float, ...]:
    """The 2^total_bits sorted values of the dynamic code map, in [-1, 1] (signed) or [0, 1] (unsigned).

    Layout (bitsandbytes' `create_dynamic_map` without its zero padding, as torchao uses it): for exponent
    i = 0..exponent_bits-1 the values 10^(i - exponent_bits + 1) * m, where m are the midpoints of a linear grid on
    [0.1, 1] with 2^(i + fraction bits) cells (one more fraction bit unsigned); negated copies for the signed
    map; plus 0 and 1 (and, where that leaves codes over, a last linear grid of the top exponent).
    """
    values: list[float] = []
    non_sign = total_bits - 1
    for i in range(exponent_bits):
        cells = 2 ** (i + non_sign - exponent_bits + (0 if signed else 1))
        grid = torch.linspace(0.1, 1, cells + 1)
        mids = ((grid[:-1] + grid[1:]) / 2.0) * (10 ** (i - (exponent_bits - 1)))
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2**total_bits, len(values)
    return tuple(sorted(values))


class Format(NamedTuple):
    """A quantized moment storage: its code width, block size and maps (state_dtype's name)."""

    name: str
    bits: int
    block: int
    signed_map: tuple[float, ...]
    unsigned_map: tuple[float, ...]

    def map(self, signed: bool) -> tuple[float, ...]:
        return self.signed_map if signed else self.unsigned_map

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def code_bytes(self, numel: int) -> int:
        """Storage of `numel` codes (int4: two per byte)."""
        return numel * self.bits // 8


FORMATS = {
    "int8": Format("int8", 8, 256, dynamic_map(True), dynamic_map(False)),
    "int4": Format("int4", 4, 128, dynamic_map(True, 3, 4), tuple(i / 16 for i in range(1, 17))),
}
INT8 = FORMATS["int8"]


class Tables(NamedTuple):
    """The look-up tables of one code map on one device (see `_tables`)."""

    qmap: torch.Tensor  # [codes] fp32: each code's value
    cell_nearest: torch.Tensor  # [65536] int32: the nearest code of each bf16 cell's smallest value
    next_boundary: torch.Tensor  # [codes] fp32: the decision boundary above each code (inf for the last)
    cell_floor: torch.Tensor  # [65536] int32: the code just below (or at) each bf16 cell's smallest value
    next_value: torch.Tensor  # [codes] fp32: the value of the code above (inf for the last)
    gap: torch.Tensor  # [codes] fp32: next_value - qmap (0 for the last)


_TABLES: dict = {}


def _tables(signed: bool, device: torch.device, fmt: Format = INT8) -> Tables:
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
    key = (fmt.name, signed, torch.device(device))
    if key in _TABLES:
        return _TABLES[key]
    qmap64 = torch.tensor(fmt.map(signed), dtype=torch.float64)
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


def build_tables(device: torch.device, fmt: Format = INT8) -> None:
    """Build (once) both code maps' tables on `device`, eagerly: see `_tables`."""
    for signed in (True, False):
        _tables(signed, device, fmt)


def initial_code(signed: bool, fmt: Format = INT8) -> int:
    """The code of the initial state: 0.0 where the map has it. (int4's v map has no zero: its initial codes
    read as 0 through their zero scale.)"""
    values = fmt.map(signed)
    return values.index(0.0) if 0.0 in values else 0


def num_blocks(numel: int, fmt: Format = INT8) -> int:
    return fmt.num_blocks(numel)


def _per_block(x: torch.Tensor, values: torch.Tensor, op: str, block: int) -> torch.Tensor:
    """In place: multiply or divide each block of flat `x` by its entry of `values`."""
    n = x.numel()
    full = n // block * block
    if full:
        getattr(x[:full].view(-1, block), op)(values[: full // block].view(-1, 1))
    if full < n:
        getattr(x[full:], op)(values[-1])
    return x


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.numel()
    full = n // block * block
    amax = x[:full].view(-1, block).abs().amax(dim=1)
    if full < n:
        amax = torch.cat([amax, x[full:].abs().amax().view(1)])
    return amax


def _pack(code: torch.Tensor, fmt: Format) -> torch.Tensor:
    """int32 codes -> what the uint8 code tensor holds (int4: element 2i in the low nibble, 2i + 1 in the high)."""
    if fmt.bits == 8:
        return code
    pairs = code.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The uint8 code tensor -> one int32 code per element."""
    c = codes.to(torch.int32)
    if fmt.bits == 8:
        return c
    return torch.stack((c & 15, c >> 4), dim=-1).view(-1)


def quantize_(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, signed: bool,
              rand: torch.Tensor | None = None, fmt: Format = INT8) -> None:
    """Quantize flat fp32 `x` into flat uint8 `codes` (int4: packed) and per-block fp32 `scale` (in place).

    Without `rand`: round to the nearest code (ties up), like torchao's `quantize_8bit_with_qmap`. With `rand`
    (a random field: int32 uniform in [0, 2^16)): stochastically, to the code below or the code above, the upper
    one when `value - lower > u * (upper - lower)`, u = rand / 2^16, so that E[stored] = x (up to the 2^-16
    resolution of u and the fp32 rounding of the threshold). The block scale is the block's absmax, for stochastic
    signed codes divided by the map's smallest value's magnitude (see below).
    `x` is clobbered (it is divided by the block scales).
    """
    t = _tables(signed, x.device, fmt)
    amax = _block_absmax(x, fmt.block)
    if rand is not None and signed:
        # The signed maps reach +1 but only -0.99297 (int8) or -0.8875 (int4) (torchao's and bitsandbytes' maps):
        # a block whose largest magnitude is negative would store it short, always, under either rounding.
        # Stochastic codes are unbiased only for values inside the map, so their blocks are scaled to
        # [qmap[0], -qmap[0]] instead. The map, and the meaning of a code, stay the same (checkpoints of either
        # rounding read the same).
        amax = amax / -t.qmap[0]
    scale.copy_(amax)
    _per_block(x, amax.clamp(min=torch.finfo(torch.float32).tiny), "div_", fmt.block)
    cell = (x.view(torch.int32) >> 16).bitwise_and_(0xFFFF)
    if rand is None:
        code = t.cell_nearest.index_select(0, cell)
        up = x >= t.next_boundary.index_select(0, code)
    else:
        code = t.cell_floor.index_select(0, cell)
        code += (x >= t.next_value.index_select(0, code)).to(torch.int32)
        if not signed and fmt.unsigned_map[0] == 0.0:
            # Zero excluded for the second moment (Li et al. 2023): rounded down to 0, a small v makes Adam's step
            # m / (sqrt(0) + eps) enormous. Measured (benchmarks/moment_bias.py, int8): with 0 allowed, 0.01% of v
            # stored as 0 made steps up to 15% too large in aggregate. A value below the smallest nonzero code is
            # stored as that code (a bias upwards of less than 3.3e-7 of its block's largest v). (int4's v map has
            # no zero: there the same happens below 1/16 of the block's largest v.)
            code.clamp_(min=1)
        threshold = rand.float().mul_(2.0**-16).mul_(t.gap.index_select(0, code)).add_(t.qmap.index_select(0, code))
        up = x > threshold
    # int32 + int32, narrowed by the copy (torch.compile makes slow code of add_ on a bool viewed as uint8)
    codes.copy_(_pack(code.add_(up.to(torch.int32)), fmt))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool, fmt: Format = INT8) -> torch.Tensor:
    """Flat uint8 `codes` (int4: packed) and per-block `scale` -> new flat fp32 tensor."""
    out = _tables(signed, codes.device, fmt).qmap.index_select(0, unpack(codes, fmt))
    return _per_block(out, scale, "mul_", fmt.block)


def boundaries(signed: bool, fmt: Format = INT8) -> torch.Tensor:
    """The decision boundaries between neighbouring codes (fp32), for tests."""
    return _tables(signed, torch.device("cpu"), fmt).next_boundary[:-1]
