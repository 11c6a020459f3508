"""The precision-aware optimizer: AdamW with fp32 math and bf16 / fp32 / int8 / int4 state.

    adamw.py     the optimizer: state, steps, chunks, state_dict
    layout.py    the recipe's choices, each parameter's state layout, each step's scalars
    update.py    the update of one tensor, run eagerly or as one torch.compile'd kernel (compile=True)
    rounding.py  nearest, stochastic and Kahan-compensated rounding to bfloat16
    randbits.py  the random bits of stochastic rounding: a keyed hash of each element's index
    quant.py     block-wise int8 and int4 moments (code maps, absmax per block; nearest or stochastic codes)
    sharding.py  FSDP2 (DTensor) parameters: which shard a rank holds, block scales per shard, packed int4 codes
    release.py   gradient release (optimizer.in_backward): each update in the backward, gradients freed at once
"""

from __future__ import annotations

import torch

from .adamw import AdamW, UpdateStats
from .layout import COMPENSATIONS, MOMENTS_ROUNDINGS, STATE_DTYPES, ParamLayout
from .rounding import stochastic_round

__all__ = [
    "AdamW",
    "ParamLayout",
    "UpdateStats",
    "build_optimizer",
    "param_groups",
    "stochastic_round",
    "STATE_DTYPES",
    "COMPENSATIONS",
    "MOMENTS_ROUNDINGS",
]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, nanoGPT's rule: matrices (ndim >= 2) decay; norms and biases (ndim < 2) don't."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    state_dtype: str = "auto",
    compensation: str = "none",
    seed: int = 0,
    moments_rounding: str = "auto",
    compile: bool = False,
) -> AdamW:
    """The AdamW of a training run: weight decay on matrices only, the recipe's state and rounding."""
    return AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
        weight_decay=weight_decay, state_dtype=state_dtype, compensation=compensation, seed=seed,
        moments_rounding=moments_rounding, compile=compile,
    )
