"""The element-wise update of one tensor (on CPU: one chunk of it), written once: run eagerly, or compiled into one
kernel.

`elementwise_update` is the whole step of one flat tensor: upcast, moments, denominator, weight, the random bits
(randbits.py), every rounding (through the stored formats' codecs, codecs.py), the lost-update counts. It is
AdamW's update, and every rule's element-wise part: a factored v is read from its factors, a rule without m
steps with the gradient (rules.py). The eager path (the default) calls it as it is; with
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

from . import codecs, quant, randbits
from .layout import StepScalars

_RECOMPILE_LIMIT = 64  # graphs per process: layouts x dtypes x meter on/off; dynamo's default is 8
_compiled: dict = {}  # function -> its compiled form


def elementwise_update(
    p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate=None, factored=False, strided=None
):
    """One AdamW step of one tensor, in place; the same ops eager and compiled.

    p, g: weight and gradient; m, v: the moments (int8/int4: codes, with their block scales m_scale, v_scale);
    comp: the Kahan buffer or None; keys: `randbits.StepKeys.tensor` (int32); fields: `ParamLayout.fields`; kind:
    `ParamLayout.moments`; scalars: `StepScalars.as_tensor(...)`. Returns, when `count`, the lost-update counts
    as a dict of 0-dim tensors (`count_lost`), else None.

    gate: None, or a 0-dim bool tensor deciding on the device whether the step is applied at all (gradient
    release, release.py, skips a parameter whose gradient is NaN/Inf without a host sync). False leaves weight,
    moments, scales and Kahan buffer bitwise as they were, and the counts 0, whatever the gradient holds; True is
    bitwise the ungated step.

    factored: v comes from its factors (`update_weight`), and only m is stored here.
    """
    rand = random_fields(p.numel(), keys, fields, p.device, strided)
    mf, vf, counts = update_weight(
        p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count, gate, factored
    )
    moment_counts = store_moments(m, v, m_scale, v_scale, mf, vf, rand, fields, kind, count, gate, factored)
    return {**counts, **moment_counts} if count else None


def random_fields(numel, keys, used, device, strided=None) -> list:
    """The random fields of `numel` elements up to the largest field number in `used` (-1: none); `strided`: a column
    shard's row widths (randbits.fields)."""
    return randbits.fields(numel, keys, 1 + max(used), device, strided) if max(used) >= 0 else []


def update_weight(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count, gate=None, factored=False):
    """The first half of `elementwise_update`: the new moments in fp32 and the weight written (through its codec,
    codecs.py); returns (exp_avg, exp_avg_sq, counts): the moments as new fp32 tensors (fp32 state: the state
    itself, updated in place, unless gated) and the weight's lost-update counts (a dict, empty unless `count`).
    rand: `random_fields`; gate: see `elementwise_update`.

    factored: v is not stored per element but read from its factors (factored.py): `v` holds this chunk's rows of
    the EMA of g²'s row means, `v_scale` the EMA of its column means divided by their mean, both already updated
    with this step's gradient; their outer product is Adafactor's estimate of v, bias-corrected as Adam's v."""
    p, g, m, v, comp = (None if t is None else t.view(-1) for t in (p, g, m, v, comp))
    s = StepScalars(*scalars.unbind())
    gf = g.float()  # read only: an fp32 gradient is used as it is
    copy = gate is not None  # fp32 state is then written back by store_moments, gated
    # In-place ops on temporaries (the same values as out of place; eagerly, fewer allocations and passes)
    if m is None:  # a rule without a first moment: the step takes the gradient (its beta1 is 0)
        mf = gf
    else:
        mf = codecs.moment_codecs(kind)[0].load(m, m_scale, copy)
        mf += (gf - mf).mul_(s.one_minus_beta1)
    vf = second_moment(gf, v, v_scale, kind, s, factored, copy)
    step = (mf * s.neg_step_size).div_(denominator(vf, s))
    w_field = fields[0]
    counts = codecs.weight_codec(p.dtype, comp is not None).write_(
        p, comp, p.float(), step, s, rand[w_field] if w_field >= 0 else None, gate, count
    )
    return mf, vf, _gated(counts, gate)


def second_moment(gf, v, v_scale, kind, s: StepScalars, factored: bool, copy: bool) -> torch.Tensor:
    """This step's v in fp32 (flat): the stored v's EMA with the gradient `gf` (`copy`: even an fp32 v comes as a
    new tensor), or for a factored v the outer product of its factors (already updated: `update_weight`)."""
    if factored:
        return (v.view(-1, 1) * v_scale.view(1, -1)).view(-1)
    vf = codecs.moment_codecs(kind)[1].load(v, v_scale, copy)
    return vf.mul_(s.beta2).add_((gf * gf).mul_(s.one_minus_beta2))


def denominator(vf: torch.Tensor, s: StepScalars) -> torch.Tensor:
    """sqrt(v_hat) + eps, Adam's (and every rule's) divisor, from this step's v."""
    return _sqrt(vf).div_(s.bc2_sqrt).add_(s.eps)


def store_moments(m, v, m_scale, v_scale, mf, vf, rand, fields, kind, count, gate=None, factored=False):
    """The second half of `elementwise_update`: the new fp32 moments `mf`, `vf` written to the state through their
    codecs (both clobbered; factored: v's factors were written before the update, `vf` is dropped); returns the moments'
    lost-update counts (a dict, empty unless `count`). rand: `random_fields`; gate: see `elementwise_update`."""
    m_codec, v_codec = codecs.moment_codecs(kind)
    moments = [] if m is None else [("exp_avg", m_codec, m.view(-1), m_scale, mf.view(-1), fields[1])]
    if not factored:
        moments.append(("exp_avg_sq", v_codec, v.view(-1), v_scale, vf.view(-1), fields[2]))
    counting = count and kind != "float32"
    # lost: the fp32 result moved, the stored bf16 bits or int8/int4 code did not
    old = (
        [(stored.clone(), x != codec.load(stored, scale, False)) for _, codec, stored, scale, x, _ in moments]
        if counting
        else []
    )
    for _, codec, stored, scale, x, field in moments:
        codec.store_(stored, scale, x, rand[field] if field >= 0 else None, gate)
    counts = {}
    for (name, codec, stored, *_), (before, updated) in zip(moments, old):
        counts[f"{name}_updated"] = updated.count_nonzero()
        counts[f"{name}_lost"] = (updated & codec.same(stored, before)).count_nonzero()
    return _gated(counts, gate)


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


def compiled_update(
    p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate=None, factored=False, strided=None
):
    """`elementwise_update` compiled (built on first use) on flat contiguous tensors; returns what it returns.

    bf16 and fp32 moments: one graph. Quantized moments: two, `update_weight`'s and `store_moments'`, with the new
    fp32 moments passed between them through memory. In one graph inductor splits the kernel at each block
    absmax and recomputes the moments' dequantization and EMA in every loop after it; two graphs measured faster
    (benchmarks/optimizer_step.py; the figures are in BENCHMARKS.md, not here, where they would age)."""
    storage = quant.STORAGES.get(kind)
    shape, n = ((-1, storage.block) if storage is not None else (-1,)), p.numel()

    def dyn(t, shape=shape):  # quantized: tensors as [blocks, 256] (int4: 128); dynamic in the first dimension only
        if t is not None and not (factored and t is v_scale):  # factored: the columns' factor, a graph per width
            t = t.view(shape) if t.numel() == n else t
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    p, g, m, v, comp, m_scale, v_scale = map(dyn, (p, g, m, v, comp, m_scale, v_scale))
    with (
        torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, automatic_dynamic_shapes=False),
        _vectorized_bitcasts(),
    ):
        if storage is None:
            return _compile(elementwise_update)(
                p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate, factored, strided
            )
        mf, vf, counts = _compile(_weight_stage)(
            p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate, factored, strided
        )
        # each moment in its own format's blocks: a [blocks, 256] input viewed as 128-element blocks takes index
        # arithmetic modulo the dynamic size, which inductor's CPU code does not vectorize (measured several times
        # slower)
        if m is None and factored:  # nothing stored per element
            return counts if count else None
        mf = None if m is None else dyn(mf, (-1, storage.exp_avg.block))
        vf = None if factored else dyn(vf, (-1, storage.exp_avg_sq.block))
        moment_counts = _compile(_moment_stage)(
            m, v, m_scale, v_scale, mf, vf, keys, fields, kind, count, gate, factored, strided
        )
    return {**counts, **moment_counts} if count else None


def _weight_stage(p, g, m, v, comp, m_scale, v_scale, keys, fields, kind, scalars, count, gate, factored, strided):
    rand = random_fields(p.numel(), keys, fields[:1], p.device, strided)
    return update_weight(p, g, m, v, comp, m_scale, v_scale, rand, fields, kind, scalars, count, gate, factored)


def _moment_stage(m, v, m_scale, v_scale, mf, vf, keys, fields, kind, count, gate, factored, strided):
    moment = vf if mf is None else mf
    rand = random_fields(moment.numel(), keys, fields[1:], moment.device, strided)
    return store_moments(m, v, m_scale, v_scale, mf, vf, rand, fields, kind, count, gate, factored)


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
        return (
            f"[&]() {{ at::vec::VectorizedN<{dst}, {n_vec}> r; for (int i = 0; i < {n_vec}; i++) "
            f"r[i] = at::vec::cast<{dst}, {src}>({x}[i]); return r; }}()"
        )

    cpp.CppVecOverrides.to_dtype_bitcast = staticmethod(to_dtype_bitcast)
    try:
        yield
    finally:
        cpp.CppVecOverrides.to_dtype_bitcast = original
