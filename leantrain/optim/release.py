"""Gradient release: each parameter's update runs during the backward, and its gradient is freed at once.

`GradientRelease(optimizer)` registers a post-accumulate-grad hook on every parameter of the optimizer. While a
backward is *armed* (`with release.backward(...)`), the hook of a parameter whose gradient is complete adds the
gradient's squared norm to the step's total (fp32, for metrics: the unclipped norm), clips it (below), updates it with
`LeanOptimizer.step_parameter` (the very update its `step` runs, so with the same gradients the weights and state come
out bit for bit the same) and drops the gradient. So no full set of gradients ever exists: one parameter's
gradient (under FSDP2, one block's reduce-scattered shards, on which FSDP2 calls these hooks) at a time.

Clipping (training.max_norm > 0): the global norm is known only once every gradient has been made, after the
updates, so release clips by one of two rules (`RELEASE_CLIPPING`, training.release_clipping), each gradient
scaled in place before its update, as exact clipping scales it (the norm logged is still the step's true one):
* "per_tensor": each gradient to its share of the budget, max_norm * sqrt(n / N) (n its elements, N all of the
  model's): the clipped gradients' global norm is within max_norm (the shares' squares sum to max_norm²), at the
  step of a spike too. Under FSDP2 a parameter's squares are all-reduced over its shards first;
* "previous_norm": every gradient by the factor exact clipping used at the previous step, min(1, max_norm /
  norm_{t-1}) (1 at the first step; a non-finite norm keeps the factor it had). The factor lags one step: a spike
  passes unclipped, and the step after it is shrunk. It is state: a checkpoint saves it (`state_dict`).
Which rule, was measured (BENCHMARKS.md: paired against exact clipping, 3 seeds, and on a provoked spike).

What cannot work this way, and is refused by the config (config.validate, runplan.resolve):
* gradient accumulation: the update of the first micro-batch would be taken before the others' gradients exist;
* DDP (dp_replicate > 1 without sharding): its all-reduce completes after the hooks have seen the local gradient.
  FSDP2 (and HSDP) reduce before they call the hooks.

Non-finite values: the trainer checks the loss before the backward (a NaN/Inf loss skips the backward, and with it
every update, as a skipped step). A gradient can still be NaN/Inf with a finite loss (an overflow in the
backward): that parameter's update is skipped (its weights and moments unchanged) and its gradient dropped (under
FSDP2 on every rank, if any rank's shard of it is NaN/Inf: a shard updated beside a skipped one would leave the
parameter's shards with different step counts, so different bias corrections, where one parameter has one); the
other parameters' updates of that step have been or will be applied, so the step is reported as non-finite
(`BackwardResult.skipped_params`) and counts towards training.max_nonfinite_steps like a skipped step.
The skip is decided on the device, without a host sync in the backward (which on a GPU would stall the CPU once
per parameter, so that it could not queue the next kernels): the update runs with a gate, the gradient's
finiteness as a 0-dim bool tensor, that leaves every state tensor bitwise as it was where False
(update.elementwise_update). The host learns the count at the step's one sync (guard.check_released); only if some
parameter was skipped does `uncount_skipped` read the gates one by one and take back those parameters' step
counts, which live on the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..distributed import is_dtensor, local, settle_gradient
from ..precision import SquareSums, clip_coefficient, grad_squares, norm_from_squares
from .optimizer import LeanOptimizer, LostUpdateCounter, UpdateStats


@dataclass(frozen=True)
class BackwardResult:
    """What the released updates of one backward did."""

    grad_squares: SquareSums  # fp32 sums of this rank's gradient squares (its shards), reduced by `.norm()`
    skipped_params: torch.Tensor  # int: parameters whose gradient was NaN/Inf on this rank (their update skipped)
    updates: UpdateStats | None  # the lost-update counts, when asked for


RELEASE_CLIPPING = ("per_tensor", "previous_norm")


class GradientRelease:
    """The optimizer's updates inside the backward (see the module docstring); `max_norm` > 0 clips by `clipping`."""

    def __init__(self, optimizer: LeanOptimizer, max_norm: float = 0.0, clipping: str = "per_tensor"):
        if clipping not in RELEASE_CLIPPING:
            raise ValueError(f"GradientRelease: clipping={clipping!r} is not one of {RELEASE_CLIPPING}")
        self.optimizer, self.max_norm, self.clipping = optimizer, float(max_norm), clipping
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._numel = sum(p.numel() for p in params)  # a DTensor's numel is the whole parameter's
        self._previous_coef: torch.Tensor | None = None  # "previous_norm": the factor of the step before (None: 1)
        self._armed = False
        self._counter: LostUpdateCounter | None = None
        self._squares: SquareSums | None = None
        self._gates: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its gradient was finite) per hook
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(self._hook)

    @contextlib.contextmanager
    def backward(self, device: torch.device, count_lost_updates: bool = False) -> Iterator[list[BackwardResult]]:
        """Arm the hooks for the backward run inside the block; the result is appended to the yielded list."""
        self._armed, self._gates = True, []
        self._squares = SquareSums(device)
        self._counter = LostUpdateCounter() if count_lost_updates else None
        out: list[BackwardResult] = []
        try:
            yield out
        finally:
            self._armed = False
        finite = torch.stack([f for _, f in self._gates]) if self._gates else torch.ones(0, dtype=torch.bool)
        skipped = (~finite).sum().to(device)
        out.append(
            BackwardResult(self._squares, skipped, self._counter.result() if self._counter is not None else None)
        )

    def observe_norm(self, norm: torch.Tensor) -> None:
        """After a backward: the step's global gradient norm (all ranks'), from which "previous_norm" clips the next
        step. On the device, no host sync; a non-finite norm keeps the factor."""
        if self.max_norm > 0 and self.clipping == "previous_norm":
            old = self._previous_coef if self._previous_coef is not None else torch.ones_like(norm)
            self._previous_coef = torch.where(torch.isfinite(norm), clip_coefficient(norm, self.max_norm), old)

    @property
    def has_state(self) -> bool:
        """Whether a resume needs `state_dict` ("previous_norm" clipping's factor); the other rules keep none."""
        return self.max_norm > 0 and self.clipping == "previous_norm"

    def state_dict(self) -> dict:
        """What a resume needs: "previous_norm"'s factor (1.0 before the first step)."""
        return {
            "previous_coef": (
                self._previous_coef if self._previous_coef is not None else torch.ones((), dtype=torch.float32)
            )
            .detach()
            .cpu()
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self._previous_coef = state["previous_coef"].to(device=device, dtype=torch.float32)

    def uncount_skipped(self) -> None:
        """After a backward in which some rank skipped a parameter: take back the step counts of this rank's
        skipped parameters (a host sync per parameter, on this rare path only)."""
        for p, finite in self._gates:
            if not bool(finite):
                self.optimizer.uncount_step(p)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed:  # a backward outside a training step (a test's, a user's): keep the gradient
            return
        settle_gradient(p)  # a sequence-parallel norm's partial sums
        squares = grad_squares(p.grad)
        self._squares.add(squares, p.grad)
        finite = _on_every_shard(torch.isfinite(squares), p)  # on the device: no host sync (module docstring)
        if self.max_norm > 0:
            local(p.grad).mul_(self._coefficient(p, squares))  # as exact clipping scales a gradient
        self.optimizer.step_parameter(p, self._counter, gate=finite)
        self._gates.append((p, finite))
        p.grad = None

    def _coefficient(self, p: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """The clip factor of p's gradient (this rank's squares of it given) under the rule in force."""
        if self.clipping == "previous_norm":
            return self._previous_coef if self._previous_coef is not None else torch.ones_like(squares)
        share = self.max_norm * (p.numel() / self._numel) ** 0.5
        return clip_coefficient(norm_from_squares(squares, p), share)


def _on_every_shard(finite: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Whether the gradient is finite on every rank that holds a shard of `p` (FSDP2 and HSDP shard every parameter
    over all ranks, and replicas hold the same reduced gradient: the default group is the right one). One tiny
    all-reduce per parameter, queued on the device like the update it gates."""
    if not is_dtensor(p):
        return finite
    flag = finite.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()
