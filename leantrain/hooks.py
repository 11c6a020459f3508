"""Fault injection points: a test passes a :class:`Hooks` subclass to the trainer; a real run gets these no-ops.

The two moments that tests of the fault matrix need (tests/faults_runner.py builds them from its command line):
the middle of a checkpoint save, after DCP has written the data but before leantrain.json and the rename (a kill
or a signal there must leave the previous checkpoint the latest complete one), and the gradient norm of a step
(an Inf norm, as if a gradient had overflowed, must skip that step's update). A benchmark uses a third: the
batches of a step (benchmarks/convergence.py swaps in random tokens to provoke a loss spike)."""

from __future__ import annotations

import torch


class Hooks:
    """Where faults can be injected; every method does nothing here."""

    def checkpoint_written(self, step: int) -> None:
        """Called after DCP has written checkpoint ``step``'s files, before leantrain.json and the rename."""

    def grad_norm(self, step: int, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm that step ``step``'s guard sees (and logs); the gradients themselves are untouched."""
        return norm

    def batches(self, step: int, batches: list) -> list:
        """The micro-batches step ``step`` trains on (a benchmark swaps in a batch of random tokens: a loss spike)."""
        return batches
