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
moments. The optimizer dequantizes to fp32, updates, and requantizes (round to nearest code).
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=8)
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    qmap = torch.tensor(dynamic_map(signed), dtype=torch.float32, device=device)
    midpoints = (qmap[1:] + qmap[:-1]) / 2  # decision boundaries between neighbouring codes
    return qmap, midpoints


def zero_code(signed: bool) -> int:
    """The code whose value is 0.0 (initial state)."""
    return dynamic_map(signed).index(0.0)


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _block_absmax(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    full = n // BLOCK * BLOCK
    amax = x[:full].view(-1, BLOCK).abs().amax(dim=1)
    if full < n:
        amax = torch.cat([amax, x[full:].abs().amax().view(1)])
    return amax


def _per_element(scale: torch.Tensor, n: int) -> torch.Tensor:
    """Broadcast one value per block to one value per element (a view where possible)."""
    full = n // BLOCK
    if full * BLOCK == n:
        return scale.view(-1, 1).expand(-1, BLOCK).reshape(n)
    return scale.repeat_interleave(BLOCK)[:n]


def quantize_(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, signed: bool) -> None:
    """Quantize flat fp32 `x` into flat uint8 `codes` and per-block fp32 `scale` (in place).

    `x` is clobbered (it is divided by the block scales).
    """
    n = x.numel()
    _, midpoints = _tables(signed, x.device)
    amax = _block_absmax(x)
    scale.copy_(amax)
    x.div_(_per_element(amax.clamp(min=torch.finfo(torch.float32).tiny), n))
    codes.copy_(torch.bucketize(x, midpoints, right=True))  # index of the nearest map value


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """Flat uint8 `codes` and per-block `scale` -> new flat fp32 tensor."""
    qmap, _ = _tables(signed, codes.device)
    out = qmap[codes.int()]
    return out.mul_(_per_element(scale, codes.numel()))
