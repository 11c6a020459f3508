"""``leantrain eval``: the mean loss and perplexity of a checkpoint or a Hugging Face model over some data.

Which data: with ``--data.path`` on the command line, all of it (every document or SFT sample of
that path: it is taken to be an evaluation set). Without it, the held-out split (the last 5%) of the
checkpoint run's data.path (or of the default data for an HF model), the split training never sees.
Every batch of it is used unless ``--eval.steps=N`` is given on the command line (then the first N).

The loss is the mean over every predicted token (SFT: every response token; chat: every assistant token),
not a mean of batch means, and the perplexity is exp of it. Both are printed and written as JSON to ``--out FILE``,
or to ``eval-step-N.json`` in the checkpoint's run folder, or ``eval.json`` in job.dump_folder for an HF model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from . import parallel
from .config import Config
from .data import build_datasets, build_eval_dataset
from .loader import load_for_inference
from .metrics import write_json
from .model import batch_loss
from .precision import IGNORE_INDEX, Precision


@dataclass(frozen=True)
class EvalResult:
    loss: float  # the mean over every labelled token of the batches
    tokens: int
    batches: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    precision: Precision,
    device: torch.device,
    sharded: bool = False,
) -> EvalResult:
    """The token-weighted mean loss over ``batches`` (the one evaluation of training and of ``leantrain eval``).

    Each batch's mean loss (fp32) is weighted by its labelled tokens relative to the first batch's, summed in
    fp32 on the device and divided by the summed weights; one host sync at the end. That is the mean over every
    labelled token, and where every batch has the same count (packed text, whose windows are all labelled) each
    weight is exactly 1, so it is bitwise the plain mean of the batch means. ``sharded``: the model is under FSDP2
    (every rank must evaluate the same batches)."""
    model.eval()
    total, weights = torch.zeros((), device=device), torch.zeros((), device=device)
    tokens, reference, n = torch.zeros((), dtype=torch.int64, device=device), None, 0
    for batch in batches:  # (inputs, labels), or (inputs, labels, positions) for packed SFT samples
        batch = [t.to(device) for t in batch]
        labels = batch[1]
        with precision.autocast(device, sharded):
            loss = batch_loss(model, batch)
        count = (labels != IGNORE_INDEX).sum()
        reference = count.clamp(min=1) if reference is None else reference
        tokens += count
        weight = count / reference  # int64 / int64: fp32, exactly 1.0 for equal counts
        total += torch.where(count > 0, loss * weight, 0.0)  # a batch without labels is NaN (0/0) and weighs 0
        weights += weight
        n += 1
    if sharded:
        parallel.reshard(model)
    model.train()
    if not n:
        return EvalResult(float("nan"), 0, 0)
    loss, tokens = (total / weights).item(), int(tokens)
    return EvalResult(loss if tokens else float("nan"), tokens, n)


def _dataset(cfg: Config, tokenizer: Any, whole_path: bool) -> tuple[Any, str]:
    if not whole_path:
        return build_datasets(cfg.data, tokenizer, cfg.job.seed, tokenizer_path=cfg.tokenizer.path)[
            1
        ], "held-out split (last 5%)"
    return build_eval_dataset(cfg.data, tokenizer, cfg.job.seed, tokenizer_path=cfg.tokenizer.path), "all"


def run_eval(checkpoint_path: str | None, overrides: dict[str, str], out: str | None = None) -> dict[str, Any]:
    """What ``leantrain eval`` does; returns the JSON it writes."""
    loaded = load_for_inference("eval", checkpoint_path, overrides)
    plan, model, tokenizer = loaded.plan, loaded.model, loaded.tokenizer
    cfg, device = plan.config, plan.parallel.device
    data, split = _dataset(cfg, tokenizer, whole_path="data.path" in overrides)
    max_batches = cfg.eval.steps if "eval.steps" in overrides else None
    measured = evaluate(model, data.eval_batches(max_batches), plan.precision, device)
    result = {
        **loaded.source,
        "loss": measured.loss,
        "perplexity": measured.perplexity,
        "tokens": measured.tokens,
        "batches": measured.batches,
        "data": cfg.data.path,
        "format": cfg.data.format,
        "split": split,
        "seq_len": cfg.data.seq_len,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    default_name = f"eval-step-{loaded.source['step']}.json" if "step" in loaded.source else "eval.json"
    path = out or str(plan.paths.folder / default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, result)
    print(
        f"leantrain: eval loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} over "
        f"{result['tokens']:,} tokens ({result['batches']} batches; data {cfg.data.path}, {split}). "
        f"Written to {path}",
        flush=True,
    )
    return result
