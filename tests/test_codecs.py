"""optim/codecs.py, each codec on its own: load as fp32, store (nearest or stochastic), gated store, weight writes."""

from __future__ import annotations

import pytest
import torch

from leantrain.optim import codecs, quant, randbits
from leantrain.optim.layout import StepScalars

N = 4096


def _rand(seed: int = 0, n: int = N) -> torch.Tensor:
    keys = randbits.StepKeys(randbits.tensor_key(seed, 0), 1, 1).tensor(0, torch.device("cpu"))
    return randbits.fields(n, keys, 1, torch.device("cpu"))[0]


def _values(signed: bool, n: int = N, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return x if signed else x.square()


MOMENTS = {
    "float32": (codecs.FLOAT, torch.float32),
    "bfloat16": (codecs.FLOAT, torch.bfloat16),
    **{
        f"{kind}-{'m' if signed else 'v'}": (codecs.moment_codecs(kind)[0 if signed else 1], kind)
        for kind in ("int8", "int4")
        for signed in (True, False)
    },
}


def _allocate(codec, dtype, n: int = N):
    if isinstance(codec, codecs.QuantizedMoment):
        fmt = codec.fmt
        return (
            torch.full((fmt.code_bytes(n),), quant.initial_code(codec.signed, fmt), dtype=torch.uint8),
            torch.zeros(fmt.num_blocks(n)),
        )
    return torch.zeros(n, dtype=dtype), None


def _signed(name: str) -> bool:
    return not name.endswith("-v")


@pytest.mark.parametrize("name", MOMENTS)
def test_nearest_store_then_load_is_within_the_formats_step(name):
    codec, dtype = MOMENTS[name]
    stored, scale = _allocate(codec, dtype)
    x = _values(_signed(name))
    codec.store_(stored, scale, x.clone(), None)
    y = codec.load(stored, scale, True)
    if dtype == torch.float32:
        assert torch.equal(y, x)
    elif dtype == torch.bfloat16:
        assert torch.equal(y, x.bfloat16().float())
    else:  # the nearest code: within half the map's widest gap, times the block's absmax
        values = torch.tensor(codec.fmt.map(codec.signed))
        gap = (values[1:] - values[:-1]).max().item() / 2 * (1 + 1e-6)
        if not codec.signed:  # v's zero code is never written: below the first code, that code
            gap = max(gap, values[1].item())
        amax = x.abs().view(-1, codec.fmt.block).amax(dim=1, keepdim=True)
        assert ((y - x).abs().view(-1, codec.fmt.block) <= gap * amax).all()


@pytest.mark.parametrize("name", [n for n in MOMENTS if n != "float32"])
def test_stochastic_store_is_unbiased(name):
    codec, dtype = MOMENTS[name]
    x = _values(_signed(name))
    total = torch.zeros(N, dtype=torch.float64)
    draws = 400
    for seed in range(draws):
        stored, scale = _allocate(codec, dtype)
        codec.store_(stored, scale, x.clone(), _rand(seed))
        total += codec.load(stored, scale, True).double()
    nearest_stored, nearest_scale = _allocate(codec, dtype)
    codec.store_(nearest_stored, nearest_scale, x.clone(), None)
    nearest = codec.load(nearest_stored, nearest_scale, True).double()
    # v's values below its first code are stored as that code, by design (quant.py): left out
    kept = x.double() >= 2 * (nearest - x.double()).clamp(min=0) if not _signed(name) else torch.ones(N, dtype=bool)
    nearest_bias = (nearest - x.double())[kept].abs().mean()
    mean_bias = (total / draws - x.double())[kept].abs().mean()
    assert mean_bias < 0.25 * nearest_bias  # the average of the draws is far closer than one nearest rounding


@pytest.mark.parametrize("name", [n for n in MOMENTS if n != "float32"])
def test_gated_store_keeps_the_bits(name):
    codec, dtype = MOMENTS[name]
    stored, scale = _allocate(codec, dtype)
    codec.store_(stored, scale, _values(_signed(name), seed=1), None)
    before = (stored.clone(), None if scale is None else scale.clone())
    codec.store_(stored, scale, _values(_signed(name), seed=2) * 7, _rand(), torch.tensor(False))
    assert torch.equal(stored, before[0]) and (scale is None or torch.equal(scale, before[1]))
    assert codec.same(stored, before[0]).all()
    codec.store_(stored, scale, _values(_signed(name), seed=2) * 7, _rand(), torch.tensor(True))
    assert not codec.same(stored, before[0]).all()


def _scalars(lr: float = 1e-2, wd: float = 0.1) -> StepScalars:
    return StepScalars.of({"lr": lr, "weight_decay": wd, "betas": (0.9, 0.95), "eps": 1e-8}, 1)


def test_float32_weight_takes_the_fp32_result_exactly():
    p, step = torch.randn(N), torch.randn(N) * 1e-3
    expected = p * (1 - 1e-2 * 0.1) + step
    codecs.weight_codec(torch.float32, False).write_(p, None, p.clone(), step, _scalars(), None, None, False)
    assert torch.equal(p, expected)


def test_bf16_weight_nearest_loses_small_updates_and_counts_them():
    p = torch.ones(N, dtype=torch.bfloat16)
    step = torch.full((N,), 1e-4)  # below half a bf16 ulp of 1.0 (2^-8)
    counts = codecs.BF16_WEIGHT.write_(p, None, p.float(), step, _scalars(wd=0.0), None, None, True)
    assert torch.equal(p, torch.ones(N, dtype=torch.bfloat16))
    assert counts["updated"] == N and counts["lost"] == N


def test_bf16_weight_stochastic_moves_in_expectation():
    p = torch.ones(N, dtype=torch.bfloat16)
    step = torch.full((N,), 2.0**-9)  # a quarter of an ulp: a quarter of the elements move up one ulp
    codecs.BF16_WEIGHT.write_(p, None, p.float(), step, _scalars(wd=0.0), _rand(), None, False)
    assert (p.float().mean() - 1.0).item() == pytest.approx(2.0**-9, rel=0.1)


def test_kahan_weight_carries_what_the_weight_cannot_take():
    p, comp = torch.ones(N, dtype=torch.bfloat16), torch.zeros(N, dtype=torch.bfloat16)
    for i in range(64):  # 64 steps of 1e-4, each far below half an ulp of 1.0 (2^-8); the buffer rounded stochastically
        codecs.KAHAN_WEIGHT.write_(p, comp, p.float(), torch.full((N,), 1e-4), _scalars(wd=0.0), _rand(i), None, False)
    assert (p.float() > 1).all()  # plain nearest rounding would have kept every weight at 1.0
    total = p.float() + comp.float()
    assert abs(total.mean().item() - 1.0064) < 1e-5  # nothing lost on average: weight + buffer
    assert codecs.weight_codec(torch.bfloat16, True) is codecs.KAHAN_WEIGHT
