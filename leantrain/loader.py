"""What model and tokenizer a command uses, decided here for every command.

A command names its model one of three ways: flags (``model.flavor`` and the ``model.*`` dimensions, for a new
model), a Hugging Face folder (``model.hf_checkpoint``), or a leantrain run (``--checkpoint``: a run folder, its
checkpoints folder, a step-N folder, or a final ``model/`` folder), which brings the settings it was trained with.
The tokenizer is ``tokenizer.path``, with ``auto`` decided once (:func:`leantrain.runplan.tokenizer_path`: an
HF folder's own tokenizer.json, else ``byte``) when the run plan is resolved; an explicit ``--tokenizer.path``
always wins, and a tokenizer with more ids than the model's embedding rows (or, for an HF model, another size
than the folder's own tokenizer) is refused naming both sizes.

``train`` builds its model with :func:`build_model_for`; ``plan`` builds the same model on the meta device;
``eval`` and ``generate`` take :func:`load_for_inference`; ``export`` takes :func:`load_checkpoint` and
:func:`load_tokenizer`; ``compare`` checks the model against its tokenizer before any run
(:func:`check_model_and_tokenizer`); ``prepare`` tokenizes with the same ``tokenizer_path`` decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import Config, Model, load_config
from .data.tokenizer import Tokenizer, build_tokenizer, check_vocab
from .errors import ConfigError
from .families import family_names
from .model import TOKENIZER_SIZED_FLAVORS, Transformer, build_model, check_seq_len
from .runplan import RunPlan, precision_of, resolve, tokenizer_path

# The model.* keys that override a flavor's dimensions (0: the flavor's), and that an HF folder's config.json sets.
DIMENSION_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps")


def load_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of a config, tokenizer.path=auto decided as the run plan decides it."""
    return build_tokenizer(tokenizer_path(cfg))


def build_model_for(
    spec: Model,
    storage: torch.dtype,
    seq_len: int | None,
    seed: int | None,
    tokenizer: Tokenizer | None,
    tokenizer_name: str,
    device: torch.device | str,
    hf_weights: bool = True,
    positions: int | None = None,
) -> Transformer:
    """The model.* section's model in the storage dtype: the flavor with its overrides (debug and small sized to the
    tokenizer), or with model.hf_checkpoint the HF folder's model (its weights unless hf_weights=False: a resume,
    or the planner's meta model). Its vocabulary is checked against the tokenizer's, and ``seq_len`` (the longest
    sequence the command runs; None: generate, bounded by the model's own positions) against its positions.
    ``positions``: a flavor's max_seq_len instead of its own (the planner's, for any seq_len). ``tokenizer`` None:
    an HF folder's own, not read (the planner reads only its config.json)."""
    dims = {k: getattr(spec, k) for k in DIMENSION_KEYS}
    if spec.hf_checkpoint:
        return _hf_model(spec, dims, storage, seq_len, tokenizer, tokenizer_name, device, hf_weights, positions)
    assert tokenizer is not None, "a flavor is sized and checked by its tokenizer"
    if not dims["vocab_size"] and spec.flavor in TOKENIZER_SIZED_FLAVORS:
        dims["vocab_size"] = tokenizer.vocab_size
    try:
        model = build_model(spec.flavor, storage, device, seed=seed, max_seq_len=positions, **dims)
    except ValueError as e:
        raise ConfigError(f"The model dimensions are inconsistent: {e}. Fix the model.* keys.") from None
    if seq_len is not None:
        check_seq_len(seq_len, model.args, f"model.flavor={spec.flavor}")
    check_vocab(tokenizer.vocab_size, tokenizer_name, model.args.vocab_size)
    return model


def _hf_model(
    spec: Model,
    dims: dict[str, Any],
    storage: torch.dtype,
    seq_len: int | None,
    tokenizer: Tokenizer | None,
    tokenizer_name: str,
    device: torch.device | str,
    weights: bool,
    positions: int | None,
) -> Transformer:
    from .hf import load_hf

    model = load_hf(spec.hf_checkpoint, storage, device, max_seq_len=seq_len or positions, weights=weights)
    if seq_len is not None:
        check_seq_len(seq_len, model.args, f"the model in model.hf_checkpoint='{spec.hf_checkpoint}'")
    for key, value in dims.items():
        if value and getattr(model.args, key) != value:
            raise ConfigError(
                f"model.{key} = {value!r}, but the model in model.hf_checkpoint="
                f"'{spec.hf_checkpoint}' has {key} = {getattr(model.args, key)!r} (from its "
                f"config.json). Leave model.{key} unset when loading a Hugging Face model."
            )
    if tokenizer is not None:
        check_vocab(tokenizer.vocab_size, tokenizer_name, model.args.vocab_size, hf_folder=spec.hf_checkpoint)
    return model


def check_model_and_tokenizer(cfg: Config) -> None:
    """The model and tokenizer a train of ``cfg`` would use fit each other (built on the meta device: no weights are
    read), so that compare refuses a mismatch before its first run rather than in it."""
    tokenizer = load_tokenizer(cfg)
    build_model_for(
        cfg.model,
        precision_of(cfg).storage,
        cfg.data.seq_len,
        None,
        tokenizer,
        tokenizer_path(cfg),
        "meta",
        hf_weights=False,
    )


def model_name(spec: Model, model: Transformer) -> str:
    """'llama3 small', or for a Hugging Face folder its model_type and path ('qwen2 path/to/Qwen2.5-0.5B')."""
    if spec.hf_checkpoint:
        return f"{model.args.family} {spec.hf_checkpoint}"
    return f"llama3 {spec.flavor}"


@dataclass(frozen=True)
class Loaded:
    """A trained model ready to run, with everything a command says about where it came from."""

    plan: RunPlan  # the config (the run's own for a checkpoint, with the command's overrides) resolved
    model: Transformer  # on plan.parallel.device, in its storage dtype
    tokenizer: Tokenizer
    source: dict[str, Any]  # {"checkpoint": path, "step": N} or {"hf_checkpoint": path}


def load_checkpoint(path: str, overrides: dict[str, Any] | None = None) -> tuple[Transformer, Config, dict]:
    """A leantrain checkpoint's model (on the CPU), its run's config with ``overrides`` on top (job.dump_folder the
    run's folder unless overridden), and its info."""
    model, info = checkpoint.load_model(path)
    run_folder = str(checkpoint.run_folder_of(Path(info["path"]), info))
    return model, checkpoint.saved_config(info, {"job.dump_folder": run_folder, **(overrides or {})}), info


def load_for_inference(command: str, checkpoint_path: str | None, overrides: dict[str, Any]) -> Loaded:
    """``eval`` and ``generate``: exactly one of a leantrain checkpoint or model.hf_checkpoint, with its tokenizer
    (the run's, or the HF folder's own tokenizer.json; --tokenizer.path overrides either). eval runs data.seq_len
    windows, checked against the model's positions; generate is bounded by the positions themselves."""
    hf_path = overrides.get("model.hf_checkpoint")
    if bool(checkpoint_path) == bool(hf_path):
        raise ConfigError(
            f"leantrain {command} needs exactly one model: --checkpoint DIR (a leantrain run or "
            f"checkpoint) or --model.hf_checkpoint=DIR (a Hugging Face {family_names()} folder)."
        )
    model, info = None, None
    if checkpoint_path:
        model, cfg, info = load_checkpoint(checkpoint_path, overrides)
    else:
        cfg = load_config(None, overrides)
    plan = resolve(cfg)  # tokenizer.path=auto decided
    cfg, device = plan.config, plan.parallel.device
    tokenizer = build_tokenizer(cfg.tokenizer.path)
    seq_len = cfg.data.seq_len if command == "eval" else None
    if info is not None:
        model = model.to(device)
        if seq_len is not None:
            check_seq_len(seq_len, model.args, info["path"])
        check_vocab(tokenizer.vocab_size, cfg.tokenizer.path, model.args.vocab_size)
        source: dict[str, Any] = {"checkpoint": info["path"], "step": info["step"]}
    else:
        model = build_model_for(cfg.model, plan.precision.storage, seq_len, None, tokenizer, cfg.tokenizer.path, device)
        source = {"hf_checkpoint": hf_path}
    return Loaded(plan, model, tokenizer, source)
