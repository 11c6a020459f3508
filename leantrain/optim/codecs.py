"""Stored-tensor codecs: how each stored format of the optimizer's state is read as fp32 and written back.

A rule (rules.py) computes in fp32; what it reads and writes goes through one codec per stored tensor:

    moments   FloatMoment       fp32 (the state itself), or bf16 rounded to nearest or stochastically
              QuantizedMoment   int8 / int4 block codes with an fp32 scale per block (quant.py), nearest or stochastic
    weights   Float32Weight     takes the fp32 result exactly
              Bf16Weight        rounded to nearest (updates below half an ulp are lost) or stochastically
              KahanWeight       rounded to nearest, what it loses carried in a bf16 buffer (rounding.kahan_write_)

Every codec method works on flat views of one tensor (on CPU, one chunk of it) and is made of the ops of
rounding.py and quant.py only, so the update (update.py) gives the same bits eagerly and compiled. Whether a write
is stochastic is not the codec's choice but the caller's: a random field (`rand`) or None.

`gate`: None, or a 0-dim bool tensor; where False, a write leaves the stored bits as they were (gradient release's
skip of a NaN/Inf gradient, decided on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .rounding import kahan_write_, round_to_bf16_


# --------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class FloatMoment:
    """A moment stored as fp32 or bf16 values, one per element."""

    def load(self, stored: torch.Tensor, scale: None, copy: bool) -> torch.Tensor:
        """As fp32. An fp32 moment is the state itself unless `copy` (then the caller writes it back with `store_`)."""
        return stored.to(torch.float32, copy=True) if copy else stored.float()

    def store_(self, stored, scale, x, rand, gate=None) -> None:
        """Write fp32 `x` (clobbered). Gated with `where` on the fp32 values: an old bf16 (or fp32) value rounds back
        to itself under either rounding, so False writes the old bits."""
        if gate is not None:
            x = torch.where(gate, x, stored.float())
        round_to_bf16_(stored, x, rand)

    def same(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Per element: whether the stored value is unchanged (new and old: the stored tensors)."""
        return new == old


@dataclass(frozen=True)
class QuantizedMoment:
    """A moment stored as block codes (quant.py): `fmt` says int8 or int4, `signed` whether it is m (signed) or v."""

    fmt: quant.Format
    signed: bool

    def load(self, stored, scale, copy: bool = True) -> torch.Tensor:
        """As a new fp32 tensor."""
        return quant.dequantize(stored, scale, self.signed, self.fmt)

    def store_(self, stored, scale, x, rand, gate=None) -> None:
        """Quantize fp32 `x` (clobbered) into codes and scales; gated on the codes and scales themselves, because
        re-quantizing dequantized values could move a code."""
        quant.quantize_(stored, scale, x, self.signed, rand, self.fmt, gate)

    def same(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return quant.unpack(new, self.fmt) == quant.unpack(old, self.fmt)


FLOAT = FloatMoment()


def moment_codecs(kind: str) -> tuple[FloatMoment | QuantizedMoment, FloatMoment | QuantizedMoment]:
    """The codecs of (exp_avg, exp_avg_sq) for a layout's moments kind ('float32', 'bfloat16', 'int8', ...)."""
    return MOMENT_CODECS.get(kind, (FLOAT, FLOAT))


MOMENT_CODECS = {
    kind: (QuantizedMoment(s.exp_avg, True), QuantizedMoment(s.exp_avg_sq, False)) for kind, s in quant.STORAGES.items()
}


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Float32Weight:
    """An fp32 weight: w = w * (1 - lr * wd) + step, exactly in fp32."""

    def write_(self, p, comp, pf, step, s, rand, gate, count) -> dict:
        if gate is None:
            p.mul_(s.decay).add_(step)
        else:
            p.copy_(torch.where(gate, (pf * s.decay).add_(step), pf))
        return {}


@dataclass(frozen=True)
class Bf16Weight:
    """A bf16 weight, rounded to nearest (rand None) or stochastically. Counts (`count`): the elements whose fp32
    result moved ('updated') and those of them whose bf16 bits did not ('lost')."""

    def write_(self, p, comp, pf, step, s, rand, gate, count) -> dict:
        old = p.clone() if count else None
        new = (pf * s.decay).add_(step)
        if gate is not None:  # the old weight is a bf16 value: either rounding writes it back unchanged
            new = torch.where(gate, new, pf)
        # Counted on bit patterns (integer differences: cheaper than float compares and bool sums). A weight whose
        # fp32 result equals its old value keeps its bits under either rounding, so the changed weights are a
        # subset of the updated ones and lost = updated - changed.
        updated = (new.view(torch.int32) - pf.view(torch.int32)).count_nonzero() if count else None
        round_to_bf16_(p, new, rand)
        if not count:
            return {}
        changed = (p.view(torch.int16) - old.view(torch.int16)).count_nonzero()
        return dict(updated=updated, lost=updated - changed)


@dataclass(frozen=True)
class KahanWeight:
    """A bf16 weight rounded to nearest, with a bf16 buffer `comp` carrying what it loses (written with `rand`, or
    to nearest). Counts: as Bf16Weight's, plus 'compensated' (lost, but the buffer took it)."""

    def write_(self, p, comp, pf, step, s, rand, gate, count) -> dict:
        delta = (pf * s.neg_lr_wd).add_(step)
        old, comp_old = (p.clone(), comp.clone()) if count or gate is not None else (None, None)
        nonzero = delta != 0 if count else None
        kahan_write_(p, comp, pf, delta, rand)
        if gate is not None:  # the outputs gated: a zero delta could still move a weight by its buffer's rounding
            p.copy_(torch.where(gate, p, old))
            comp.copy_(torch.where(gate, comp, comp_old))
        if not count:
            return {}
        lost = nonzero & (p == old)
        return dict(
            updated=nonzero.count_nonzero(),
            lost=lost.count_nonzero(),
            compensated=(lost & (comp != comp_old)).count_nonzero(),
        )


def weight_codec(dtype: torch.dtype, kahan: bool) -> Float32Weight | Bf16Weight | KahanWeight:
    """The codec of a weight of `dtype` (a Kahan buffer only ever goes with a bf16 weight: layout.py)."""
    if dtype == torch.float32:
        return FLOAT32_WEIGHT
    return KAHAN_WEIGHT if kahan else BF16_WEIGHT


FLOAT32_WEIGHT, BF16_WEIGHT, KAHAN_WEIGHT = Float32Weight(), Bf16Weight(), KahanWeight()
