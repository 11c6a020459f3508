"""Rounding an fp32 result to bfloat16: nearest, stochastic, and Kahan-compensated.

bf16 keeps the top 16 bits of an fp32 number. Nearest rounding (what `tensor.bfloat16()` does)
throws away any update smaller than half a bf16 ulp: with a weight of 1.0 (ulp 2^-7) every
update below 0.0039 is lost, every step, forever. Two fixes, both used by the optimizer:

* Stochastic rounding rounds up with probability (dropped low 16 bits) / 2^16, so the stored
  value equals the fp32 value *in expectation* and small updates survive on average. The trick:
  view the fp32 bits as int32, add 16 uniform random bits, clear the low 16 bits. A carry into
  bit 16 happens exactly with that probability; it works the same for negative numbers (the
  int32 pattern is sign + magnitude, so adding rounds the magnitude away from zero) and for
  +-inf (low bits are zero, nothing carries). See `stochastic_round_` for NaN.
* Kahan compensation keeps a bf16 buffer with the part of each update the weight could not
  take, and adds it back into the next update (see `kahan_write_`).

Random bits come in 16-bit *fields* (int32 tensors with values in [0, 2^16)), drawn by
`random_fields` from a torch.Generator: one `random_` call per bf16 tensor the optimizer writes
stochastically (weight or compensation buffer, exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import torch

_LOW16 = 0xFFFF
_HIGH16 = -65536  # 0xFFFF0000 as a signed int32


def random_fields(numel: int, generators: list[torch.Generator], device) -> list[torch.Tensor]:
    """One uniform 16-bit random field of `numel` elements from each generator.

    One `random_` call per field: an int32 draw gives 31 random bits, of which we keep the low 16
    (cheaper on CPU than a ranged draw or than cutting several fields out of one int64 draw).
    A field has its own generator so that drawing a tensor chunk by chunk gives the same bits
    as drawing it whole.
    """
    fields = []
    for gen in generators:
        r = torch.empty(numel, dtype=torch.int32, device=device).random_(generator=gen)
        fields.append(r.bitwise_and_(_LOW16))
    return fields


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, rand16: torch.Tensor) -> torch.Tensor:
    """Write `x` (fp32, **clobbered**) into the bf16 tensor `out`, rounded stochastically.

    Unbiased for every finite value: E[out] == x. `rand16` holds uniform values in [0, 2^16).
    Three passes: add the random bits, shift the top 16 bits down, narrow them into `out`.
    NaN stays NaN for the canonical NaNs (0x7FC00000 / 0xFFC00000 and any NaN that came from
    bf16) that torch arithmetic produces and propagates; only a hand-made NaN whose payload
    fills bits 16-22, or lives only in bits 0-15, would come out as +-0 or +-inf. We do not
    pay two more passes per tensor (isnan + masked_fill: 2/3 of this function's time) for that.
    """
    bits = x.view(torch.int32)
    bits.add_(rand16.view(bits.shape))
    bits >>= 16  # arithmetic shift: the result is the bf16 bit pattern, in int16 range
    out.view(torch.int16).copy_(bits)
    return out


def round_to_bf16_(out: torch.Tensor, x: torch.Tensor, rand16: torch.Tensor | None) -> torch.Tensor:
    """Write fp32 `x` into `out`: stochastic when `rand16` is given (and out is bf16), else nearest.

    `x` may be clobbered. For an fp32 `out` this is a plain copy (nothing to round).
    """
    if rand16 is not None and out.dtype == torch.bfloat16:
        return stochastic_round_(out, x, rand16)
    if out.data_ptr() != x.data_ptr():
        out.copy_(x)
    return out


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 tensor -> new bf16 tensor, rounded stochastically (convenience for tests and users)."""
    x = x.detach().to(torch.float32, copy=True).contiguous()
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    (r,) = random_fields(x.numel(), [gen], x.device)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    return stochastic_round_(out, x, r)


def kahan_write_(
    param: torch.Tensor,
    comp: torch.Tensor,
    param_f32: torch.Tensor,
    delta: torch.Tensor,
    comp_rand16: torch.Tensor | None,
) -> None:
    """Apply the fp32 update `delta` to the bf16 `param`, carrying what bf16 loses in `comp`.

    Kahan summation with a bf16 buffer (optimi's trick), done in fp32:

        y     = delta + comp              # this step's update plus what earlier steps lost
        param = bf16_nearest(param + y)    # what the weight can take
        comp  = y - (param_new - param)    # what it could not take, carried to the next step

    `param_f32` is the old weight in fp32; `delta` is clobbered (it becomes the new comp).
    `comp` is written stochastically when `comp_rand16` is given: the buffer's own rounding
    error is then unbiased too. With nearest rounding (optimi's choice) that error is
    systematic - adding 1e-4 ten thousand times to 1.0 ends at 2.03 instead of 2.0.
    """
    y = delta.add_(comp.float())
    param.copy_(param_f32 + y)
    y.sub_(param.float().sub_(param_f32))  # new - old is exact in fp32 (two nearby bf16 values)
    round_to_bf16_(comp, y, comp_rand16)
