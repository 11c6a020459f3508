"""FactoredAdamW and Adafactor: the factored v (optim/factored.py) against float64 references, layouts and bytes."""

from __future__ import annotations

import pytest
import torch

from leantrain.model import build_model
from leantrain.optim import Adafactor, AdamW, FactoredAdamW, build_optimizer, param_groups

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def reference_factored(p0, grads, lr, betas, eps, weight_decay):
    """The rule in float64: m per element, v = R C / mean(C) from the EMAs of g²'s row and column means."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    r, c = torch.zeros(p.shape[0], dtype=torch.float64), torch.zeros(p.shape[1], dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p.mul_(1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        r = b2 * r + (1 - b2) * (g * g).mean(dim=1)
        c = b2 * c + (1 - b2) * (g * g).mean(dim=0)
        v = torch.outer(r, c) / c.mean()
        p -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def reference_adafactor(p0, grads, lr, betas, eps, weight_decay, factored=True):
    """Adafactor as the rule states it, in float64: no m, u = g / (sqrt(v_hat) + eps), u scaled to RMS <= 1."""
    p = p0.double().clone()
    r, c, v = torch.zeros(p.shape[0], dtype=torch.float64), torch.zeros(p.shape[1], dtype=torch.float64), 0.0
    b2 = betas[1]
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if factored:
            r = b2 * r + (1 - b2) * (g * g).mean(dim=1)
            c = b2 * c + (1 - b2) * (g * g).mean(dim=0)
            v = torch.outer(r, c) / c.mean()
        else:
            v = b2 * v + (1 - b2) * g * g
        u = g / ((v / (1 - b2**t)).sqrt() + eps)
        u = u / max(1.0, u.square().mean().sqrt().item())
        p = p * (1 - lr * weight_decay) - lr * u
    return p


def _run(cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    group = {"params": [p], "factored": True} if cls.rule.factors_matrices else {"params": [p]}
    opt = cls([group], **{**HP, **kw})
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


def _grads(shape, steps, rank1=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if rank1:  # g = s_t * a b^T: g² is rank 1 at every step, and so are its EMAs
        a, b = torch.randn(shape[0], 1, generator=gen), torch.randn(1, shape[1], generator=gen)
        return [(1.0 + 0.3 * t) * a * b for t in range(steps)]
    return [torch.randn(shape, generator=gen) * (0.1 + t) for t in range(steps)]


def test_fp32_matches_the_float64_reference():
    shape = (96, 80)
    p0, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), _grads(shape, 6)
    p, opt = _run(FactoredAdamW, p0, grads, state_dtype="float32")
    torch.testing.assert_close(p.double(), reference_factored(p0, grads, **HP), rtol=0, atol=1e-5)
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert opt.state[p]["exp_avg_sq_row"].shape == (96,) and opt.state[p]["exp_avg_sq_col"].shape == (80,)


def test_rank_one_squares_give_adams_exact_v():
    """Where g² is rank 1, Adafactor's estimate is exact: the factored rule takes AdamW's steps."""
    shape = (64, 48)
    p0, grads = torch.randn(shape), _grads(shape, 5, rank1=True)
    factored, _ = _run(FactoredAdamW, p0, grads, state_dtype="float32")
    adamw, _ = _run(AdamW, p0, grads, state_dtype="float32")
    torch.testing.assert_close(factored, adamw, rtol=0, atol=1e-5)
    assert not torch.equal(factored, p0)


def test_a_full_rank_gradient_is_not_adams_step():
    """The test above is not vacuous: with a full-rank g² the two rules part."""
    shape = (64, 48)
    p0, grads = torch.randn(shape), _grads(shape, 5)
    factored, _ = _run(FactoredAdamW, p0, grads, state_dtype="float32")
    adamw, _ = _run(AdamW, p0, grads, state_dtype="float32")
    assert (factored - adamw).abs().max() > 1e-3


def test_vectors_and_groups_not_marked_keep_per_element_v():
    w, b = torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))
    other = torch.nn.Parameter(torch.randn(8, 8))
    opt = FactoredAdamW([{"params": [w, b], "factored": True}, {"params": [other]}], state_dtype="int8")
    assert opt.layout(w).factored and not opt.layout(b).factored and not opt.layout(other).factored
    assert "exp_avg_sq_row" in opt.layout(w).buffers and "exp_avg_sq" in opt.layout(b).buffers


def test_adamw_refuses_a_factored_group():
    with pytest.raises(ValueError, match="factored"):
        AdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "factored": True}])


@pytest.mark.parametrize(
    "state_dtype, m_bytes", [("int8", 1 + 4 / 256), ("int4-int8", 0.5 + 4 / 128), ("bfloat16", 2.0), ("float32", 4.0)]
)
def test_state_bytes_are_m_plus_the_factors(state_dtype, m_bytes):
    rows, cols = 512, 256
    with torch.device("meta"):
        p = torch.nn.Parameter(torch.empty(rows, cols, dtype=torch.bfloat16))
    state = FactoredAdamW([{"params": [p], "factored": True}], state_dtype=state_dtype).init_state(p)
    nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert nbytes == pytest.approx(rows * cols * m_bytes + 4 * (rows + cols))


def test_param_groups_mark_the_blocks_matrices_only():
    model = build_model("debug")
    groups = param_groups(model, 0.1, factored=True)
    marked = [p for g in groups if g.get("factored") for p in g["params"]]
    in_blocks = {id(p) for p in model.layers.parameters() if p.ndim == 2}
    assert {id(p) for p in marked} == in_blocks
    assert id(model.tok_embeddings.weight) not in in_blocks and id(model.output.weight) not in in_blocks
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g for g in param_groups(model, 0.1) if g.get("factored")] == []  # AdamW's groups as before


def test_build_optimizer_chooses_the_rule_by_name():
    model = build_model("debug")
    opt = build_optimizer(model, "FactoredAdamW", lr=1e-3, state_dtype="int8")
    assert isinstance(opt, FactoredAdamW) and opt.layout(model.layers[0].attention.wq.weight).factored
    assert not opt.layout(model.output.weight).factored
    assert type(build_optimizer(model, lr=1e-3)) is AdamW


def test_gated_off_step_keeps_the_factors():
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = FactoredAdamW([{"params": [p], "factored": True}], state_dtype="int8")
    p.grad = torch.randn(16, 8)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((16, 8), float("nan"))
    opt.step_parameter(p, gate=torch.tensor(False))
    opt.uncount_step(p)
    assert all(torch.equal(before[k], v) for k, v in opt.state[p].items())


@pytest.mark.parametrize("factored", [True, False])
def test_adafactor_fp32_matches_the_float64_reference(factored):
    """No m, and each step clipped to RMS 1: the early steps (v lags g², which grows) are clipped, the rest not."""
    shape = (96, 80)
    p0, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), _grads(shape, 6)
    p = torch.nn.Parameter(p0.clone())
    opt = Adafactor([{"params": [p], "factored": factored}], **{**HP, "state_dtype": "float32"})
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.double(), reference_adafactor(p0, grads, **HP, factored=factored), rtol=0, atol=1e-5)
    assert "exp_avg" not in opt.state[p] and "exp_avg_codes" not in opt.state[p]


def test_adafactor_clips_a_step_whose_v_lags():
    """A gradient 100 times the one v has seen: unclipped the step's RMS would be far above 1."""
    p = torch.nn.Parameter(torch.zeros(64, 32))
    opt = Adafactor([{"params": [p], "factored": True}], lr=1.0, weight_decay=0.0, state_dtype="float32")
    gen = torch.Generator().manual_seed(0)
    p.grad = torch.randn(64, 32, generator=gen) * 0.01
    opt.step()
    before = p.detach().clone()
    p.grad = torch.randn(64, 32, generator=gen)
    opt.step()
    step = p.detach() - before
    assert step.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)


def test_adafactor_recipe_stores_no_m_and_meets_the_8b_target():
    """bf16-factored-no-m with gradient release: at most 2.3 bytes/param of training state on Llama 3 8B."""
    from leantrain.config import load_config
    from leantrain.plan import plan

    model = build_model("debug")
    opt = build_optimizer(model, "Adafactor", lr=1e-3, state_dtype="int8")
    first_moment = {"exp_avg", "exp_avg_codes", "exp_avg_scale"}
    assert all(not first_moment & set(opt.init_state(p)) for p in model.parameters())
    p = plan(load_config(None, {"model.flavor": "8B"}), ["bf16-factored-no-m"], dp_shard=1, gpu_memory=24 * 2**30)[
        "recipes"
    ]
    assert p["bf16-factored-no-m + in_backward"]["state_bytes_per_param"] <= 2.3
