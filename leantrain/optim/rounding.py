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

The random bits come from randbits.py: one *field* per bf16 tensor the optimizer writes stochastically (weight
or compensation buffer, exp_avg, exp_avg_sq), int32 values uniform in [0, 2^16), computed from the element index.
"""

from __future__ import annotations

import torch

from . import randbits


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    """Write fp32 `x` (**clobbered**) into the bf16 tensor `out`, rounded stochastically: E[out] == x for every
    finite x.

    `rand` holds uniform int32 values in [0, 2^16) (a random field). Adding them to the bit pattern and clearing
    the low 16 bits carries into bit 16 with probability (dropped bits) / 2^16; what is left is a bf16 value in
    fp32, which the copy into `out` converts exactly. NaN stays NaN for the canonical NaNs (0x7FC00000 /
    0xFFC00000 and any NaN that came from bf16) that torch arithmetic produces and propagates; only a hand-made NaN
    whose payload lives only in bits 0-15 would come out as +-inf. We do not pay two more passes per tensor
    (isnan + masked_fill) for that. The bitcasts are why the compiled kernel needs `update._vectorized_bitcasts`.
    """
    x.view(torch.int32).add_(rand).bitwise_and_(-65536)
    out.copy_(x)
    return out


def round_to_bf16_(out: torch.Tensor, x: torch.Tensor, rand: torch.Tensor | None) -> torch.Tensor:
    """Write fp32 `x` into `out`: stochastic when `rand` is given (and out is bf16), else nearest.

    `x` may be clobbered. For an fp32 `out` this is a plain copy (nothing to round).
    """
    if rand is not None and out.dtype == torch.bfloat16:
        return stochastic_round_(out, x, rand)
    if out is not x:
        out.copy_(x)
    return out


def stochastic_round(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """fp32 tensor -> new bf16 tensor, rounded stochastically with the bits of key `seed` (for tests and users)."""
    x = x.detach().to(torch.float32, copy=True).contiguous()
    keys = randbits.StepKeys(randbits.tensor_key(seed, 0), 1, 1).tensor(0, x.device)
    (r,) = randbits.fields(x.numel(), keys, 1, x.device)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    return stochastic_round_(out.view(-1), x.view(-1), r).view(x.shape)


def kahan_write_(
    param: torch.Tensor,
    comp: torch.Tensor,
    param_f32: torch.Tensor,
    delta: torch.Tensor,
    comp_rand: torch.Tensor | None,
) -> None:
    """Apply the fp32 update `delta` to the bf16 `param`, carrying what bf16 loses in `comp`.

    Kahan summation with a bf16 buffer (optimi's trick), done in fp32:

        y     = delta + comp              # this step's update plus what earlier steps lost
        param = bf16_nearest(param + y)    # what the weight can take
        comp  = y - (param_new - param)    # what it could not take, carried to the next step

    `param_f32` (the old weight in fp32) and `delta` are clobbered (delta becomes the new comp).
    `comp` is written stochastically when `comp_rand` is given: the buffer's own rounding
    error is then unbiased too. With nearest rounding (optimi's choice) that error is
    systematic - adding 1e-4 ten thousand times to 1.0 ends at 2.03 instead of 2.0.
    """
    y = delta.add_(comp)  # the bf16 buffer is upcast on the fly: no fp32 copy of it
    torch.add(param_f32, y, out=param)  # computed in fp32, rounded to nearest into the bf16 weight
    y.add_(param_f32.sub_(param))  # old - new is exact in fp32 (two nearby bf16 values)
    round_to_bf16_(comp, y, comp_rand)
