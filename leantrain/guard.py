"""What keeps a long run safe mid-way: the non-finite step guard and the stop signals.

**Non-finite steps.** After the backward, :meth:`NonFiniteGuard.check` looks at the step's loss and global gradient
norm. When either is NaN or Inf the trainer skips the update: ``optimizer.step()`` is not called, so neither the
weights nor any optimizer buffer (moments, Kahan buffer, Adam's step count, and so the stochastic rounding's keyed
random bits, which are a function of seed, parameter and step) changes, and the gradients are dropped. The step
still counts: its batch is consumed and the learning-rate schedule advances (the schedule is a function of the step
number, so a resumed or skipped-over run stays on the same curve). The step is logged to metrics.jsonl with
``"skipped": true`` (a NaN/Inf loss or norm is written as null, which JSON allows), every later record carries
``skipped_nonfinite`` (steps skipped so far), and a warning names the step. After ``training.max_nonfinite_steps``
skipped steps in a row the run stops with :class:`TrainingDiverged` (exit code 3). Independently, :func:`all_finite`
is checked before every checkpoint save, so no checkpoint is ever written from NaN/Inf weights (e.g. after a finite
but far too large update).

*Cost.* The decision needs the flag on the host: one ``.tolist()`` of a 2-element tensor per step, i.e. one
device-to-host sync after the backward. On CPU it is free. On a GPU the CPU waits for the backward to
finish before it launches the optimizer's kernels, so the device idles for about one kernel-launch
latency per step (tens of microseconds against steps of tens of milliseconds or more). A sync-free skip
(``torch.where`` on a device flag inside the optimizer, as fused torch AdamW does with ``found_inf``) would
need the optimizer to take the flag, and the consecutive count would still need a host read now and
then; we keep the simple, exact version.

*Distributed.* Each rank's loss covers only its part of the batch, so the flag, together with the stop request
below, is all-reduced (MAX over all ranks, the default process group that torchrun's ranks form) before anyone
decides: every rank skips, or stops, at the same step. Over the world, not over the data-parallel ranks that the
loss mean and the token counts sum over: a tensor-parallel group's ranks hold parts of the same weights and must
skip the same steps as the others. It is one extra collective of 2 integers per step, only when the world size is
above 1.

**Stop signals.** The command line wraps training in :func:`stop_on_signals`: the first SIGTERM or SIGINT
only sets a flag; the trainer finishes the step in flight, saves a checkpoint (checkpoint.enable), says
where, and exits with code 0 (under torchrun, the flag is all-reduced with the non-finite one, so every rank
stops after the same step even when only one got the signal). A second signal, at least SAME_REQUEST_S
after the first (closer ones are the same request delivered twice: a terminal's Ctrl-C reaches every
process of the group and torchrun forwards its own copy), exits at once with 128 + its number (SIGINT 130,
SIGTERM 143), from wherever the process is, even mid-save: checkpoints are written to step-N.tmp and
renamed when complete, and metrics.jsonl is written a whole line at a time, so nothing saved before is
damaged. Once the stop is honoured (saved, training returned), stop signals are ignored while the process
exits: there is nothing left to interrupt.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from . import distributed
from .errors import TrainingDiverged


def _warn(message: str) -> None:
    if distributed.is_main():
        print(f"leantrain: warning: {message}", file=sys.stderr, flush=True)


class NonFiniteGuard:
    """Decides, once per step, whether the update is taken (finite loss and gradient norm) and whether a stop
    signal ends the run after this step; counts the skipped steps. See the module docstring."""

    def __init__(self, max_consecutive: int, world_size: int = 1, records: Iterable[dict[str, Any]] = ()):
        """``records``: metrics already logged by the run (a resumed run continues its count of skipped steps)."""
        self.max_consecutive = max_consecutive
        self.world_size = world_size
        self.consecutive = 0  # skipped steps in a row, up to the last checked one
        self.total = max((r.get("skipped_nonfinite", 0) for r in records), default=0)
        self.last_skipped = False
        self.step = 0  # the last checked step

    def check(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[bool, bool]:
        """(take the update?, stop after this step?): one host sync, the same answer on every rank. ``grad_norm``
        None: the loss alone decides (gradient release checks it before the backward, see `check_released`)."""
        loss_only = grad_norm is None
        if loss_only:
            grad_norm = torch.zeros_like(loss_sum)
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        flags = torch.stack((bad, torch.full_like(bad, stop_requested() is not None))).int()
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = (bool(f) for f in flags.tolist())  # the step's one device-to-host sync
        self.step, self.last_skipped = step, nonfinite
        if not nonfinite:
            self.consecutive = 0
            return True, stop
        self.consecutive += 1
        self.total += 1
        loss, norm = (f"{v:g}" for v in torch.stack((loss_sum.float(), grad_norm.float())).tolist())
        where = " on this rank (or NaN/Inf on another)" if self.world_size > 1 else ""
        seen = (
            " (before the backward, which was skipped: optimizer.in_backward)"
            if loss_only
            else f", gradient norm {norm}"
        )
        _warn(
            f"step {step}: loss {loss}{seen}{where}: the update was skipped, the weights and "
            f"optimizer state are unchanged ({self.consecutive} such step(s) in a row; the run stops at "
            f"training.max_nonfinite_steps = {self.max_consecutive})."
        )
        return False, stop

    def check_released(self, step: int, skipped_params: torch.Tensor) -> bool:
        """Gradient release (optim/release.py), after the backward of a step whose loss was finite: whether some
        rank skipped a parameter's update for a NaN/Inf gradient (agreed over ranks; release.py skips a parameter
        on every rank that holds a shard of it, so the count is the same on all of them). Such a step counts as a
        skipped one (towards training.max_nonfinite_steps, and in metrics.jsonl), though the other parameters'
        updates were applied."""
        skipped = skipped_params.clone()  # on the device: the step's one sync is below
        if self.world_size > 1:
            dist.all_reduce(skipped, op=dist.ReduceOp.MAX)  # the gloo/nccl default group, as in check
        if not int(skipped):
            return False
        self.consecutive += 1
        self.total += 1
        self.last_skipped = True
        _warn(
            f"step {step}: the gradient of {int(skipped)} parameter(s) was NaN/Inf although the loss was finite: "
            f"their updates were skipped (weights and moments unchanged), the other parameters' updates of this "
            f"step were applied during the backward (optimizer.in_backward) ({self.consecutive} such step(s) in a "
            f"row; the run stops at training.max_nonfinite_steps = {self.max_consecutive})."
        )
        return True

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def annotate(self, record: dict[str, Any]) -> dict[str, Any]:
        """Mark a metrics record of the last checked step: NaN/Inf values become null (JSON has no NaN),
        ``skipped`` on a skipped step, ``skipped_nonfinite`` (count so far) once any step was skipped."""
        for key in ("loss", "grad_norm"):
            if isinstance(record.get(key), float) and not math.isfinite(record[key]):
                record[key] = None
        if self.last_skipped:
            record["skipped"] = True
        if self.total:
            record["skipped_nonfinite"] = self.total
        return record

    def raise_diverged(
        self, latest_checkpoint: Any = None, checkpointing: bool = False, weights_finite: bool = True
    ) -> None:
        """Stop the run with exit code 3 (once :attr:`diverged`). ``weights_finite``: whether the weights kept (those
        before the skipped steps) are free of NaN/Inf, which an earlier, finite but huge update may have broken."""
        step, first = self.step, self.step - self.consecutive + 1
        if latest_checkpoint is not None:
            saved = (
                f"The latest checkpoint is {latest_checkpoint}; resuming from it as it is repeats the same "
                f"steps, so change something first (e.g. lower optimizer.lr, in a new job.dump_folder)."
            )
        elif checkpointing:
            saved = "No checkpoint was saved before this."
        else:
            saved = "checkpoint.enable is false, so nothing was saved."
        raise TrainingDiverged(
            f"Training diverged: the loss or gradient norm was NaN/Inf at {self.consecutive} steps in a row "
            f"(steps {first} to {step}; training.max_nonfinite_steps = {self.max_consecutive}). Those updates were "
            f"skipped, so the weights are those after step {first - 1}"
            f"{'' if weights_finite else ', which already hold NaN/Inf (an earlier update overflowed them)'}. {saved} "
            f"Usual remedies: a lower "
            f"optimizer.lr, a longer lr_scheduler.warmup_steps, gradient clipping (training.max_norm), or the "
            f"bf16-kahan / fp32 recipes; raise training.max_nonfinite_steps to ride out longer spikes."
        )


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """``scheduler.step()``, without torch's warning that it ran before any ``optimizer.step()`` (which is what
    a skipped first step does on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """No NaN/Inf in any of the tensors (each rank's own shards; agreed over all ranks when a process group
    exists). Uses each tensor's max-abs (NaN propagates), so it allocates nothing the size of a tensor."""
    shards = [distributed.local(t).detach() for t in tensors]
    shards = [t for t in shards if t.numel()]
    if not shards:
        return True
    ok = torch.stack(torch._foreach_norm(shards, math.inf)).isfinite().all().int()
    if distributed.world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ---- stop signals ---------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A signal this soon after the first is the same request delivered twice, not a second one: Ctrl-C in a terminal
# (or timeout, or a cluster's scheduler) signals the whole process group, and torchrun forwards its own copy.
SAME_REQUEST_S = 1.0
_received: int | None = None  # the first stop signal, while stop_on_signals is active
_received_at = 0.0
_TRAIN_ACTION = "finishing the current step, then saving a checkpoint and stopping"
_action = _TRAIN_ACTION  # what the command does when asked to stop, for the message


def stop_requested() -> int | None:
    """The signal number of the SIGTERM/SIGINT received under :func:`stop_on_signals`, or None."""
    return _received


def _on_signal(signum: int, frame: Any) -> None:
    global _received, _received_at
    name = signal.Signals(signum).name
    if _received is not None and time.monotonic() - _received_at < SAME_REQUEST_S:
        return  # a duplicate delivery of the first request
    if _received is not None:  # the second one: leave now; saved files stay consistent (module docstring)
        if distributed.is_main():
            os.write(2, f"\nleantrain: {name} again: exiting now without saving.\n".encode())
        os._exit(128 + signum)
    _received, _received_at = signum, time.monotonic()
    if distributed.is_main():  # os.write, not print: the signal may arrive in the middle of a print
        os.write(2, f"\nleantrain: {name} received: {_action} (send it again to stop at once).\n".encode())


@contextlib.contextmanager
def stop_on_signals(action: str = _TRAIN_ACTION) -> Iterator[None]:
    """While active, the first SIGTERM/SIGINT sets :func:`stop_requested` (the trainer stops cleanly after the
    step; ``leantrain prepare`` after the chunk) and a second exits the process at once with 128 + the signal
    number. ``action`` says what the command does before it stops. Outside the main thread, where Python cannot
    install handlers, it does nothing."""
    global _received, _action
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _received, _action = None, action
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        if _received is None:
            for s, handler in previous.items():
                signal.signal(s, handler)
        else:
            # The stop was honoured and saved; the process is about to exit. Ignore further stop signals: the
            # request's duplicate copy (process group + torchrun) can land after a fast final step and save,
            # and Python's finalization (about 0.5 s with torch loaded) resets Python-level handlers to the
            # default action, which would turn that duplicate into a death by signal instead of exit code 0.
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)


def signal_name(signum: int | None) -> str:
    """SIGTERM, SIGINT; under torchrun a rank may stop because another one got the signal."""
    return signal.Signals(signum).name if signum is not None else "a stop signal (received by another rank)"
