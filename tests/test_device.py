"""The optimizer's device-capable checks: run on an accelerator with LEANTRAIN_TEST_DEVICE=cuda (benchmarks/gpu.sh
does, before it measures), on the CPU otherwise.

On an accelerator they check what the CPU suite cannot: that the random bits there are the CPU's bits (they are a
pure function of key and element index), that the eager step there is bitwise the CPU's, and that inductor's
Triton kernel is bitwise the eager step, for every state layout, and that gradient release's backward queues its
updates without a host sync. On the CPU the compiled checks are tests/test_optim.py's and are skipped here.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from leantrain.optim import AdamW, randbits, stochastic_round

DEVICE = torch.device(os.environ.get("LEANTRAIN_TEST_DEVICE", "cpu"))
LAYOUTS = [
    dict(),
    dict(compensation="stochastic"),
    dict(compensation="kahan"),
    dict(state_dtype="int8", compensation="stochastic"),
    dict(state_dtype="int4", compensation="stochastic"),
    dict(state_dtype="int4-int8", compensation="stochastic"),
    dict(state_dtype="float32"),
]


def _ids(v):
    return "-".join(f"{k}={x}" for k, x in v.items()) or "bf16"


def _run(layout, device, compile, steps=3):
    gen = torch.Generator().manual_seed(0)
    shapes = [(96, 256), (256,), (70, 33)]  # an int8 tensor, a small one (bf16 moments), a non-multiple of 256
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, torch.bfloat16)) for s in shapes]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, seed=5, compile=compile, **layout)
    stats = None
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
        stats = opt.step(count_lost_updates=step == steps - 1)
    return [p.detach().cpu() for p in params], [{k: v.cpu() for k, v in opt.state[p].items()} for p in params], stats


def _assert_same(a, b):
    (pa, sa, ua), (pb, sb, ub) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
    for x, y in zip(sa, sb):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert ua == ub


def test_random_bits_on_the_device_are_the_cpus():
    keys = randbits.StepKeys(randbits.tensor_key(3, 1), 9, 3)
    on_device = randbits.fields(1 << 16, keys.tensor(4096, DEVICE), 3, DEVICE)
    on_cpu = randbits.fields(1 << 16, keys.tensor(4096, "cpu"), 3, "cpu")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_device, on_cpu))


def test_stochastic_rounding_is_unbiased_on_the_device():
    n, value = 1 << 18, 1.0 + 0.3 * 2.0**-7
    out = stochastic_round(torch.full((n,), value, device=DEVICE), seed=1).double()
    sigma = 2.0**-7 * math.sqrt(0.3 * 0.7 / n)
    assert abs(out.mean().item() - value) < 5 * sigma


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_eager_step_on_the_device_is_the_cpus(layout):
    if DEVICE.type == "cpu":
        pytest.skip("the device is the CPU")
    _assert_same(_run(layout, DEVICE, compile=False), _run(layout, "cpu", compile=False))


@pytest.mark.compile
@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_compiled_step_on_the_device_is_the_eager_one(layout):
    if DEVICE.type == "cpu":
        pytest.skip("on the CPU: tests/test_optim.py::test_compiled_matches_eager_bitwise")
    _assert_same(_run(layout, DEVICE, compile=True), _run(layout, DEVICE, compile=False))


@pytest.mark.parametrize(
    "layout, compile",
    [(layout, False) for layout in LAYOUTS]
    + [pytest.param(dict(state_dtype="int8", compensation="stochastic"), True, marks=pytest.mark.compile)],
    ids=[f"{_ids(v)}-eager" for v in LAYOUTS] + ["int8-compiled"],
)
def test_released_backward_makes_no_host_sync(layout, compile):
    """Gradient release (optim/release.py) decides a NaN/Inf gradient's skip on the device: a backward with its
    updates queues work without waiting for the device (CUDA: torch's sync debug mode raises on any synchronizing
    call, the scalars' and random keys' host-to-device copies included); its result says nothing was skipped."""
    from leantrain.optim.release import GradientRelease

    if compile and DEVICE.type == "cpu":
        pytest.skip("on the CPU: tests/test_optim.py::test_gated_step_parameter_is_the_step_or_nothing")
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 96))
    model.to(DEVICE, torch.bfloat16)
    release = GradientRelease(AdamW(model.parameters(), lr=1e-3, seed=1, compile=compile, **layout))
    x = torch.randn(8, 256, generator=gen).to(DEVICE, torch.bfloat16)

    def released_step():
        with release.backward(DEVICE) as result:
            model(x).float().square().mean().backward()
        return result[0]

    released_step()  # the state made, the kernels compiled
    weight = model[0].weight.detach().clone()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        result = released_step()
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert int(result.skipped_params) == 0 and not torch.equal(model[0].weight, weight)
    assert all(p.grad is None for p in model.parameters())
