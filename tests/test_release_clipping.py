"""Gradient release that clips (training.release_clipping): each rule is the math it says, and a run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_in_process
from leantrain import guard, parallel
from leantrain.config import load_config
from leantrain.data import ByteTokenizer, PackedDataset
from leantrain.metrics import read_metrics
from leantrain.model import batch_loss
from leantrain.optim.release import GradientRelease
from leantrain.precision import clip_coefficient, grad_norm
from leantrain.runplan import resolve
from leantrain.step import StepContext, train_step
from leantrain.train import build_state

MAX_NORM = 0.05  # small enough that every step of the debug model clips


def _state(in_backward: bool, clipping: str = "per_tensor"):
    plan = resolve(
        load_config(
            None,
            {
                "recipe": "bf16-sr",
                "model.flavor": "debug",
                "compile.enable": "false",
                "lr_scheduler.warmup_steps": "1",
                "training.max_norm": str(MAX_NORM),
                "optimizer.in_backward": str(in_backward).lower(),
                "training.release_clipping": clipping,
            },
        ),
        env={},
    )
    data = PackedDataset(["some text to train on, " * 40], ByteTokenizer(), 16, 2, 0)
    dist = parallel.Distributed(plan.parallel)
    state = build_state(plan, dist, data, ByteTokenizer())
    release = GradientRelease(state.optimizer, MAX_NORM, clipping) if in_backward else None
    ctx = StepContext(
        plan.precision, dist, max_norm=0.0, weigh_tokens=False, nonfinite=guard.NonFiniteGuard(3), release=release
    )
    return state, ctx, data


def _reference_steps(clipping: str, steps: int) -> tuple[list[float], torch.nn.Module]:
    """The rule written out: a normal backward, each gradient scaled as the rule says, then the optimizer's step."""
    state, _, data = _state(False)
    params = list(state.model.parameters())
    total = sum(p.numel() for p in params)
    previous, losses = torch.tensor(1.0), []
    for _ in range(steps):
        state.optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(state.model, data.next_batch())
        loss.backward()
        norm = grad_norm(params)
        for p in params:
            if clipping == "per_tensor":
                own = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                p.grad.mul_(clip_coefficient(own, MAX_NORM * (p.numel() / total) ** 0.5))
            else:
                p.grad.mul_(previous)
        previous = clip_coefficient(norm, MAX_NORM)
        state.optimizer.step()
        state.scheduler.step()
        losses.append(loss.item())
    return losses, state.model


@pytest.mark.parametrize("clipping", ["per_tensor", "previous_norm"])
def test_release_clips_each_gradient_by_its_rule(clipping):
    state, ctx, data = _state(True, clipping)
    stats = [train_step(state, [data.next_batch()], ctx) for _ in range(4)]
    losses, reference = _reference_steps(clipping, 4)
    assert [s.loss.item() for s in stats] == losses
    for (name, p), q in zip(state.model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert all(s.grad_norm.item() > MAX_NORM for s in stats)  # the logged norm is the unclipped one


def test_per_tensor_clipping_keeps_the_global_norm_within_max_norm():
    """The shares' squares sum to max_norm², so however large one tensor's gradient is, the clipped whole is within
    max_norm: a spike is clipped at its own step."""
    state, ctx, data = _state(True, "per_tensor")
    clipped, step_parameter = [], state.optimizer.step_parameter

    def record(p, *args, **kwargs):  # the gradient each update receives: clipped
        clipped.append(torch.linalg.vector_norm(p.grad, dtype=torch.float32).square())
        step_parameter(p, *args, **kwargs)

    state.optimizer.step_parameter = record
    for p in state.model.parameters():
        p.data.mul_(4.0)  # a far larger gradient than max_norm
    train_step(state, [data.next_batch()], ctx)
    assert torch.stack(clipped).sum().sqrt() <= MAX_NORM * (1 + 1e-3)


def test_previous_norm_clipping_resumes_exactly(tmp_path):
    """The lagged factor is state: a run stopped after step 2 and resumed logs what the uninterrupted run logs."""
    args = [
        *TINY,
        "--recipe=bf16-sr",
        "--optimizer.in_backward=true",
        "--training.max_norm=0.05",
        "--training.release_clipping=previous_norm",
        "--metrics.log_freq=1",
        "--eval.interval=0",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = run_in_process("train", *args, "--training.steps=4", f"--job.dump_folder={whole}")
    assert r.returncode == 0, r.stderr
    assert "training.release_clipping=previous_norm" in r.stdout  # the run's first lines say which rule
    assert run_in_process("train", *args, "--training.steps=2", f"--job.dump_folder={cut}").returncode == 0
    r = run_in_process("train", *args, "--training.steps=4", f"--job.dump_folder={cut}")
    assert r.returncode == 0, r.stderr
    logged = [[(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(f / "metrics.jsonl")] for f in (whole, cut)]
    assert logged[0] == logged[1]
    assert json.loads((whole / "summary.json").read_text())["final_loss"] > 0


def test_the_24gb_fine_tune_command_runs(tmp_path):
    """Issue 35's command, on the debug model: the no-m recipe with gradient release and clipping at 1.0."""
    out = tmp_path / "run"
    r = run_in_process(
        "train",
        *TINY,
        "--recipe=bf16-factored-no-m",
        "--optimizer.in_backward=true",
        "--training.max_norm=1.0",
        "--training.steps=4",
        "--eval.interval=0",
        f"--job.dump_folder={out}",
    )
    assert r.returncode == 0, r.stderr
    assert "training.release_clipping=per_tensor" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "bf16-factored-no-m" and summary["state_bytes"]["grads"] == 0
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(losses) >= 1 and all(loss == loss for loss in losses)


def test_a_release_clipping_rule_without_release_warns():
    from leantrain.config import suspicious_precision_settings

    said = suspicious_precision_settings(load_config(None, {"training.release_clipping": "previous_norm"}))
    assert any("release_clipping=previous_norm has no effect" in s for s in said)
    assert not any(
        "release_clipping" in s
        for s in suspicious_precision_settings(
            load_config(None, {"training.release_clipping": "previous_norm", "optimizer.in_backward": "true"})
        )
    )
