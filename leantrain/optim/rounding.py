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

Random bits come in 16-bit *fields*: int16 tensors, uniform over [-2^15, 2^15), one per bf16
tensor the optimizer writes stochastically (weight or compensation buffer, exp_avg, exp_avg_sq),
drawn by `random_fields` from a *field generator* (`field_generator`):

* on CPU, numpy's PCG64DXSM bit generator. Why not torch's: torch's CPU generator is mt19937,
  serial, and `random_` keeps 31 bits of each 32-bit draw, so a field cost one draw per element;
  that made the random bits most of the step time of the stochastic recipes. PCG64DXSM's
  `random_raw` gives 64 bits (4 fields) per draw; switching took the `bf16-sr` optimizer step from
  2.14x torch's foreach AdamW to 1.4-1.6x (`benchmarks/optimizer_step.py`, BENCHMARKS.md).
* on accelerators, a torch.Generator of that device (Philox: counter-based, parallel).
A torch.Generator is accepted on CPU too (tests, `stochastic_round`).
"""

from __future__ import annotations

import numpy as np
import torch


def field_generator(seed: int, device) -> torch.Generator | np.random.BitGenerator:
    """A generator of random fields for `device`, seeded with `seed` (a non-negative int)."""
    if torch.device(device).type == "cpu":
        return np.random.PCG64DXSM(seed)
    return torch.Generator(device=device).manual_seed(seed)


def random_fields(numel: int, generators: list, device) -> list[torch.Tensor]:
    """One uniform 16-bit random field (int16, [-2^15, 2^15)) of `numel` elements per generator.

    A field has its own generator, so drawing a tensor chunk by chunk gives the same bits as
    drawing it whole (chunks of a multiple of 4 elements: a numpy draw is whole 64-bit words).
    """
    fields = []
    for gen in generators:
        if isinstance(gen, np.random.BitGenerator):
            words = gen.random_raw(-(-numel // 4))  # 4 fields per 64-bit word
            fields.append(torch.from_numpy(words).view(torch.int16)[:numel])
        else:
            r = torch.empty(numel, dtype=torch.int16, device=device)
            fields.append(r.random_(-(1 << 15), 1 << 15, generator=gen))
    return fields


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, rand16: torch.Tensor) -> torch.Tensor:
    """Write `x` (fp32, **clobbered**) into the bf16 tensor `out`, rounded stochastically.

    Unbiased for every finite value: E[out] == x. `rand16` holds uniform values in [-2^15, 2^15)
    (a field of `random_fields`); adding it and then 2^15 adds a uniform value in [0, 2^16).
    Four passes: add the random bits, add 2^15, shift the top 16 bits down, narrow them into `out`.
    NaN stays NaN for the canonical NaNs (0x7FC00000 / 0xFFC00000 and any NaN that came from
    bf16) that torch arithmetic produces and propagates; only a hand-made NaN whose payload
    fills bits 16-22, or lives only in bits 0-15, would come out as +-0 or +-inf. We do not
    pay two more passes per tensor (isnan + masked_fill: 2/3 of this function's time) for that.
    """
    bits = x.view(torch.int32)
    bits.add_(rand16.view(bits.shape)).add_(1 << 15)
    bits >>= 16  # arithmetic shift: the result is the bf16 bit pattern, in int16 range
    out.view(torch.int16).copy_(bits)
    return out


def round_to_bf16_(out: torch.Tensor, x: torch.Tensor, rand16: torch.Tensor | None) -> torch.Tensor:
    """Write fp32 `x` into `out`: stochastic when `rand16` is given (and out is bf16), else nearest.

    `x` may be clobbered. For an fp32 `out` this is a plain copy (nothing to round).
    """
    if rand16 is not None and out.dtype == torch.bfloat16:
        return stochastic_round_(out, x, rand16)
    if out is not x:
        out.copy_(x)
    return out


def stochastic_round(x: torch.Tensor, generator=None) -> torch.Tensor:
    """fp32 tensor -> new bf16 tensor, rounded stochastically (convenience for tests and users)."""
    x = x.detach().to(torch.float32, copy=True).contiguous()
    gen = generator if generator is not None else field_generator(0, x.device)
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

    `param_f32` (the old weight in fp32) and `delta` are clobbered (delta becomes the new comp).
    `comp` is written stochastically when `comp_rand16` is given: the buffer's own rounding
    error is then unbiased too. With nearest rounding (optimi's choice) that error is
    systematic - adding 1e-4 ten thousand times to 1.0 ends at 2.03 instead of 2.0.
    """
    y = delta.add_(comp)  # the bf16 buffer is upcast on the fly: no fp32 copy of it
    torch.add(param_f32, y, out=param)  # computed in fp32, rounded to nearest into the bf16 weight
    y.add_(param_f32.sub_(param))  # old - new is exact in fp32 (two nearby bf16 values)
    round_to_bf16_(comp, y, comp_rand16)
