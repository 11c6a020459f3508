"""One optimizer step: ``train_step(state, batches, ctx) -> StepStats``.

Forward and backward over the step's micro-batches (gradients summed), the fp32 gradient norm and clipping,
the non-finite guard's decision (agreed over ranks), then the update, unless that decision skips it, and the
learning-rate schedule, which advances in either case. With gradient release (optimizer.in_backward,
optim/release.py) the update runs inside the backward instead: the guard looks at the loss before the backward,
clipping follows training.release_clipping, and the gradient norm is reported. Tests call it in process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import guard, parallel
from .distributed import settle_gradient
from .hooks import Hooks
from .model import batch_loss
from .optim import UpdateStats
from .optim.release import GradientRelease
from .precision import IGNORE_INDEX, Precision, clip_grad_norm_
from .state import TrainState


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the state: the run's dtypes and ranks, clipping, and who decides on NaN/Inf."""

    precision: Precision
    dist: parallel.Distributed
    max_norm: float  # 0: no clipping
    weigh_tokens: bool  # SFT: micro-batches differ in labelled tokens, so their losses are weighted by them
    nonfinite: guard.NonFiniteGuard
    hooks: Hooks = Hooks()
    release: GradientRelease | None = None  # optimizer.in_backward: the updates run inside the backward


@dataclass(frozen=True)
class StepStats:
    step: int
    loss: torch.Tensor  # this rank's loss on its part of the global batch (0-dim, on the device)
    grad_norm: torch.Tensor  # the global gradient norm before clipping (fp32)
    lr: float  # the learning rate the update used
    finite: bool  # False: NaN/Inf loss or norm on some rank, so the update was skipped
    stop: bool  # a stop signal arrived (on any rank): the run ends after this step
    updates: UpdateStats | None  # the lost-update counts, when asked for and the update was taken
    tokens: int  # tokens of the global batch


def token_weights(labels: list[torch.Tensor], dist: parallel.Distributed) -> list[torch.Tensor]:
    """Per micro-batch factors that turn the mean of its loss into its share of the global batch's token mean.

    The step's loss is the mean over every labelled token of the global batch (all micro-batches, all
    data-parallel ranks), so a micro-batch's mean loss counts with weight n * accum * dp_size / N (n its labelled
    tokens, N the global batch's), divided by accum below and averaged over ranks by DDP/FSDP. Packed data labels
    every token, so each weight would be exactly 1.0 there (the step skips the call); SFT micro-batches differ
    in response tokens, and an unweighted mean would give a short response's tokens more say than a long one's.
    """
    counts = torch.stack([(x != IGNORE_INDEX).sum() for x in labels])
    total = parallel.sum_over_ranks(counts.sum(), dist)
    scale = len(labels) * dist.dp_size
    return list(counts * scale / total)  # int64 / int64: fp32, and exactly 1.0 when the integers are equal


def train_step(
    state: TrainState, batches: list[tuple[torch.Tensor, ...]], ctx: StepContext, count_lost_updates: bool = False
) -> StepStats:
    """Advance ``state`` by one optimizer step over ``batches`` (this rank's micro-batches, on its device: each
    (inputs, labels), or (inputs, labels, positions) for packed SFT samples)."""
    step, device, accum = state.step + 1, ctx.dist.device, len(batches)
    # Dropped here rather than after the update: the gradients of the last step stay measurable (summary.json's
    # state_bytes), and no step starts with another's (a skipped step's) gradients.
    state.optimizer.zero_grad(set_to_none=True)
    # Packed text labels every token, so its weights are all exactly 1: no counting, no collective.
    weights = token_weights([batch[1] for batch in batches], ctx.dist) if ctx.weigh_tokens else [1.0] * accum
    if ctx.release is not None:
        return _step_in_backward(state, batches, weights, ctx, step, count_lost_updates)
    loss_sum = torch.zeros((), device=device)
    for batch, weight in zip(batches, weights):
        with ctx.precision.autocast(device, ctx.dist.sharded):
            loss = batch_loss(state.model, batch) * weight / accum
        loss.backward()
        loss_sum += loss.detach()
    if ctx.dist.plan.tp > 1:  # the sequence-parallel norms' partial sums
        for p in state.model.parameters():
            settle_gradient(p)
    grad_norm = ctx.hooks.grad_norm(step, clip_grad_norm_(state.model.parameters(), ctx.max_norm))
    finite, stop = ctx.nonfinite.check(step, loss_sum, grad_norm)  # one host sync; the same on every rank
    lr = state.scheduler.get_last_lr()[0]
    updates = None
    if finite:  # a NaN/Inf step changes neither the weights nor the optimizer state
        updates = state.optimizer.step(count_lost_updates=count_lost_updates)
    guard.advance_schedule(state.scheduler)  # skipped steps count too: the schedule follows the step number
    state.step = step
    tokens = sum(batch[0].numel() for batch in batches) * ctx.dist.dp_size
    return StepStats(
        step=step, loss=loss_sum, grad_norm=grad_norm, lr=lr, finite=finite, stop=stop, updates=updates, tokens=tokens
    )


def _step_in_backward(
    state: TrainState, batches, weights, ctx: StepContext, step: int, count_lost_updates: bool
) -> StepStats:
    """Gradient release: one micro-batch (config.validate), clipped in the hooks by the release's rule; the guard
    decides on the loss before the backward (a NaN/Inf loss skips the backward and every update), the updates run
    in the backward's hooks."""
    (batch,), (weight,), device = batches, weights, ctx.dist.device
    with ctx.precision.autocast(device, ctx.dist.sharded):
        loss = batch_loss(state.model, batch) * weight
    finite, stop = ctx.nonfinite.check(step, loss.detach(), None)
    lr = state.scheduler.get_last_lr()[0]
    updates, grad_norm = None, torch.full((), float("nan"), device=device)
    if finite:
        with ctx.release.backward(device, count_lost_updates) as result:
            loss.backward()
        (released,) = result
        grad_norm = released.grad_squares.norm()
        ctx.release.observe_norm(grad_norm)  # "previous_norm" clipping's factor for the next step
        finite = not ctx.nonfinite.check_released(step, released.skipped_params)
        if not finite:  # some rank skipped a parameter's update: its step count was advanced on the host
            ctx.release.uncount_skipped()
        updates = released.updates
    elif ctx.dist.sharded:
        parallel.reshard(state.model)  # the forward's gathered parameters, which no backward will free
    guard.advance_schedule(state.scheduler)
    state.step = step
    return StepStats(
        step=step,
        loss=loss.detach(),
        grad_norm=grad_norm,
        lr=lr,
        finite=finite,
        stop=stop,
        updates=updates,
        tokens=batch[0].numel() * ctx.dist.dp_size,
    )
