"""Update rules: what an optimizer computes, apart from how its state is stored (codecs.py) and driven (optimizer.py).

A rule declares its state and how it runs:

    AdamW           element-wise: m and v per element, in the recipe's format (torch.optim.AdamW's update).
    Adafactor       FactoredAdamW's v with no first moment (Adafactor's beta1 = 0, Shazeer & Stern 2018): the step is
                    g / (sqrt(v_hat) + eps), each tensor's step clipped to an RMS of at most 1 (Adafactor's update
                    clipping, d = 1), an absolute lr (not Adafactor's relative step), Adam's bias correction of v.
                    Without m a step is as noisy as its gradient: the clip bounds the steps where v lags g²
                    (AdaLomo, arXiv 2310.10195, takes the same road with grouped update normalization).
    FactoredAdamW   per matrix, then element-wise: for the 2-D weights of the transformer blocks, v is kept as
                    Adafactor's factors (the EMAs of g²'s row and column means, fp32, O(rows + cols): factored.py)
                    and read back as their outer product over their mean, with Adam's bias correction and eps; m
                    stays per element in the recipe's format. Every other tensor (embedding, output layer, norms)
                    keeps AdamW's per-element m and v (Zhao et al. 2024, arXiv 2407.07972: full adaptivity where the
                    factored estimate suits least).

Which tensors a rule factors is said by the param groups (`param_groups(..., factored=True)` marks the blocks'
matrices with "factored": True); a rule that does not factor refuses such a group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str  # optimizer.name
    factors_matrices: bool  # keeps v as row/column factors for the matrices its param groups mark "factored"
    summary: str
    first_moment: bool = True  # keeps m (False: the step takes the gradient itself)
    update_clip: float = 0.0  # > 0: each tensor's step scaled to an RMS of at most this (Adafactor's d)


ADAMW = Rule("AdamW", False, "AdamW: m and v per element (torch.optim.AdamW's update)")
FACTORED_ADAMW = Rule(
    "FactoredAdamW",
    True,
    "AdamW with Adafactor's factored v for the blocks' matrices; m per element; embedding, output and norms as AdamW",
)
ADAFACTOR = Rule(
    "Adafactor",
    True,
    "no m; v factored for the blocks' matrices, per element elsewhere; each tensor's step clipped to RMS 1",
    first_moment=False,
    update_clip=1.0,
)
RULES = {rule.name: rule for rule in (ADAMW, FACTORED_ADAMW, ADAFACTOR)}
