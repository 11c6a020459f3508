"""``leantrain eval``: the mean loss and perplexity of a checkpoint or a Hugging Face model over some data.

Which data: with ``--data.path`` on the command line, all of it (every document or SFT sample of
that path: it is taken to be an evaluation set). Without it, the held-out split (the last 5%) of the
checkpoint run's data.path (or of the default data for an HF model), the split training never sees.
Every batch of it is used unless ``--eval.steps=N`` is given on the command line (then the first N).

The loss is the mean over every predicted token (SFT: every response token), not a mean of batch
means, and the perplexity is exp of it. Both are printed and written as JSON to ``--out FILE``, or to
``eval-step-N.json`` in the checkpoint's run folder, or ``eval.json`` in job.dump_folder for an HF model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, precision
from .config import Config, load_config, resolve_dump_folder
from .data import PackedDataset, SftDataset, build_datasets, build_tokenizer, load_documents, load_sft_samples
from .errors import ConfigError
from .metrics import write_json


@torch.no_grad()
def loss_over(model: nn.Module, data: PackedDataset | SftDataset, cfg: Config, device: torch.device,
              max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss (fp32 loss, fp64 sums) and perplexity over ``data.eval_batches``."""
    model.eval()
    total, tokens, batches = 0.0, 0, 0
    for inputs, labels in data.eval_batches(max_batches):
        with precision.autocast(cfg, device):
            logits = model(inputs.to(device))
        labels = labels.to(device)
        total += precision.cross_entropy(logits, labels, reduction="sum").double().item()
        tokens += int((labels != -100).sum())
        batches += 1
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens,
            "batches": batches}


def _dataset(cfg: Config, tokenizer: Any, whole_path: bool) -> tuple[PackedDataset | SftDataset, str]:
    d = cfg.data
    if not whole_path:
        return build_datasets(d, tokenizer, cfg.job.seed)[1], "held-out split (last 5%)"
    if d.format == "sft":
        data = SftDataset(load_sft_samples(d.path), tokenizer, d.seq_len, d.local_batch_size, cfg.job.seed,
                          shuffle=False, name="eval")
    else:
        data = PackedDataset(load_documents(d.path), tokenizer, d.seq_len, d.local_batch_size, cfg.job.seed,
                             shuffle=False, name="eval")
    return data, "all"


def run_eval(checkpoint_path: str | None, overrides: dict[str, str], out: str | None = None) -> dict[str, Any]:
    """What ``leantrain eval`` does; returns the JSON it writes."""
    from .train import default_device

    device = default_device()
    hf_path = overrides.get("model.hf_checkpoint")
    if bool(checkpoint_path) == bool(hf_path):
        raise ConfigError("leantrain eval needs exactly one model: --checkpoint DIR (a leantrain checkpoint) or "
                          "--model.hf_checkpoint=DIR (a Hugging Face Llama folder).")
    if checkpoint_path:
        model, info = checkpoint.load_model(checkpoint_path, device)
        cfg = checkpoint.saved_config(info, overrides)
        source = {"checkpoint": info["path"], "step": info["step"]}
        if "job.dump_folder" not in overrides:  # the run that holds the checkpoint
            cfg.job.dump_folder = str(Path(info["path"]).parent.joinpath(*[".."] * len(
                Path(cfg.checkpoint.folder).parts)).resolve())
        default_name = f"eval-step-{info['step']}.json"
    else:
        from .hf import load_hf

        cfg = load_config(None, overrides)
        model = load_hf(hf_path, precision.storage_dtype(cfg), device, max_seq_len=cfg.data.seq_len)
        source = {"hf_checkpoint": hf_path}
        default_name = "eval.json"
    if cfg.data.seq_len > model.args.max_seq_len:  # RoPE tables for longer sequences than trained on
        model.args.max_seq_len = cfg.data.seq_len
        model.init_rope()
    tokenizer = build_tokenizer(cfg.tokenizer.path)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"The tokenizer '{cfg.tokenizer.path}' has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocabulary of {model.args.vocab_size}: it is not the model's tokenizer. Set "
                          f"tokenizer.path to the tokenizer the model was trained with.")
    data, split = _dataset(cfg, tokenizer, whole_path="data.path" in overrides)
    max_batches = cfg.eval.steps if "eval.steps" in overrides else None
    result = {**source, **loss_over(model, data, cfg, device, max_batches), "data": cfg.data.path,
              "format": cfg.data.format, "split": split, "seq_len": cfg.data.seq_len,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    path = out or os.path.join(resolve_dump_folder(cfg), default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, result)
    print(f"leantrain: eval loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} over "
          f"{result['tokens']:,} tokens ({result['batches']} batches; data {cfg.data.path}, {split}). "
          f"Written to {path}", flush=True)
    return result
