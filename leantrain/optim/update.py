"""The AdamW update of one tensor (on CPU: one chunk of it), written once: run eagerly, or compiled into one kernel.

`adamw_update` is the whole step of one flat tensor: upcast, moments, denominator, weight, the random bits
(randbits.py), every rounding, the lost-update counts. The eager path (the default) calls it as it is; with
`compile=True` (the trainer's `compile.enable`) `compiled_update` calls it through torch.compile, which fuses it
into one loop whose temporaries, random bits included, never leave registers. The two give bitwise equal results
for every layout (`tests/test_optim.py::test_compiled_matches_eager_bitwise`), because
* the math uses only ops that round once, the same way in ATen and in inductor's code: +, -, *, /, sqrt
  (`_sqrt`), comparisons, integer ops. No lerp, addcmul or addcdiv: ATen's CPU kernels for those fuse a
  multiply-add (one rounding fewer) where inductor's code, built with -ffp-contract=off, rounds after each op;
* every scalar comes in as one fp32 tensor (`layout.StepScalars.as_tensor`), so both see the same fp32 values (and
  torch.compile does not recompile at every step, as it would for Python floats that change with lr);
* the random bits are computed from the element index (randbits.py), not drawn.
The cost: fp32 weights with fp32 state are no longer bitwise those of torch.optim.AdamW (whose lerp and addcmul
fuse), but within a few fp32 ulps (`tests/test_optim.py::test_fp32_matches_float64_reference_and_torch`).

Compiling (`compiled_update`), settings that matter (each found by measuring):
- `emulate_precision_casts=True`: by default inductor reads a value it has just stored as bf16 back at fp32
  precision within the fused kernel. That silently undoes Kahan's `new - old` (the buffer stayed near 0 and 7% of
  the updates were lost again when tried without it), and would break bitwise equality with eager.
- one graph per state layout (moment kind, Kahan, random fields, dtypes, lost-update meter) for every tensor size,
  two for quantized moments (the weight's update, then the moments' quantization; see `compiled_update`):
  the inputs come flat, or for int8 as [blocks, 256], with only their first dimension marked dynamic
  (`dynamic=True` makes the 256 symbolic too; the int8 kernel then loses its vectorized loops and runs 2.5x
  slower). `automatic_dynamic_shapes` is off for this function, as dynamo's automatic dynamism, shared by all graphs
  of one function, would otherwise make every dimension of the int8 graph dynamic once a 1-D layout has been seen.
  int8 tensors whose size is not a multiple of 256 run eagerly (the same results).
- `_vectorized_bitcasts`: see there.
"""

from __future__ import annotations

import contextlib

import torch

from . import quant, randbits
from .layout import StepScalars
from .rounding import kahan_write_, round_to_bf16_

_RECOMPILE_LIMIT = 64  # graphs per process: layouts x dtypes x meter on/off; dynamo's default is 8
_compiled: dict = {}  # function -> its compiled form


def adamw_update(p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate=None):
    """One AdamW step of one tensor, in place; the same ops eager and compiled.

    p, g: weight and gradient; m, v: the moments (int8/int4: codes, with their block scales m_scale, v_scale);
    comp: the Kahan buffer or None; keys: `randbits.StepKeys.tensor` (int32); fields: `ParamLayout.fields`; kind:
    `ParamLayout.moments`; scalars: `StepScalars.as_tensor(...)`. Returns, when `count`, the lost-update counts
    as a dict of 0-dim tensors (`count_lost`), else None.

    gate: None, or a 0-dim bool tensor deciding on the device whether the step is applied at all (gradient
    release, release.py, skips a parameter whose gradient is NaN/Inf without a host sync). False leaves weight,
    moments, scales and Kahan buffer bitwise as they were, and the counts 0, whatever the gradient holds; True is
    bitwise the ungated step.
    """
    rand = random_fields(p.numel(), keys, fields, p.device)
    mf, vf, counts = update_weight(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count, gate)
    moment_counts = store_moments(m, v, m_scale, v_scale, mf, vf, rand, fields, kind, count, gate)
    return {**counts, **moment_counts} if count else None


def random_fields(numel, keys, used, device) -> list:
    """The random fields of `numel` elements up to the largest field number in `used` (-1: none)."""
    return randbits.fields(numel, keys, 1 + max(used), device) if max(used) >= 0 else []


def update_weight(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count, gate=None):
    """The first half of `adamw_update`: the new moments in fp32 and the weight written (with its rounding);
    returns (exp_avg, exp_avg_sq, counts): the moments as new fp32 tensors (fp32 state: the state itself,
    updated in place, unless gated) and the weight's lost-update counts (a dict, empty unless `count`). rand:
    `random_fields`; gate: see `adamw_update`."""
    p, g, m, v, comp = (None if t is None else t.view(-1) for t in (p, g, m, v, comp))
    s = StepScalars(*scalars.unbind())
    w_field = fields[0]
    gf = g.float()  # read only: an fp32 gradient is used as it is
    storage = quant.STORAGES.get(kind)
    if storage is not None:
        mf = quant.dequantize(m, m_scale, True, storage.exp_avg)
        vf = quant.dequantize(v, v_scale, False, storage.exp_avg_sq)
    elif gate is None:
        mf, vf = m.float(), v.float()  # fp32 state: the state itself, updated in place
    else:  # written back by store_moments, gated
        mf, vf = m.to(torch.float32, copy=True), v.to(torch.float32, copy=True)
    # In-place ops on temporaries (the same values as out of place; eagerly, fewer allocations and passes)
    mf += (gf - mf).mul_(s.one_minus_beta1)
    vf.mul_(s.beta2).add_((gf * gf).mul_(s.one_minus_beta2))
    denom = _sqrt(vf).div_(s.bc2_sqrt).add_(s.eps)
    step = (mf * s.neg_step_size).div_(denom)
    pf = p.float()
    counts = {}
    if p.dtype == torch.float32:
        if gate is None:
            p.mul_(s.decay).add_(step)
        else:
            p.copy_(torch.where(gate, (pf * s.decay).add_(step), pf))
    elif comp is not None:
        delta = (pf * s.neg_lr_wd).add_(step)
        old, comp_old = (p.clone(), comp.clone()) if count or gate is not None else (None, None)
        nonzero = delta != 0 if count else None
        kahan_write_(p, comp, pf, delta, rand[w_field] if w_field >= 0 else None)
        if gate is not None:  # the outputs gated: a zero delta could still move a weight by its buffer's rounding
            p.copy_(torch.where(gate, p, old))
            comp.copy_(torch.where(gate, comp, comp_old))
        if count:
            lost = nonzero & (p == old)
            counts.update(updated=nonzero.count_nonzero(), lost=lost.count_nonzero(),
                          compensated=(lost & (comp != comp_old)).count_nonzero())
    else:
        old = p.clone() if count else None
        new = (pf * s.decay).add_(step)
        if gate is not None:  # the old weight is a bf16 value: either rounding writes it back unchanged
            new = torch.where(gate, new, pf)
        # Counted on bit patterns (integer differences: cheaper than float compares and bool sums). A weight whose
        # fp32 result equals its old value keeps its bits under either rounding, so the changed weights are a
        # subset of the updated ones and lost = updated - changed.
        updated = (new.view(torch.int32) - pf.view(torch.int32)).count_nonzero() if count else None
        round_to_bf16_(p, new, rand[w_field] if w_field >= 0 else None)
        if count:
            changed = (p.view(torch.int16) - old.view(torch.int16)).count_nonzero()
            counts.update(updated=updated, lost=updated - changed)
    return mf, vf, _gated(counts, gate)


def store_moments(m, v, m_scale, v_scale, mf, vf, rand, fields, kind, count, gate=None):
    """The second half of `adamw_update`: the new fp32 moments `mf`, `vf` written to the state (rounded to bf16,
    or quantized; both clobber mf and vf); returns the moments' lost-update counts (a dict, empty unless
    `count`). rand: `random_fields`; gate: see `adamw_update`."""
    m, v, mf, vf = (t.view(-1) for t in (m, v, mf, vf))
    _, m_field, v_field = fields
    storage = quant.STORAGES.get(kind)
    counting = count and kind != "float32"
    if counting:  # lost: the fp32 result moved, the stored bf16 bits or int8/int4 code did not
        old_m, old_v = m.clone(), v.clone()
        if storage is not None:
            m_updated = mf != quant.dequantize(m, m_scale, True, storage.exp_avg)
            v_updated = vf != quant.dequantize(v, v_scale, False, storage.exp_avg_sq)
        else:
            m_updated, v_updated = mf != m.float(), vf != v.float()
    if storage is not None:  # gated on the codes and scales: re-quantizing the old values could move a code
        quant.quantize_(m, m_scale, mf, True, rand[m_field] if m_field >= 0 else None, storage.exp_avg, gate)
        quant.quantize_(v, v_scale, vf, False, rand[v_field] if v_field >= 0 else None, storage.exp_avg_sq, gate)
    else:
        if gate is not None:  # the old values are bf16 (or fp32) ones: either rounding writes them back unchanged
            mf, vf = torch.where(gate, mf, m.float()), torch.where(gate, vf, v.float())
        round_to_bf16_(m, mf, rand[m_field] if m_field >= 0 else None)  # fp32 state: a copy
        round_to_bf16_(v, vf, rand[v_field] if v_field >= 0 else None)
    if not counting:
        return {}

    def same(new, old, fmt):  # fmt None: bf16 values
        return new == old if fmt is None else quant.unpack(new, fmt) == quant.unpack(old, fmt)

    m_fmt, v_fmt = storage or (None, None)
    return _gated(dict(exp_avg_updated=m_updated.count_nonzero(), exp_avg_sq_updated=v_updated.count_nonzero(),
                       exp_avg_lost=(m_updated & same(m, old_m, m_fmt)).count_nonzero(),
                       exp_avg_sq_lost=(v_updated & same(v, old_v, v_fmt)).count_nonzero()), gate)


def _gated(counts: dict, gate) -> dict:
    """Lost-update counts of a step that was not applied are 0 (nothing was updated)."""
    return counts if gate is None else {k: torch.where(gate, c, 0) for k, c in counts.items()}


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root, eager and compiled.

    ATen's eager fp32 sqrt on CPU is not correctly rounded (measured: 0.6% of random values one ulp off), while
    inductor's vector sqrt is. Its fp64 sqrt is, and a correctly rounded fp64 sqrt rounded to fp32 is the correctly
    rounded fp32 sqrt (53 >= 2 * 24 + 2 bits: double rounding is innocuous for sqrt), so eager CPU code takes
    that way, at two more passes over the chunk."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return x.sqrt()
    return x.double().sqrt_().float()


def supports(kind: str, numel: int) -> bool:
    """Whether `compiled_update` takes a flat tensor of `numel` elements with this moment kind."""
    return kind not in quant.STORAGES or numel % quant.STORAGES[kind].block == 0


def compiled_update(p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate=None):
    """`adamw_update` compiled (built on first use) on flat contiguous tensors; returns what it returns.

    bf16 and fp32 moments: one graph. Quantized moments: two, `update_weight`'s and `store_moments'`, with the new
    fp32 moments passed between them through memory. In one graph inductor splits the kernel at each block
    absmax and recomputes the moments' dequantization and EMA in every loop after it; two graphs measured faster
    (benchmarks/optimizer_step.py; the figures are in BENCHMARKS.md, not here, where they would age)."""
    storage = quant.STORAGES.get(kind)
    shape, n = ((-1, storage.block) if storage is not None else (-1,)), p.numel()

    def dyn(t, shape=shape):  # quantized: tensors as [blocks, 256] (int4: 128); dynamic in the first dimension only
        if t is not None:
            t = t.view(shape) if t.numel() == n else t
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    p, g, m, v, comp, m_scale, v_scale = map(dyn, (p, g, m, v, comp, m_scale, v_scale))
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, automatic_dynamic_shapes=False), \
            _vectorized_bitcasts():
        if storage is None:
            return _compile(adamw_update)(p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count,
                                          gate)
        mf, vf, counts = _compile(_weight_stage)(p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars,
                                                 count, gate)
        # each moment in its own format's blocks: a [blocks, 256] input viewed as 128-element blocks takes index
        # arithmetic modulo the dynamic size, which inductor's CPU code does not vectorize (measured several times slower)
        mf, vf = dyn(mf, (-1, storage.exp_avg.block)), dyn(vf, (-1, storage.exp_avg_sq.block))
        moment_counts = _compile(_moment_stage)(m, v, m_scale, v_scale, mf, vf, keys, fields, kind, count, gate)
    return {**counts, **moment_counts} if count else None


def _weight_stage(p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate):
    rand = random_fields(p.numel(), keys, fields[:1], p.device)
    return update_weight(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count, gate)


def _moment_stage(m, v, m_scale, v_scale, mf, vf, keys, fields, kind, count, gate):
    rand = random_fields(mf.numel(), keys, fields[1:], mf.device)
    return store_moments(m, v, m_scale, v_scale, mf, vf, rand, fields, kind, count, gate)


def _compile(fn):
    """torch.compile'd `fn`, built on first use."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, options={"emulate_precision_casts": True})
    return _compiled[fn]


@contextlib.contextmanager
def _vectorized_bitcasts():
    """While our kernels are generated: inductor's C++ backend writes fp32 <-> int32 bitcasts as vector casts.

    Stochastic rounding adds random bits to an fp32 value's bit pattern (`x.view(torch.int32)`) and reads the
    result back as fp32. torch 2.13's CPU code generator has no vectorized form of `view(dtype)`: inside a
    vectorized loop it spills each vector to an array, bit-casts it element by element and reloads it, which
    made the compiled `bf16-sr` step several times the compiled plain-bf16 step (benchmarks/optimizer_step.py,
    BENCHMARKS.md); with a vector cast
    (`at::vec::cast`, a register reinterpretation) the loop stays vectorized. Only fp32 <-> int32 is changed, and
    only while `compiled_update` runs (which is when dynamo and inductor generate its code); other code compiled
    in the process is untouched. If inductor's internals move, this does nothing and the kernel is just slower.
    On a GPU, Triton's bitcast is native and this is not involved.
    """
    try:
        from torch._inductor.codegen import cpp
        from torch._inductor.codegen.cpp_utils import DTYPE_TO_CPP
        from torch._inductor.virtualized import V
        original = cpp.CppVecOverrides.__dict__["to_dtype_bitcast"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def to_dtype_bitcast(x, dtype, src_dtype):
        if {dtype, src_dtype} != {torch.float32, torch.int32}:
            return original.__func__(x, dtype, src_dtype)
        dst, src = DTYPE_TO_CPP[dtype], DTYPE_TO_CPP[src_dtype]
        n_vec = V.kernel._get_num_vectors(src_dtype)
        if n_vec == 1:
            return f"at::vec::cast<{dst}, {src}>({x})"
        return (f"[&]() {{ at::vec::VectorizedN<{dst}, {n_vec}> r; for (int i = 0; i < {n_vec}; i++) "
                f"r[i] = at::vec::cast<{dst}, {src}>({x}[i]); return r; }}()")

    cpp.CppVecOverrides.to_dtype_bitcast = staticmethod(to_dtype_bitcast)
    try:
        yield
    finally:
        cpp.CppVecOverrides.to_dtype_bitcast = original
