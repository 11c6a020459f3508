"""The precision-aware optimizer: update rules with fp32 math and bf16 / fp32 / int8 / int4 state.

optimizer.py  the driver (LeanOptimizer: state, steps, chunks, gate, statistics, state_dict) and the rules as
              optimizers: AdamW, FactoredAdamW, Adafactor (OPTIMIZERS, by optimizer.name)
rules.py      the update rules: what each computes, element-wise or per matrix
codecs.py     the stored formats: each tensor's load as fp32 and store (bf16 nearest / stochastic / Kahan,
              int8, int4)
factored.py   Adafactor's factored second moment of a matrix (row and column EMAs), sharded or not
layout.py     the recipe's choices, each parameter's state layout, each step's scalars
update.py     the element-wise update of one tensor, run eagerly or as one torch.compile'd kernel
rounding.py   nearest, stochastic and Kahan-compensated rounding to bfloat16
randbits.py   the random bits of stochastic rounding: a keyed hash of each element's index
quant.py      block-wise int8 and int4 moments (code maps, absmax per block; nearest or stochastic codes)
sharding.py   FSDP2 (DTensor) parameters: which shard a rank holds, block scales per shard, packed int4 codes
release.py    gradient release (optimizer.in_backward): each update in the backward, gradients freed at once
"""

from __future__ import annotations

import torch

from .layout import COMPENSATIONS, MOMENTS_ROUNDINGS, STATE_DTYPES, ParamLayout
from .optimizer import HYPERPARAMETERS, OPTIMIZERS, Adafactor, AdamW, FactoredAdamW, LeanOptimizer, UpdateStats
from .release import RELEASE_CLIPPING
from .rounding import stochastic_round
from .rules import RULES

__all__ = [
    "Adafactor",
    "AdamW",
    "FactoredAdamW",
    "HYPERPARAMETERS",
    "LeanOptimizer",
    "OPTIMIZERS",
    "RELEASE_CLIPPING",
    "ParamLayout",
    "RULES",
    "UpdateStats",
    "build_optimizer",
    "param_groups",
    "stochastic_round",
    "STATE_DTYPES",
    "COMPENSATIONS",
    "MOMENTS_ROUNDINGS",
]


def param_groups(model: torch.nn.Module, weight_decay: float, factored: bool = False) -> list[dict]:
    """nanoGPT's rule: matrices (ndim >= 2) decay; norms and biases (ndim < 2) don't. `factored`: the 2-D weights
    of the transformer blocks (`model.layers`) form a group of their own, marked "factored" (the matrices a
    factoring rule keeps v as factors for); the embedding and the output layer stay with the other matrices."""
    in_blocks = {id(p) for p in model.layers.parameters()} if factored else set()
    blocks, decay, no_decay = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if p.ndim == 2 and id(p) in in_blocks:
                blocks.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": blocks, "weight_decay": weight_decay, "factored": True}] if blocks else []
    groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module, name: str = "AdamW", *, seed: int = 0, compile: bool = False, **hyperparameters
) -> LeanOptimizer:
    """The optimizer of a training run: rule `name` (optimizer.name), weight decay on matrices only, the recipe's
    state and rounding (`hyperparameters`: HYPERPARAMETERS, as config.Optimizer names them)."""
    cls = OPTIMIZERS[name]
    groups = param_groups(model, hyperparameters.get("weight_decay", 0.01), factored=cls.rule.factors_matrices)
    if "betas" in hyperparameters:
        hyperparameters["betas"] = tuple(hyperparameters["betas"])
    return cls(groups, seed=seed, compile=compile, **hyperparameters)
