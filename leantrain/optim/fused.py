"""The AdamW step of one tensor as one torch.compile'd kernel (`AdamW(compile=True)`, `compile.enable`).

Eager, each AdamW step is a chain of whole-tensor passes: upcast, moment updates, denominator,
weight update, then 3-4 integer passes per stochastic rounding and six table gathers per int8 element.
torch.compile (inductor) fuses the chain into one loop over the tensor, whose temporaries never leave
registers. Measured per step in `benchmarks/optimizer_step.py`.

This is the same math as `adamw._update`, written a second time because that function cannot be
compiled as it is: it mirrors torch.optim.AdamW op for op (`addcdiv_`, `lerp_`, `_foreach_*` with
Python-float scalars, so fp32 parameters match torch bitwise), and dynamo specializes the float
scalars of exactly those ops - a recompile at every step, since lr, the bias corrections and the
step size change every step. Here all scalars come in as one fp32 tensor (`layout.StepScalars`: the
same fp32 values the eager ops use) and the ops are out of place. The rounding and int8 code
(rounding.py, quant.py) is shared. The results agree with the eager path's to the last bit of the fp32
arithmetic before each rounding, so a stored bf16 value rarely differs, and then by one ulp: not bitwise equal
(`tests/test_optim.py::test_compiled_matches_eager` holds every layout to at most 1% of elements
differing after 3 steps, by at most one bf16 ulp, a few fp32 ulps for fp32 weights).

Settings that matter (each found by measuring):
- `emulate_precision_casts=True`: by default inductor reads a value it has just stored as bf16
  back at fp32 precision within the fused kernel. That silently undoes Kahan's `new - old` (the
  buffer stayed near 0 and 7% of the updates were lost again when tried without it).
- one graph per state layout (moment kind, Kahan, random fields, dtypes, lost-update meter) for every
  tensor size: the inputs come flat, or for int8 as [blocks, 256], with only their first dimension
  marked dynamic. (`dynamic=True` makes the 256 symbolic too; the int8 kernel then loses its
  vectorized loops and runs 2.5x slower.) `automatic_dynamic_shapes` is off for this function, as
  dynamo's automatic dynamism, shared by all graphs of one function, would otherwise make every
  dimension of the int8 graph dynamic once a 1-D layout has been seen (the int8 step then took
  3x as long in benchmarks/optimizer_step.py).
  int8 tensors whose size is not a multiple of 256 stay eager.

Why the eager path does not run this function too (tried; CPU, 2 threads, benchmarks/optimizer_step.py's
model, eager steps interleaved): run eagerly, it is bitwise equal to `adamw._update` in every layout (for
fp32, to torch.optim.AdamW) once v's update is written `torch.addcmul(v * beta2, g * (1 - beta2), g)`: the
eager `addcmul_` adds `(value * g) * g` with a fused multiply-add, one rounding fewer than
`v * beta2 + (1 - beta2) * g * g` (which changed 5.7% of the elements of a random v in one step). But the eager step
then took 1.1x (bf16 with the lost-update count) to 1.85x (fp32) as long as with `_update`'s in-place ops on
the same chunks; written in place with the scalars still in one tensor, 1.0x to 1.2x (the `g * (1 - beta2)`
and `m * -step_size` temporaries that `value=` folds into `addcmul_` / `addcdiv_`). And a per-tensor function
has no foreach form for the accelerator path. So the math is written twice, and the tests hold the two
together.
"""

from __future__ import annotations

import torch

from . import quant
from .layout import StepScalars
from .rounding import kahan_write_, round_to_bf16_

_RECOMPILE_LIMIT = 64  # graphs per process: layouts x dtypes x meter on/off; dynamo's default is 8
_compiled = None


def supports(kind: str, numel: int) -> bool:
    """Whether `step` takes a flat tensor of `numel` elements with this moment kind."""
    return kind != "int8" or numel % quant.BLOCK == 0


def step(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count):
    """`fused_step` compiled (built on first use) on flat contiguous tensors; returns what it returns."""
    global _compiled
    if _compiled is None:
        # assert_indirect_indexing off: the int8 look-ups index a 256-entry table with uint8 codes and a
        # 65536-entry one with 16-bit cells, in range by construction; the per-element checks cost ~10%.
        _compiled = torch.compile(fused_step, fullgraph=True,
                                  options={"emulate_precision_casts": True, "assert_indirect_indexing": False})
    if kind == "int8":
        quant.build_tables(p.device)  # eagerly: the compiled kernel reads them as constants
    shape, n = ((-1, quant.BLOCK) if kind == "int8" else (-1,)), p.numel()

    def dyn(t):  # int8 tensors as [blocks, 256]; every size dynamic in its first dimension only
        if t is not None:
            t = t.view(shape) if t.numel() == n else t
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    p, g, m, v, comp, m_scale, v_scale = map(dyn, (p, g, m, v, comp, m_scale, v_scale))
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, automatic_dynamic_shapes=False):
        return _compiled(p, g, m, v, comp, m_scale, v_scale, [dyn(r) for r in rand], fields, kind, scalars, count)


def fused_step(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count):
    """One AdamW step of one tensor, in place.

    p, g: weight and gradient; m, v: the moments (int8: codes, with their block scales m_scale, v_scale);
    comp: the Kahan buffer or None; rand: the tensor's random fields; fields: `ParamLayout.fields`;
    kind: `ParamLayout.moments`; scalars: `StepScalars.as_tensor(...)`. Returns, when `count`, the
    lost-update counts (updated, lost, compensated or None) as 0-dim tensors, else None.
    """
    p, g, m, v, comp = (None if t is None else t.view(-1) for t in (p, g, m, v, comp))
    rand = [r.view(-1) for r in rand]
    s = StepScalars(*scalars.unbind())
    w_field, m_field, v_field = fields
    gf = g.float()
    if kind == "int8":
        mf, vf = quant.dequantize(m, m_scale, True), quant.dequantize(v, v_scale, False)
    else:
        mf, vf = m.float(), v.float()
    # the eager ops' formulas: lerp, mul + addcmul, sqrt / bc2 + eps, then mul + addcdiv ((value * a) / b)
    mf = torch.lerp(mf, gf, s.one_minus_beta1)
    vf = vf * s.beta2 + s.one_minus_beta2 * gf * gf
    denom = vf.sqrt() / s.bc2_sqrt + s.eps
    step = s.neg_step_size * mf / denom
    pf = p.float()
    counts = None
    if p.dtype == torch.float32:
        p.copy_(pf * s.decay + step)
    elif comp is not None:
        delta = pf * s.neg_lr_wd + step
        old, comp_old = (p.clone(), comp.clone()) if count else (None, None)
        nonzero = delta != 0 if count else None
        kahan_write_(p, comp, pf, delta, rand[w_field] if w_field >= 0 else None)
        if count:
            lost = nonzero & (p == old)
            counts = (nonzero.count_nonzero(), lost.count_nonzero(), (lost & (comp != comp_old)).count_nonzero())
    else:
        old = p.clone() if count else None
        new = pf * s.decay + step
        # counted on bit patterns, as in adamw._update
        updated = (new.view(torch.int32) - pf.view(torch.int32)).count_nonzero() if count else None
        round_to_bf16_(p, new, rand[w_field] if w_field >= 0 else None)
        if count:
            changed = (p.view(torch.int16) - old.view(torch.int16)).count_nonzero()
            counts = (updated, updated - changed, None)
    if kind == "int8":
        quant.quantize_(m, m_scale, mf, True)
        quant.quantize_(v, v_scale, vf, False)
    else:
        round_to_bf16_(m, mf, rand[m_field] if m_field >= 0 else None)  # fp32 state: a copy
        round_to_bf16_(v, vf, rand[v_field] if v_field >= 0 else None)
    return counts
