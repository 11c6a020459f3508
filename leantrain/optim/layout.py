"""What one AdamW update reads besides the tensors: the recipe's choices, a parameter's state layout, a step's scalars.

A parameter's layout (`ParamLayout`) follows from its group's recipe (state_dtype, compensation,
moments_rounding) and the parameter's dtype and size; the optimizer decides it once, when the parameter's
state is initialised, and the step, `load_state_dict`'s check and the planner read
it. It is not saved: the recipe is (in the param groups), and the layout follows from it.

A step's scalars (`StepScalars`) follow from the group's hyperparameters and the step number; the eager
ops take them as Python floats, the compiled kernel as one fp32 tensor (`StepScalars.as_tensor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..utils import small_tensor
from . import quant

# The recipe's choices (config.py's choices are these)
STATE_DTYPES = ("auto", "float32", "bfloat16", "int8", "int4", "int4-int8")
COMPENSATIONS = ("none", "stochastic", "kahan")
MOMENTS_ROUNDINGS = ("auto", "nearest", "stochastic")

NO_FIELD = -1  # a buffer rounded to nearest uses no random field

_QUANT_BUFFERS = ("exp_avg_codes", "exp_avg_scale", "exp_avg_sq_codes", "exp_avg_sq_scale")  # int8, int4, int4-int8
_FLOAT_BUFFERS = ("exp_avg", "exp_avg_sq")
FACTOR_BUFFERS = ("exp_avg_sq_row", "exp_avg_sq_col")  # a factored v (factored.py), in place of exp_avg_sq


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter's optimizer state is stored and rounded.

    moments: 'float32', 'bfloat16', 'int8', 'int4' or 'int4-int8' (codes + per-block scales: quant.STORAGES).
    factored: v is kept as fp32 row and column factors (factored.py), not per element; m as `moments` says.
    first_moment: m is kept (False: a rule without one, whose update takes the gradient itself).
    kahan: a bf16 `kahan_comp` buffer carries what the weight's rounding loses.
    weight_field, exp_avg_field, exp_avg_sq_field: the index of the random field that rounds the weight
        (with Kahan: the `kahan_comp` buffer; the weight itself is rounded to nearest), exp_avg and
        exp_avg_sq (bf16 values or int8 codes) stochastically, or NO_FIELD (-1) for nearest rounding (or no
        rounding: fp32 storage).
    num_fields: how many random fields a step computes for this parameter.
    buffers: the keys of its state, in the order they are allocated ('step' first).
    """

    moments: str
    factored: bool
    first_moment: bool
    kahan: bool
    weight_field: int
    exp_avg_field: int
    exp_avg_sq_field: int
    num_fields: int
    buffers: tuple[str, ...]

    @property
    def fields(self) -> tuple[int, int, int]:
        """(weight_field, exp_avg_field, exp_avg_sq_field)."""
        return self.weight_field, self.exp_avg_field, self.exp_avg_sq_field

    @classmethod
    def decide(
        cls,
        *,
        state_dtype: str,
        compensation: str,
        moments_rounding: str,
        param_dtype: torch.dtype,
        numel: int,
        last_dim: int = 2,
        factored: bool = False,
        first_moment: bool = True,
    ) -> ParamLayout:
        """The layout of a parameter of `param_dtype` and `numel` elements (a DTensor's: global), whose last
        dimension has `last_dim` elements, under a recipe; `factored`: its rule keeps v as factors (a matrix)."""
        moments = _moment_storage(state_dtype, param_dtype, numel, last_dim)
        bf16_weight = param_dtype == torch.bfloat16
        kahan = compensation == "kahan" and bf16_weight  # an fp32 weight takes the fp32 result exactly
        stochastic_moments = rounds_moments_stochastically(compensation, moments_rounding)
        stochastic_weight = compensation == "stochastic" and bf16_weight
        rounded_moments = stochastic_moments and moments != "float32"  # bf16 values or int8 codes
        rounded_stochastically = (
            stochastic_weight or (kahan and stochastic_moments),  # weight or kahan_comp
            rounded_moments and first_moment,  # exp_avg
            rounded_moments and not factored,
        )  # exp_avg_sq (factors: fp32)
        fields, count = [], 0
        for stochastic in rounded_stochastically:
            fields.append(count if stochastic else NO_FIELD)
            count += int(stochastic)
        per_moment = _QUANT_BUFFERS if moments in quant.STORAGES else _FLOAT_BUFFERS
        half = len(per_moment) // 2
        m_buffers = per_moment[:half] if first_moment else ()
        v_buffers = FACTOR_BUFFERS if factored else per_moment[half:]
        buffers = ("step", *m_buffers, *v_buffers, *(("kahan_comp",) if kahan else ()))
        return cls(moments, factored, first_moment, kahan, *fields, num_fields=count, buffers=buffers)


def rounds_moments_stochastically(compensation: str, moments_rounding: str) -> bool:
    """Whether a recipe writes its low-precision moments (bf16 values, int8 codes) stochastically."""
    return moments_rounding == "stochastic" or (moments_rounding == "auto" and compensation != "none")


def _moment_storage(state_dtype: str, param_dtype: torch.dtype, numel: int, last_dim: int) -> str:
    if state_dtype == "auto":
        return "float32" if param_dtype == torch.float32 else "bfloat16"
    if state_dtype in quant.STORAGES:  # small tensors (norms, biases) are not worth it
        packs = not quant.STORAGES[state_dtype].packs or last_dim % 2 == 0  # int4 codes pack pairs along it
        return state_dtype if numel >= quant.MIN_NUMEL and packs else "bfloat16"
    return state_dtype


class StepScalars(NamedTuple):
    """The scalars of one AdamW step of a parameter group, named as the update uses them.

    Python floats (computed in double) for the eager ops, which cast each to fp32; `as_tensor` packs the same
    fp32 values for the compiled kernel, which unpacks them with `StepScalars(*tensor.unbind())`.
    """

    decay: float  # 1 - lr * wd: the weight's factor
    neg_lr_wd: float  # -lr * wd: the weight-decay part of Kahan's delta
    neg_step_size: float  # -lr / (1 - beta1^t)
    bc2_sqrt: float  # sqrt(1 - beta2^t)
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float

    @classmethod
    def of(cls, group: dict, step: float, first_moment: bool = True) -> StepScalars:
        """`first_moment` False: a rule without m (its step takes the gradient, which needs no bias correction)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            raise ValueError("AdamW: a tensor lr is not supported; use a float")
        lr, wd, (beta1, beta2) = float(lr), group["weight_decay"], group["betas"]
        beta1 = beta1 if first_moment else 0.0
        return cls(
            decay=1 - lr * wd,
            neg_lr_wd=-lr * wd,
            neg_step_size=-(lr / (1 - beta1**step)),
            bc2_sqrt=math.sqrt(1 - beta2**step),
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            eps=group["eps"],
        )

    def as_tensor(self, device) -> torch.Tensor:
        """One fp32 tensor on `device`. Python floats would be baked into the compiled graph (a recompile at every
        step for lr and the bias corrections), and even constant ones made the int8 kernel slower (measured)."""
        return small_tensor(list(self), torch.float32, device)
