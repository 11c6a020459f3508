"""Update rules: what an optimizer computes, apart from how its state is stored (codecs.py) and driven (optimizer.py).

A rule declares its state and how it runs:

    AdamW           element-wise: m and v per element, in the recipe's format (torch.optim.AdamW's update).
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


ADAMW = Rule("AdamW", False, "AdamW: m and v per element (torch.optim.AdamW's update)")
FACTORED_ADAMW = Rule("FactoredAdamW", True, "AdamW with Adafactor's factored v for the blocks' matrices; m per "
                                             "element; embedding, output and norms as AdamW")
RULES = {rule.name: rule for rule in (ADAMW, FACTORED_ADAMW)}
