"""leantrain.optim: AdamW against a float64 reference, rounding, Kahan, int8, paths, state_dict."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from leantrain.optim import OPTIMIZERS, AdamW, ParamLayout, UpdateStats, build_optimizer, stochastic_round
from leantrain.optim import optimizer as optimizer_mod
from leantrain.optim import quant, randbits, update
from leantrain.optim.rounding import kahan_write_

BF16_ULP_1 = 2.0**-7  # bf16 spacing in [1, 2)

VARIANTS = (
    [
        dict(state_dtype=sd, compensation=c)
        for sd in ("auto", "float32", "bfloat16", "int8", "int4")
        for c in ("none", "stochastic", "kahan")
    ]
    + [
        dict(compensation="stochastic", moments_rounding="nearest"),
        dict(compensation="kahan", moments_rounding="nearest"),
        dict(compensation="none", moments_rounding="stochastic"),
        dict(state_dtype="int4-int8", compensation="stochastic"),
    ]
    + [  # FactoredAdamW: the 2-D parameters (a [1, 4096] row and a [70, 80] matrix whose rows cut int8 blocks) factored
        dict(rule="FactoredAdamW", state_dtype=sd, compensation=c)
        for sd, c in (("int8", "stochastic"), ("int4-int8", "stochastic"), ("auto", "none"), ("float32", "kahan"))
    ]
    + [dict(rule="Adafactor", state_dtype=sd, compensation=c) for sd, c in (("int8", "stochastic"), ("auto", "kahan"))]
)


def _ids(v):
    return "-".join(f"{k}={x}" for k, x in v.items())


# --------------------------------------------------------------------------- float64 reference


def reference_adamw(p0, grads, lr, betas, eps, wd):
    """torch.optim.AdamW's math in float64, one tensor, a list of gradients."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p.mul_(1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p -= lr * m_hat / (v_hat.sqrt() + eps)
    return p


HP = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, wd=0.1)


def _run(p0, grads, dtype=torch.float32, **kw):
    p = torch.nn.Parameter(p0.clone().to(dtype))
    opt = AdamW([p], lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=HP["wd"], **kw)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p, opt


def _problem(n=8192, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * (0.1 + i) for i in range(steps)]
    return p0, grads


def test_fp32_matches_float64_reference_and_torch():
    p0, grads = _problem()
    ref = reference_adamw(p0, grads, **HP)
    p, _ = _run(p0, grads)
    # 1e-6 relative, elementwise; plus 1e-7 absolute for elements that crossed zero (fp32
    # carries ~6e-8 relative error of the O(1) values they were computed from)
    assert torch.allclose(p.double(), ref, rtol=1e-6, atol=1e-7)
    q = torch.nn.Parameter(p0.clone())
    topt = torch.optim.AdamW([q], lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=HP["wd"], foreach=False)
    for g in grads:
        q.grad = g.clone()
        topt.step()
    # torch's lerp and addcmul fuse a multiply-add where update.py rounds after each op (update.py says why):
    # the same math up to the last bits of fp32
    assert torch.allclose(p, q, rtol=1e-6, atol=1e-7) and not torch.equal(p, q)


@pytest.mark.parametrize(
    "state_dtype, bound",
    [
        # bf16 keeps 8 significant bits: each stored moment is off by <= 2^-9 relative, so
        # m_hat / sqrt(v_hat) is off by <~ 2^-8 per step, far under 2% of lr per step.
        ("bfloat16", 0.02),
        # int8 dynamic map: an element at >= 1% of its block max is stored within ~5% (>= 8 codes
        # per decade there), smaller ones within the block max / 2e3; the Adam ratio then moves
        # by well under 25% of lr per step.
        ("int8", 0.25),
        # int4: 16 codes; an element is stored within half a code gap of its block max (int4's v: at least 1/16 of
        # it), so the ratio moves by up to about the lr per step
        ("int4", 1.0),
    ],
)
def test_low_precision_moments_stay_within_format_bound(state_dtype, bound):
    p0, grads = _problem()
    ref = reference_adamw(p0, grads, **HP)
    p, _ = _run(p0, grads, state_dtype=state_dtype)  # fp32 params isolate the moments' error
    err = (p.double() - ref).abs().max().item()
    assert err <= bound * HP["lr"] * len(grads)
    assert err > 0  # the moments really are stored in low precision


# --------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased():
    n = 200_000
    for value in (1.0 + 0.3 * BF16_ULP_1, -3.0 - 0.77 * 4 * BF16_ULP_1, 1e-3 * (1 + 2**-12)):
        x = torch.full((n,), value, dtype=torch.float32)
        out = stochastic_round(x, seed=1).double()
        lo = x.bfloat16().double()[0]
        levels = torch.unique(out)
        assert len(levels) == 2  # only the two neighbouring bf16 values
        ulp = (levels[1] - levels[0]).item()
        p = (value - levels[0].item()) / ulp
        sigma = ulp * math.sqrt(p * (1 - p) / n)
        assert abs(out.mean().item() - value) < 5 * sigma, (value, lo)


def test_small_update_moves_weight_in_expectation_only_with_stochastic_rounding():
    n = 100_000
    x = torch.full((n,), 1.0 + 1e-4)  # 1e-4 is 1/78 of the bf16 ulp at 1.0
    assert torch.all(x.bfloat16() == 1.0)  # nearest: the update is lost everywhere
    sr = stochastic_round(x, seed=0).double()
    sigma = BF16_ULP_1 * math.sqrt((1e-4 / BF16_ULP_1) / n)
    assert abs(sr.mean().item() - (1.0 + 1e-4)) < 5 * sigma
    assert sr.mean().item() > 1.0


def test_stochastic_rounding_edge_values():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -2.5, 3.3895313892515355e38])
    x = torch.cat([x, torch.zeros(2).div(0.0), torch.tensor([float("nan")]).bfloat16().float()])
    x = x.repeat(1000)  # many random draws for the NaNs (0/0 is x86's 0xFFC00000)
    out = stochastic_round(x, seed=0)
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    finite = ~torch.isnan(x)
    assert torch.equal(out[finite].float(), x[finite])  # exactly representable stays put
    assert torch.signbit(out[1])


# --------------------------------------------------------------------------- Kahan


def _kahan_sum(n_updates, stochastic_comp):
    p = torch.ones(64, dtype=torch.bfloat16)
    comp = torch.zeros(64, dtype=torch.bfloat16)
    for step in range(n_updates):
        keys = randbits.StepKeys(randbits.tensor_key(0, 0), step, 1).tensor(0, "cpu")
        r = randbits.fields(64, keys, 1, "cpu")[0] if stochastic_comp else None
        kahan_write_(p, comp, p.float(), torch.full((64,), 1e-4), r)
    return p.float(), comp.float()


def test_kahan_accumulates_tiny_updates():
    p, comp = _kahan_sum(10_000, stochastic_comp=True)
    assert (p - 2.0).abs().max() < 1e-3  # exact sum 1 + 10_000 * 1e-4
    assert (p + comp - 2.0).abs().max() < 3e-3
    plain = torch.ones(64, dtype=torch.bfloat16)
    for _ in range(100):
        plain.copy_(plain.float() + 1e-4)
    assert torch.all(plain == 1.0)  # nearest rounding loses every one of them


def test_kahan_with_nearest_buffer_is_biased():
    """optimi's variant (nearest-rounded bf16 buffer): the buffer's own rounding error is
    systematic, which is why moments_rounding='auto' writes the buffer stochastically."""
    p, comp = _kahan_sum(10_000, stochastic_comp=False)
    assert (p + comp - 2.0).abs().min() > 1e-2


@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
def test_optimizer_level_constant_tiny_steps(compensation):
    """Adam on a constant gradient steps by ~lr each step; lr = 1e-4 is under half a bf16 ulp."""
    steps, lr, n = 1000, 1e-4, 2048
    grads = [torch.full((n,), -1.0)] * steps
    ref = reference_adamw(torch.ones(n), grads, lr, (0.9, 0.999), 1e-8, 0.0)  # ~1.1
    out = {}
    for comp in ("none", compensation):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = AdamW([p], lr=lr, weight_decay=0.0, compensation=comp)
        for g in grads:
            p.grad = g.bfloat16()
            opt.step()
        total = p.float() + (opt.state[p]["kahan_comp"].float() if comp == "kahan" else 0)
        out[comp] = total.double()
    assert torch.all(out["none"] == 1.0)
    # Unbiased: the mean over elements matches within 5 standard errors. Each element wanders
    # (sd ~1e-3 here): the bf16 v is rounded stochastically and its EMA (beta2 = 0.999) keeps
    # that noise, a few % of v, so an element's steps are a little larger or smaller for a while.
    err = out[compensation] - ref
    assert abs(err.mean().item()) < 5 * err.std().item() / math.sqrt(n) + 1e-6
    assert err.abs().max() < (5e-3 if compensation == "kahan" else 0.2)
    assert err.std() < (2e-3 if compensation == "kahan" else 0.05)


def _toy(dtype, n=256, steps=4000, lr=1e-4, **kw):
    """Fit w to a target 0.05 away with Adam at lr 1e-4 after an early noisy phase.

    Weights sit in [0.1, 0.2) where half a bf16 ulp (4.9e-4) exceeds lr: nearest-rounded weights
    never move. The early gradient noise (decaying over ~200 steps) makes v large at first;
    v must then decay by ~0.1% per step, under half a bf16 ulp, so nearest-rounded moments keep
    v_hat large and the steps tiny. Only unbiased rounding of weights *and* moments fits."""
    gen = torch.Generator().manual_seed(0)
    w0 = 0.1 + 0.1 * torch.rand(n, generator=gen)
    target = w0 + 0.05 * torch.randn(n, generator=gen)
    w = torch.nn.Parameter(w0.to(dtype))
    opt = AdamW([w], lr=lr, weight_decay=0.0, **kw)
    for t in range(steps):
        noise = math.exp(-t / 200) * torch.randn(n, generator=gen)
        w.grad = (w.float() - target + noise).to(dtype)
        opt.step()
    return ((w.float() - target) ** 2).mean().item()


def test_low_lr_toy_needs_unbiased_weights_and_moments():
    fp32 = _toy(torch.float32)
    assert fp32 < 2e-5  # fits (start: 2.5e-3)
    assert _toy(torch.bfloat16) > 100 * fp32  # compensation none: stuck
    for comp in ("stochastic", "kahan"):
        assert _toy(torch.bfloat16, compensation=comp) < 1.5 * fp32, comp
        assert _toy(torch.bfloat16, compensation=comp, moments_rounding="nearest") > 10 * fp32, comp


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("signed", [True, False])
def test_nearest_codes_are_the_nearest(signed, fmt):
    """Nearest rounding writes the code whose value is nearest (v: never the zero code), within half the map's
    widest gap of the block max."""
    fmt = quant.FORMATS[fmt]
    gen = torch.Generator().manual_seed(0)
    n = 256 * 40 + 78
    x = torch.randn(n, generator=gen) * torch.logspace(-6, 2, n)
    if not signed:
        x = x.abs()
    codes = torch.empty(fmt.code_bytes(n), dtype=torch.uint8)
    scale = torch.empty(fmt.num_blocks(n))
    quant.quantize_(codes, scale, x.clone(), signed, None, fmt)
    deq = quant.dequantize(codes, scale, signed, fmt)
    qmap = torch.tensor(fmt.map(signed))
    allowed = qmap if signed else qmap[1:]
    per_el = scale.repeat_interleave(fmt.block)[:n]
    candidates = allowed.view(1, -1) * per_el.view(-1, 1)  # every writable code's value, per element
    best = (candidates - x.view(-1, 1)).abs().min(dim=1).values
    err = (deq - x).abs()
    assert torch.all(err <= best * (1 + 1e-5) + 1e-12 * per_el)
    gap = (qmap[1:] - qmap[:-1]).max().item()  # int8 0.0156 (signed), int4 0.25
    inside = x >= per_el * allowed[0] if not signed else torch.ones_like(x, dtype=torch.bool)
    assert torch.all(err[inside] <= per_el[inside] * gap / 2 * (1 + 1e-5))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_codes_are_unbiased_and_neighbours(signed, fmt):
    """Stochastic codes: every draw is the code at or below the value or the one above, and the mean over draws
    is the value (within 5 standard errors per element, each draw's spread at most half a code gap). Values inside
    the map's writable range (v: at or above its first nonzero code)."""
    fmt = quant.FORMATS[fmt]
    gen = torch.Generator().manual_seed(0)
    n, block = 256 * 16, fmt.block
    x = torch.randn(n, generator=gen) * torch.logspace(-4 if fmt.bits == 8 else -1, 0, n)
    qmap = torch.tensor(fmt.map(signed))
    if not signed:  # keep every value at or above v's first nonzero code
        block_max = x.abs().view(-1, block).amax(1, keepdim=True).expand(-1, block).reshape(-1)
        x = torch.maximum(x.abs(), block_max * qmap[1])
    scale = torch.empty(n // block)
    draws, codes = 400, torch.empty(fmt.code_bytes(n), dtype=torch.uint8)
    total = torch.zeros(n, dtype=torch.float64)
    for k in range(draws):
        keys = randbits.StepKeys(randbits.tensor_key(0, 0), k + 1, 1).tensor(0, "cpu")
        quant.quantize_(codes, scale, x.clone(), signed, randbits.fields(n, keys, 1, "cpu")[0], fmt)
        y = x / scale.repeat_interleave(block)
        floor = (torch.bucketize(y, qmap, right=True) - 1).clamp(min=0)
        got = quant.unpack(codes, fmt).long()
        assert torch.all((got == floor) | (got == floor + 1))
        total += quant.dequantize(codes, scale, signed, fmt).double()
    per_el = scale.repeat_interleave(block).double()
    gap = (qmap[1:] - qmap[:-1]).max().double()
    assert torch.all((total / draws - x.double()).abs() <= 5 * per_el * gap / 2 / draws**0.5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("signed", [True, False])
def test_floor_code_is_exact_at_every_code_and_its_neighbours(signed, fmt):
    """quant._floor_k (phi, floor, one correction each way) equals a search of the map, at every code value,
    every midpoint and their fp32 neighbours, where phi's own rounding would show."""
    fmt = quant.FORMATS[fmt]
    qmap = torch.tensor(fmt.map(signed))
    points = torch.cat([qmap, (qmap[1:] + qmap[:-1]) / 2])
    x = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))])
    x = x.clamp(-1 if signed else 0, 1)
    lowest = -fmt.levels(True) if signed else 0
    want = (torch.bucketize(x, qmap, right=True) - 1).clamp(max=len(qmap) - 2) + lowest
    assert torch.equal(quant._floor_k(x, signed, fmt).long(), want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_code_maps_are_evenly_spaced_in_their_companding_function(fmt):
    """m: phi(x) = 2x / (1 + |x|) of the k-th value is k / K; v: sqrt (int8) or the identity (int4) of it is
    k / K. Both maps end at 1 (and m at -1): the block max is stored exactly."""
    fmt = quant.FORMATS[fmt]
    m, v = torch.tensor(fmt.map(True), dtype=torch.float64), torch.tensor(fmt.map(False), dtype=torch.float64)
    km, kv = fmt.levels(True), fmt.levels(False)
    torch.testing.assert_close(2 * m / (1 + m.abs()), torch.arange(-km, km + 1).double() / km, atol=1e-6, rtol=0)
    torch.testing.assert_close(v ** (1 / fmt.v_power), torch.arange(kv + 1).double() / kv, atol=1e-6, rtol=0)
    assert m[0] == -1 and m[-1] == 1 and v[0] == 0 and v[-1] == 1


# --------------------------------------------------------------------------- paths and state

SHAPES = [(96, 64), (64,), (5000,), (300,), (1, 4096), (70, 80)]


def _params(dtype_of):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype_of(i))) for i, s in enumerate(SHAPES)]


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _make(params, variant, seed=3):
    variant = dict(variant)
    cls = OPTIMIZERS[variant.pop("rule", "AdamW")]
    marks = {"factored": True} if cls.rule.factors_matrices else {}
    groups = [{"params": params[:3], **marks}, {"params": params[3:], "weight_decay": 0.0, "lr": 5e-3, **marks}]
    return cls(groups, lr=1e-2, weight_decay=0.1, seed=seed, **variant)


def _steps(params, opt, start, stop, count_lost_updates=False):
    """Steps start..stop-1; returns the last step's result."""
    for s in range(start, stop):
        for p, g in zip(params, _grads(params, s)):
            p.grad = g
        result = opt.step(count_lost_updates=count_lost_updates)
    return result


def _mixed(i):  # mostly bf16 with one fp32 parameter
    return torch.float32 if i == 3 else torch.bfloat16


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_chunking_does_not_change_the_result(variant, monkeypatch):
    """Chunks (with tails, int8 blocks cut at chunk edges) get the bits and the math of the whole tensor."""
    results = []
    for chunk in (1 << 18, 1024):
        monkeypatch.setattr(optimizer_mod, "_CPU_CHUNK", chunk)
        params = _params(_mixed)
        opt = _make(params, variant)
        _steps(params, opt, 0, 3)
        results.append((params, opt))
    (pa, oa), (pb, ob) = results
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k, v in oa.state[a].items():
            assert torch.equal(v, ob.state[b][k]), k


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_state_dict_resume_is_bitwise(variant):
    params = _params(_mixed)
    opt = _make(params, variant)
    _steps(params, opt, 0, 2)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    _steps(params, opt, 2, 5)  # the uninterrupted run

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = _make(resumed, variant)
    opt2.load_state_dict(saved["opt"])
    _steps(resumed, opt2, 2, 5)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert v.dtype == opt2.state[b][k].dtype and torch.equal(v, opt2.state[b][k]), k


def test_load_state_dict_rejects_another_recipe():
    params = _params(_mixed)
    opt = _make(params, dict(compensation="kahan"))
    _steps(params, opt, 0, 1)
    other = _make(_params(_mixed), dict(compensation="stochastic"))
    with pytest.raises(ValueError, match="compensation"):
        other.load_state_dict(opt.state_dict())


RECIPE = dict(state_dtype="auto", compensation="none", moments_rounding="auto")


@pytest.mark.parametrize(
    "recipe, dtype, numel, moments, kahan, fields",
    [
        (dict(), torch.bfloat16, 4096, "bfloat16", False, (-1, -1, -1)),
        (dict(compensation="stochastic"), torch.bfloat16, 4096, "bfloat16", False, (0, 1, 2)),
        (
            dict(compensation="stochastic", moments_rounding="nearest"),
            torch.bfloat16,
            4096,
            "bfloat16",
            False,
            (0, -1, -1),
        ),
        (dict(compensation="kahan"), torch.bfloat16, 4096, "bfloat16", True, (0, 1, 2)),  # field 0: kahan_comp
        (dict(compensation="kahan", moments_rounding="nearest"), torch.bfloat16, 4096, "bfloat16", True, (-1, -1, -1)),
        (dict(moments_rounding="stochastic"), torch.bfloat16, 4096, "bfloat16", False, (-1, 0, 1)),
        (dict(state_dtype="int8", compensation="stochastic"), torch.bfloat16, 4096, "int8", False, (0, 1, 2)),
        (
            dict(state_dtype="int8", compensation="stochastic", moments_rounding="nearest"),
            torch.bfloat16,
            4096,
            "int8",
            False,
            (0, -1, -1),
        ),
        (dict(state_dtype="int8", compensation="stochastic"), torch.bfloat16, 4095, "bfloat16", False, (0, 1, 2)),
        (dict(state_dtype="float32", compensation="kahan"), torch.bfloat16, 4096, "float32", True, (0, -1, -1)),
        (dict(compensation="kahan"), torch.float32, 4096, "float32", False, (-1, -1, -1)),
        (dict(state_dtype="bfloat16", compensation="stochastic"), torch.float32, 4096, "bfloat16", False, (-1, 0, 1)),
    ],
)
def test_layout_decides_storage_and_random_fields(recipe, dtype, numel, moments, kahan, fields):
    layout = ParamLayout.decide(**{**RECIPE, **recipe}, param_dtype=dtype, numel=numel)
    assert (layout.moments, layout.kahan, layout.fields) == (moments, kahan, fields)
    assert layout.num_fields == sum(f >= 0 for f in fields)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_layout_names_the_state_buffers_and_stays_out_of_the_state_dict(variant):
    params = _params(_mixed)
    opt = _make(params, variant)
    _steps(params, opt, 0, 1)
    saved = opt.state_dict()["state"]
    for i, p in enumerate(params):
        assert tuple(opt.state[p]) == tuple(saved[i]) == opt.layout(p).buffers
        assert all(isinstance(v, torch.Tensor) for v in saved[i].values())


def test_load_state_dict_checks_the_buffers_against_the_layout():
    params = _params(_mixed)
    opt = _make(params, dict(compensation="kahan"))
    _steps(params, opt, 0, 1)
    sd = opt.state_dict()
    del sd["state"][0]["kahan_comp"]
    with pytest.raises(ValueError, match="kahan_comp"):
        _make(_params(_mixed), dict(compensation="kahan")).load_state_dict(sd)


def test_lr_scheduler_drives_lr():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = AdamW([p], lr=1.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [1e-3, 0.0][min(s, 1)])
    p.grad = torch.ones(8)
    opt.step()
    sched.step()
    before = p.detach().clone()
    assert torch.allclose(before, torch.full((8,), -1e-3))
    opt.step()
    assert torch.equal(p, before)  # lr is 0 now


@pytest.mark.parametrize(
    "variant, expected",
    [
        (dict(state_dtype="float32"), 8.0),
        (dict(state_dtype="bfloat16"), 4.0),
        (dict(state_dtype="auto"), 4.0),
        (dict(state_dtype="int8"), 2 + 8 / 256),
        (dict(state_dtype="bfloat16", compensation="kahan"), 6.0),
        (dict(state_dtype="int8", compensation="kahan"), 4 + 8 / 256),
        (dict(state_dtype="int4"), 1 + 8 / 128),
        (dict(state_dtype="int4-int8"), 1.5 + 4 / 128 + 4 / 256),
    ],
)
def test_state_bytes_per_param(variant, expected):
    p = torch.nn.Parameter(torch.zeros(512, 256, dtype=torch.bfloat16))
    opt = AdamW([p], **variant)
    p.grad = torch.ones_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert nbytes / p.numel() == pytest.approx(expected)


def test_fp32_params_ignore_compensation():
    p0, grads = _problem(n=4096, steps=3)
    plain, _ = _run(p0, grads)
    for comp in ("stochastic", "kahan"):
        p, opt = _run(p0, grads, compensation=comp, moments_rounding="nearest")
        assert torch.equal(p, plain) and "kahan_comp" not in opt.state[p]


def test_int4_codes_pack_two_per_byte_and_odd_last_dims_keep_bf16_moments():
    even = torch.nn.Parameter(torch.zeros(64, 128, dtype=torch.bfloat16))
    odd = torch.nn.Parameter(torch.zeros(64, 129, dtype=torch.bfloat16))
    opt = AdamW([even, odd], state_dtype="int4", compensation="stochastic")
    even.grad, odd.grad = torch.randn_like(even), torch.randn_like(odd)
    opt.step()
    st = opt.state[even]
    assert st["exp_avg_codes"].shape == (64, 64) and st["exp_avg_scale"].shape == (64 * 128 // 128,)
    assert opt.layout(odd).moments == "bfloat16" and opt.state[odd]["exp_avg"].dtype == torch.bfloat16
    # the packed codes read back as one code per element: byte j holds element j of its block in the low nibble,
    # element j + 64 (a tail of t elements: j + t / 2) in the high one
    int4 = quant.FORMATS["int4"]
    codes = torch.tensor([0x21, 0xF0], dtype=torch.uint8)
    assert quant.unpack(codes, int4).tolist() == [1, 0, 2, 15]
    j = torch.arange(64, dtype=torch.int32)
    block = (j % 16 | ((j * 7) % 16) << 4).to(torch.uint8)
    assert quant.unpack(block, int4).tolist() == (j % 16).tolist() + ((j * 7) % 16).tolist()
    code = torch.randint(0, 16, (3 * 128 + 6,), dtype=torch.int32)
    assert torch.equal(quant.unpack(quant._pack(code, int4).to(torch.uint8), int4), code)
    # int4-int8: exp_avg packed in 4 bits (blocks of 128), exp_avg_sq one byte per element (blocks of 256)
    mixed = torch.nn.Parameter(torch.zeros(64, 128, dtype=torch.bfloat16))
    opt = AdamW([mixed], state_dtype="int4-int8", compensation="stochastic")
    mixed.grad = torch.randn_like(mixed)
    opt.step()
    st = opt.state[mixed]
    assert st["exp_avg_codes"].shape == (64, 64) and st["exp_avg_scale"].shape == (64,)
    assert st["exp_avg_sq_codes"].shape == (64, 128) and st["exp_avg_sq_scale"].shape == (32,)


def test_small_tensors_keep_bf16_moments_under_int8():
    big = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    small = torch.nn.Parameter(torch.zeros(4095, dtype=torch.bfloat16))
    opt = AdamW([big, small], state_dtype="int8")
    big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
    opt.step()
    assert opt.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- diagnostics


@pytest.mark.parametrize(
    "compensation, lost, compensated",
    [
        ("none", 1.0, None),
        ("kahan", 1.0, 1.0),
    ],
)
def test_lost_update_fraction(compensation, lost, compensated):
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    f = torch.nn.Parameter(torch.ones(16))  # fp32: not counted
    opt = AdamW([p, f], lr=1e-5, weight_decay=0.0, compensation=compensation)
    p.grad, f.grad = torch.ones_like(p), torch.ones_like(f)
    assert opt.step() is None  # counted only when asked
    s = opt.step(count_lost_updates=True)
    assert (s.tracked_elements, s.lost_update_fraction, s.compensated_fraction) == (4096, lost, compensated)

    big = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = AdamW([big], lr=0.1, weight_decay=0.0, compensation=compensation)
    big.grad = torch.ones_like(big)
    assert opt.step(count_lost_updates=True).lost_update_fraction == 0.0


def test_lost_update_fraction_stochastic_is_probability():
    p = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-4, weight_decay=0.0, compensation="stochastic")
    p.grad = torch.ones_like(p)
    s = opt.step(count_lost_updates=True)
    # 1.0 - 1e-4 rounds down to 1 - 2^-8 with probability 1e-4 / 2^-8 = 0.0256
    assert s.lost_update_fraction == pytest.approx(1 - 0.0256, abs=0.005)
    assert s.compensated_fraction is None


def test_fp32_weights_are_not_counted():
    p = torch.nn.Parameter(torch.ones(64))
    opt = AdamW([p], lr=1e-5, compensation="kahan")  # Kahan acts on bf16 weights only
    p.grad = torch.ones_like(p)
    assert opt.step(count_lost_updates=True) == UpdateStats(0, 0.0, None, None, None)  # fp32 moments: neither


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_moment_meter_counts_stale_moments(state_dtype):
    """The lost-update meter of the moments, and what stochastic moments fix. Rounded to nearest, most of beta2 =
    0.999's EMA changes are below half a bf16 ulp or half an int8 code gap: the meter counts them lost, and the
    stored v drifts away from the exact EMA of the same gradients (only a large gradient moves it: it ratchets up).
    Rounded stochastically the stored value still often keeps its bits or code from one step to the next (it moves
    by a whole ulp or code gap now and then), but follows the exact EMA."""
    gen = torch.Generator().manual_seed(0)
    size = torch.rand(8192, generator=gen) * 0.75 + 0.25
    grads = [(size * torch.randn(8192, generator=gen)).to(torch.bfloat16) for _ in range(1001)]
    exact = torch.zeros(8192, dtype=torch.float64)
    for g in grads:
        exact.mul_(0.999).add_(g.double().square(), alpha=0.001)
    lost, ratio = {}, {}
    for rounding in ("nearest", "stochastic"):
        p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = AdamW(
            [p],
            lr=1e-6,
            weight_decay=0.0,
            state_dtype=state_dtype,
            compensation="stochastic",
            moments_rounding=rounding,
        )
        for g in grads[:-1]:
            p.grad = g.clone()
            opt.step()
        p.grad = grads[-1].clone()
        lost[rounding] = opt.step(count_lost_updates=True).exp_avg_sq_lost_fraction
        st = opt.state[p]
        v = (
            quant.dequantize(st["exp_avg_sq_codes"], st["exp_avg_sq_scale"], False)
            if state_dtype == "int8"
            else st["exp_avg_sq"].float()
        )
        ratio[rounding] = float(v.sum() / exact.sum())
    assert lost["nearest"] > 0.5 and 0 < lost["stochastic"] < 1, lost
    assert abs(ratio["nearest"] - 1) > 0.005 and abs(ratio["stochastic"] - 1) < 0.002, ratio


def test_step_returns_the_closures_loss_and_refuses_one_when_counting():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = AdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p.float() ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 8.0
    with pytest.raises(ValueError, match="closure"):
        opt.step(closure, count_lost_updates=True)


# --------------------------------------------------------------------------- API


def test_build_optimizer_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = build_optimizer(
        model,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        state_dtype="bfloat16",
        compensation="kahan",
        seed=1,
        moments_rounding="nearest",
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["compensation"] == "kahan" and decay["betas"] == (0.9, 0.95)
    assert decay["moments_rounding"] == "nearest" and opt.seed == 1


def test_init_state_on_meta_params_lays_out_state_without_memory():
    with torch.device("meta"):
        p = torch.nn.Parameter(torch.empty(4096, 1024, dtype=torch.bfloat16))
    opt = AdamW([p], state_dtype="int8", compensation="kahan")
    st = opt.init_state(p)
    nbytes = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
    assert nbytes / p.numel() == pytest.approx(4 + 8 / 256)
    assert all(t.is_meta for k, t in st.items() if k != "step")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(state_dtype="fp8"), "state_dtype"),
        (dict(compensation="magic"), "compensation"),
        (dict(moments_rounding="up"), "moments_rounding"),
        (dict(compile="yes"), "compile"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_rejects_float16_params():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])


def test_deepcopy_and_pickle_friendly_state_dict():
    params = _params(_mixed)
    opt = _make(params, dict(state_dtype="int8", compensation="kahan"))
    _steps(params, opt, 0, 1)
    sd = copy.deepcopy(opt.state_dict())
    assert "rng_state" not in sd["param_groups"][0]  # the random bits need no state
    assert all(isinstance(v, torch.Tensor) for st in sd["state"].values() for v in st.values())


# --------------------------------------------------------------------------- compiled path (compile=True)

# One per state layout the fused kernel handles; _mixed adds an fp32 parameter (fp32 layout) to each.
COMPILED_VARIANTS = [
    dict(),
    dict(compensation="stochastic"),
    dict(compensation="kahan"),
    dict(state_dtype="int8", compensation="stochastic"),
    dict(state_dtype="int4", compensation="stochastic"),
    dict(state_dtype="int4-int8", compensation="stochastic"),
    dict(state_dtype="float32"),
    dict(rule="FactoredAdamW", state_dtype="int8", compensation="stochastic"),
    dict(rule="FactoredAdamW", compensation="kahan"),
    dict(rule="Adafactor", state_dtype="int8", compensation="stochastic"),
]


@pytest.mark.compile
@pytest.mark.parametrize("variant", COMPILED_VARIANTS, ids=_ids)
def test_compiled_matches_eager_bitwise(variant, monkeypatch):
    """The compiled kernel is the eager update, bit for bit: weights, every state buffer and the lost-update
    counts after 3 steps (chunked differently, with tails, an int8 tensor whose size is no multiple of 256 left
    eager). Kahan compiled without emulate_precision_casts differed in half of its elements."""
    monkeypatch.setattr(optimizer_mod, "_CPU_CHUNK", 1024)
    monkeypatch.setattr(optimizer_mod, "_CPU_CHUNK_COMPILED", 2048)
    calls = []
    compiled_update = update.compiled_update
    monkeypatch.setattr(update, "compiled_update", lambda *a: calls.append(1) or compiled_update(*a))
    runs = []
    for compile in (False, True):
        params = _params(_mixed)
        opt = _make(params, variant)
        opt.compile = compile
        _steps(params, opt, 0, 1)
        _steps(params, opt, 1, 2, count_lost_updates=True)  # the meter's graphs
        before_last = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runs.append((params, opt, _steps(params, opt, 2, 3, count_lost_updates=True)))
    # no recompile from one step to the next (lr and bias corrections come as a tensor)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before_last
    assert calls  # the compiled kernel ran (fullgraph=True: it raises rather than fall back to eager)
    (pa, oa, sa), (pb, ob, sb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(
            a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
            b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32),
        )
        for k, v in oa.state[a].items():
            assert torch.equal(v, ob.state[b][k]), k
    assert sa == sb


# Every layout eagerly; compiled (new graphs: about 7 s each) the two whose gate differs from the eager one's place in
# the kernel: Kahan (gated outputs) and quantized moments in both formats (gated codes and scales, two graphs).
GATE_CASES = [(variant, False) for variant in COMPILED_VARIANTS] + [
    pytest.param(v, True, marks=pytest.mark.compile)
    for v in (dict(compensation="kahan"), dict(state_dtype="int4-int8", compensation="stochastic"))
]


def _gate_id(case) -> str:
    variant, compiled = case.values if hasattr(case, "values") else case
    return f"{_ids(variant) or 'bf16'}-{'compiled' if compiled else 'eager'}"


@pytest.mark.parametrize("variant, compile", GATE_CASES, ids=[_gate_id(c) for c in GATE_CASES])
def test_gated_step_parameter_is_the_step_or_nothing(variant, compile, monkeypatch):
    """step_parameter's device-side gate (gradient release's skip of a NaN/Inf gradient, without a host sync):
    False leaves every weight and state buffer bitwise as it was, whatever the gradient holds, and counts nothing;
    after `uncount_step` the next steps are those of a run that never saw the gated one; True is bitwise the
    ungated step, lost-update counts included."""
    monkeypatch.setattr(optimizer_mod, "_CPU_CHUNK", 1024)
    monkeypatch.setattr(optimizer_mod, "_CPU_CHUNK_COMPILED", 2048)

    def step(params, opt, s, gate=None, grads=None):
        counter = optimizer_mod.LostUpdateCounter()
        for p, g in zip(params, grads or _grads(params, s)):
            p.grad = g
            opt.step_parameter(p, counter, gate=None if gate is None else torch.tensor(gate))
        return counter.result()

    runs = []
    for gated in (False, True):
        params = _params(_mixed)
        opt = _make(params, variant)
        opt.compile = compile
        step(params, opt, 0)
        if gated:
            before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
            nan = [torch.full_like(p, float("nan")) for p in params]
            assert step(params, opt, 99, gate=False, grads=nan).tracked_elements == 0
            for p in params:
                opt.uncount_step(p)
            assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
            state, saved = opt.state_dict()["state"], before[1]["state"]
            assert all(torch.equal(state[i][k], saved[i][k]) for i in saved for k in saved[i])
        counts = [step(params, opt, s, gate=True if gated else None) for s in (1, 2)]
        runs.append((params, opt, counts))
    (pa, oa, ca), (pb, ob, cb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        assert all(torch.equal(v, ob.state[b][k]) for k, v in oa.state[a].items())
    assert ca == cb and ca[-1].tracked_elements > 0


@pytest.mark.compile
def test_eager_sqrt_is_correctly_rounded():
    """update._sqrt: ATen's eager fp32 sqrt is not correctly rounded on CPU, the fp64 route is (equal to the
    float64 square root rounded once)."""
    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * 1e-4
    exact = x.double().sqrt().float()
    assert torch.equal(update._sqrt(x), exact)
    assert torch.equal(torch.compile(update._sqrt)(x), exact)


@pytest.mark.compile
@pytest.mark.parametrize("compensation, lost, compensated", [("none", 1.0, None), ("kahan", 1.0, 1.0)])
def test_compiled_lost_updates_and_kahan_buffer(compensation, lost, compensated):
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-5, weight_decay=0.0, compensation=compensation, compile=True)
    for _ in range(300):
        p.grad = torch.ones_like(p)
        s = opt.step(count_lost_updates=True)
    assert (s.lost_update_fraction, s.compensated_fraction) == (lost, compensated)
    # 300 steps of 1e-5 = 3e-3, below half an ulp of 1.0 (3.9e-3): only the Kahan buffer carries them
    total = p.float() + (opt.state[p]["kahan_comp"].float() if compensation == "kahan" else 0)
    assert torch.allclose(total, torch.full_like(total, 1 - 3e-3), atol=2e-4) == (compensation == "kahan")


@pytest.mark.compile
def test_compiled_resume_is_bitwise():
    variant = dict(state_dtype="int8", compensation="stochastic", compile=True)
    params = _params(_mixed)
    opt = _make(params, variant)
    _steps(params, opt, 0, 2)
    saved = copy.deepcopy(([p.detach().clone() for p in params], opt.state_dict()))
    _steps(params, opt, 2, 4)
    resumed = [torch.nn.Parameter(t) for t in saved[0]]
    opt2 = _make(resumed, variant)
    opt2.load_state_dict(saved[1])
    _steps(resumed, opt2, 2, 4)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_build_optimizer_passes_compile():
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, lr=1e-3, compile=True).compile
    with pytest.raises(ValueError, match="compile"):
        AdamW(model.parameters(), compile="yes")


@pytest.mark.compile
def test_compiled_stochastic_rounding_keeps_its_bitcasts_vectorized():
    """update._vectorized_bitcasts: inductor's CPU code for the bf16-sr update has vector casts, no per-element
    c10::bit_cast loop (which made the compiled bf16-sr step 5.9x the plain bf16 one, BENCHMARKS.md). A torch
    upgrade that moves the code generator's internals fails here rather than silently slowing the step."""
    from torch._inductor.utils import run_and_get_code

    n = 4096
    p, g = torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    keys = randbits.StepKeys(randbits.tensor_key(0, 0), 1, 3).tensor(0, "cpu")
    scalars = optimizer_mod.StepScalars.of(dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8), 1).as_tensor(
        "cpu"
    )
    fn = torch.compile(update.elementwise_update, fullgraph=True, options={"emulate_precision_casts": True})
    with update._vectorized_bitcasts(), torch._inductor.config.patch(force_disable_caches=True):  # generated now
        _, code = run_and_get_code(fn, p, g, m, v, None, None, None, keys, (0, 1, 2), "bfloat16", scalars, False)
    kernels = "\n".join(code)
    assert "at::vec::cast<int32_t, float>" in kernels and "c10::bit_cast<int32_t>" not in kernels
