"""Block-wise 8-bit and 4-bit Adam moments with companded codes (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization"; Li et al., "Memory Efficient Optimizers with 4-bit States", 2023; the companding functions of
FlashOptim, Gonzalez Ortiz et al. 2026).

A moment tensor is cut into blocks of consecutive elements (`Format.block`: 256 for int8, 128 for int4). Each block
stores its absolute maximum as an fp32 `scale`, and every element a *code* k: an index into a fixed sorted map of
values in [-1, 1] (signed) or [0, 1] (unsigned), times the scale. int8 codes are one uint8 each; int4 codes are
packed two to a uint8: byte j of a block holds element j in the low nibble and element j + 64 in the high one (a
tail block of t elements: j and j + t / 2).

The maps are companded: the codes are evenly spaced in phi(x), and a code's value is phi^-1(k / levels):
* exp_avg (signed): phi(x) = 2x / (1 + |x|), so k in -K..K (K = 127 int8, 7 int4) stands for k / (2K - |k|):
  twice the resolution near zero of a linear map, and both ends +-1 (stored as k + K);
* exp_avg_sq (unsigned): int8 phi(x) = sqrt(x), k in 0..255 stands for (k / 255)^2 (v is a squared gradient: its
  square root spans half the decades); int4 the linear map k / 15 (Li et al.'s second moment: at 4 bits the
  square-root map's widest gaps put Adam's steps further off than the linear map; benchmarks/moment_maps.py).
v's zero code is never written (a value below the first code is stored as that code): rounded down to 0, a small v
makes Adam's step m / (sqrt(0) + eps) enormous (measured with the earlier maps: a few v stored as 0 made the
steps far too large in aggregate). The initial state reads as 0 through its zero scale.

Why companded maps, not the "dynamic" tree map of bitsandbytes and torchao (which this module used before): chosen
by measurement (benchmarks/moment_bias.py, stochastic codes; the figures in BENCHMARKS.md): int8's Adam steps run
closer to the exact ones with these maps than with the dynamic ones; benchmarks/moment_maps.py replays the
candidates. A code is
found by arithmetic (phi, floor, one correction each way) rather than by table look-ups; measured, that did not
make the compiled CPU step faster (BENCHMARKS.md). Checkpoints written with the dynamic maps are refused on resume
(`CODES`, checked by the checkpoint module).

Storage: int8 1 byte per element plus 4 bytes per 256 elements (about 1.016 B per moment element); int4 half a
byte plus 4 bytes per 128 elements (about 0.53 B). Tensors with fewer than `MIN_NUMEL` elements are not worth it
(norms, biases) and keep bf16 moments, and so do int4 tensors whose last dimension is odd (the packed codes keep
the parameter's shape with the last dimension halved, so that they shard like it). The optimizer dequantizes to
fp32, updates, and requantizes, each code written one of two ways:

* nearest (`moments_rounding="nearest"`, the way of torchao's and bitsandbytes' 8-bit and 4-bit optimizers): the
  nearest code. An EMA change smaller than half the gap between two codes (beta2 = 0.999 moves v by 0.1% a step;
  int8's codes are 0.8% apart at best) is rounded away at every step, so the stored average goes stale (measured
  with the dynamic maps: v 3-4.5% low, Adam's steps 2-3.5% large);
* stochastic (the default wherever moments are rounded stochastically): the code just below or just above the
  value, the upper one with probability (value - lower) / (upper - lower), so the stored value equals the fp32
  result in expectation, with 16 random bits per element from the optimizer's random fields (randbits.py).

Every value and comparison is computed with the same fp32 operations eagerly and compiled (bitwise equal results).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 256  # int8's block (the CPU chunks of optimizer.py are multiples of every format's block)
MIN_NUMEL = 4096
# The codes' version, in every checkpoint's leantrain.json: "companded-1" paired neighbouring int4 codes in a byte,
# "companded-2" a block's halves (`_pack`); before both, the dynamic maps. Which versions each state_dtype reads:
CODES = "companded-2"
READS = {"int8": ("companded-1", "companded-2"), "int4": ("companded-2",), "int4-int8": ("companded-2",)}


class Format(NamedTuple):
    """A quantized moment storage: its code width, block size and the power of exp_avg_sq's map (state_dtype's
    name)."""

    name: str
    bits: int
    block: int
    v_power: int  # exp_avg_sq's code k stands for (k / levels) ** v_power

    def levels(self, signed: bool) -> int:
        """K: signed codes stand for k in -K..K, unsigned for k in 0..K."""
        return 2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1

    def map(self, signed: bool) -> tuple[float, ...]:
        """Every code's value, in code order (for tests and reports)."""
        lev = self.levels(signed)
        k = torch.arange(-lev if signed else 0, lev + 1, dtype=torch.float32)
        return tuple(_value(k, signed, self).tolist())

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def code_bytes(self, numel: int) -> int:
        """Storage of `numel` codes (int4: two per byte)."""
        return numel * self.bits // 8


FORMATS = {"int8": Format("int8", 8, 256, 2), "int4": Format("int4", 4, 128, 1)}
INT8 = FORMATS["int8"]


class Storage(NamedTuple):
    """A quantized state_dtype: the formats of its two moments."""

    exp_avg: Format
    exp_avg_sq: Format

    @property
    def packs(self) -> bool:
        """Whether some moment's codes are packed two to a byte (int4) along the parameter's last dimension."""
        return 4 in (self.exp_avg.bits, self.exp_avg_sq.bits)

    @property
    def block(self) -> int:
        """The larger block: chunks of the update are multiples of it (and so of both)."""
        return max(self.exp_avg.block, self.exp_avg_sq.block)


# state_dtype -> its moments' formats. "int4-int8": 4-bit exp_avg with 8-bit exp_avg_sq, because no 4-bit second
# moment keeps Adam's steps within 0.5% of the exact ones while 4-bit m does (benchmarks/moment_maps.py)
STORAGES = {
    "int8": Storage(INT8, INT8),
    "int4": Storage(FORMATS["int4"], FORMATS["int4"]),
    "int4-int8": Storage(FORMATS["int4"], INT8),
}


def _value(k: torch.Tensor, signed: bool, fmt: Format) -> torch.Tensor:
    """The map's value of (fp32, integer-valued) k: k / (2K - |k|) signed, (k / K) ** v_power unsigned (k ** v_power
    times the fp32 reciprocal of K ** v_power). Each one correctly rounded operation on exact integers, so eager and
    compiled agree to the bit."""
    lev = fmt.levels(signed)
    if signed:
        return k / (2 * lev - k.abs())
    return (k * k if fmt.v_power == 2 else k) * _reciprocal(lev**fmt.v_power)


def _reciprocal(n: int) -> float:
    """1 / n rounded to fp32 (a multiplication by it is the same fp32 operation eagerly and compiled)."""
    return torch.tensor(1.0 / n, dtype=torch.float32).item()


def _floor_k(y: torch.Tensor, signed: bool, fmt: Format) -> torch.Tensor:
    """The largest k below the top code with value(k) <= y, for y in the map's range (fp32 integer-valued).

    phi and its floor give k up to one code (phi's own rounding); one comparison each way makes it exact
    against the values `_value` computes."""
    lev = fmt.levels(signed)
    if signed:
        phi = (y * (2.0 * lev)) / (y.abs() + 1.0)
        lowest = -lev
    else:
        phi = (y.sqrt() if fmt.v_power == 2 else y) * float(lev)
        lowest = 0
    k = phi.floor().clamp_(lowest, lev - 1)
    k = torch.where(_value(k, signed, fmt) > y, (k - 1).clamp_(min=lowest), k)
    return torch.where(_value(k + 1, signed, fmt) <= y, (k + 1).clamp_(max=lev - 1), k)


def initial_code(signed: bool, fmt: Format = INT8) -> int:
    """The code of the initial state, 0.0 (v's 0.0 code, never written by a step, reads as 0 through its zero
    scale as well)."""
    return fmt.levels(True) if signed else 0


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


def _halves(t: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Flat `t` (an even number of elements) as [pairs, 2, half] views: each block of `block` elements (the tail:
    what is left) cut into its first and its second half."""
    n = t.numel()
    full = n // block * block
    parts = [t[:full].view(-1, 2, block // 2)] if full else []
    if full < n:
        parts.append(t[full:].view(1, 2, (n - full) // 2))
    return parts


def _pack(code: torch.Tensor, fmt: Format) -> torch.Tensor:
    """int32 codes -> what the uint8 code tensor holds. int4: byte j of a block holds element j (low nibble) and
    element j + block / 2 (high nibble). Pairing the halves of a block, not neighbours, keeps every load and store
    contiguous: interleaved nibbles made inductor's CPU code for them scalar strided loops (BENCHMARKS.md)."""
    if fmt.bits == 8:
        return code
    packed = [(h[:, 0] | (h[:, 1] << 4)).view(-1) for h in _halves(code, fmt.block)]
    return packed[0] if len(packed) == 1 else torch.cat(packed)


def unpack(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The uint8 code tensor -> one int32 code per element (the inverse of `_pack`)."""
    c = codes.to(torch.int32)
    if fmt.bits == 8:
        return c
    n = c.numel()
    full = n // (fmt.block // 2) * (fmt.block // 2)
    parts = [c[:full].view(-1, fmt.block // 2)] if full else []
    if full < n:
        parts.append(c[full:].view(1, -1))
    out = [torch.cat((p & 15, p >> 4), dim=1).view(-1) for p in parts]
    return out[0] if len(out) == 1 else torch.cat(out)


def quantize_(
    codes: torch.Tensor,
    scale: torch.Tensor,
    x: torch.Tensor,
    signed: bool,
    rand: torch.Tensor | None = None,
    fmt: Format = INT8,
    gate: torch.Tensor | None = None,
) -> None:
    """Quantize flat fp32 `x` into flat uint8 `codes` (int4: packed) and per-block fp32 `scale` (in place).

    Without `rand`: round to the nearest code (ties up). With `rand` (a random field: int32 uniform in [0, 2^16)):
    stochastically, to the code below or the code above, the upper one when `value - lower > u * (upper - lower)`,
    u = rand / 2^16, so that E[stored] = x (up to the 2^-16 resolution of u and the fp32 rounding of the
    threshold). The block scale is the block's absmax. `x` is clobbered (multiplied by the fp32 reciprocals of the
    block scales: one division per block instead of one per element; y may then exceed 1 by an ulp, which takes
    the top code). `gate` (a 0-dim bool tensor, or None): where False, codes and scale keep what they held.
    """
    amax = _block_absmax(x, fmt.block)
    scale.copy_(amax if gate is None else torch.where(gate, amax, scale))
    y = _per_block(x, amax.clamp(min=torch.finfo(torch.float32).tiny).reciprocal(), "mul_", fmt.block)
    k = _floor_k(y, signed, fmt)
    lower, upper = _value(k, signed, fmt), _value(k + 1, signed, fmt)
    if rand is None:
        up = y >= (lower + upper) * 0.5
    else:
        up = y > rand.float().mul_(2.0**-16).mul_(upper - lower).add_(lower)
    k = k + up.to(torch.float32)
    if not signed:
        k = k.clamp_(min=1.0)  # v's zero code is never written (module docstring)
    code = (k + fmt.levels(True)) if signed else k
    packed = _pack(code.to(torch.int32), fmt)
    codes.copy_(packed if gate is None else torch.where(gate, packed, codes))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool, fmt: Format = INT8) -> torch.Tensor:
    """Flat uint8 `codes` (int4: packed) and per-block `scale` -> new flat fp32 tensor."""
    k = unpack(codes, fmt).to(torch.float32)
    if signed:
        k = k - fmt.levels(True)
    return _per_block(_value(k, signed, fmt), scale, "mul_", fmt.block)
