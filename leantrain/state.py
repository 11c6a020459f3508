"""The training state that a checkpoint holds and a resume restores, as one DCP ``Stateful``.

step                            optimizer steps taken
model.<name>                    get_model_state_dict: the parameters in the storage dtype (an FSDP2 rank: its
                                shards, as DTensors, which DCP saves and reshards)
optimizer.state.<name>.<buf>    get_optimizer_state_dict: every AdamW buffer (step, moments as fp32 / bf16 or
                                int8 codes + fp32 scales, kahan_comp), keyed by parameter name
optimizer.param_groups.<i>.*    hyperparameters, the recipe keys, the group's parameter names (the
                                stochastic-rounding bits need no state: optim/randbits.py)
lr_scheduler.*                  LambdaLR.state_dict()
release.previous_coef           gradient release's clip factor, only under "previous_norm" clipping
                                (optim/release.py)
data.*                          the position in the training data (epoch, position) and its identity
rng.torch / rng.cuda            the global RNG state (leantrain seeds every rank the same, so one copy)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


@dataclass
class TrainState(Stateful):
    """Model, optimizer, schedule, data position, step and RNG: what train_step advances and a checkpoint keeps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: Any  # PackedDataset | SftDataset | PackedSftDataset: next_batch(), state_dict(), load_state_dict()
    step: int = 0
    release: Any = None  # optim.release.GradientRelease, with optimizer.in_backward

    def allocate_optimizer_state(self) -> None:
        """Every optimizer buffer, as the first step would create it (zeros, step 0), if not there yet: a
        checkpoint is loaded into them, and one saved after only skipped (NaN/Inf) steps still has them all."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.init_state(p)

    def state_dict(self) -> dict[str, Any]:
        self.allocate_optimizer_state()
        return {
            "step": self.step,
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "lr_scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "rng": _rng_state(),
            **({"release": self.release.state_dict()} if self._release_has_state else {}),
        }

    @property
    def _release_has_state(self) -> bool:
        return self.release is not None and self.release.has_state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a state dict shaped like :meth:`state_dict` (DCP has loaded the values into it)."""
        set_model_state_dict(self.model, state_dict["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state_dict["optimizer"])
        self.scheduler.load_state_dict(state_dict["lr_scheduler"])
        # The learning rate of the next step from this run's schedule (equal to the saved one unless
        # training.steps changed).
        lrs = [
            base * fn(self.scheduler.last_epoch) for fn, base in zip(self.scheduler.lr_lambdas, self.scheduler.base_lrs)
        ]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        self.data.load_state_dict(state_dict["data"])
        if self._release_has_state:
            self.release.load_state_dict(state_dict["release"], next(self.model.parameters()).device)
        torch.set_rng_state(state_dict["rng"]["torch"])
        if "cuda" in state_dict["rng"]:
            torch.cuda.set_rng_state(state_dict["rng"]["cuda"])
        self.step = int(state_dict["step"])
