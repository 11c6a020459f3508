"""The configuration: one documented dataclass per TOML section, loaded, overridden and validated here.

Every field has a type (``Literal[...]`` for choices) and a docstring right under it; ``--help`` is
generated from those docstrings, so this file is the documentation of every key. Values come from,
in increasing priority: the defaults below, ``--recipe`` (a named set of values, :data:`RECIPES`),
the TOML file, and ``--section.key=value`` on the command line. A key set both by the recipe and
explicitly to another value is a contradiction, not a silent override.

All validation happens in :func:`validate` before any work: unknown keys (with a "did you mean"),
wrong types, out-of-range values and contradictions raise :class:`ConfigError`; legal but
suspicious combinations warn once. The result is frozen: leantrain.runplan resolves it once into the
values the layers below take, and nothing changes it after loading.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import difflib
import inspect
import textwrap
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError
from .model import FLAVORS
from .optim import COMPENSATIONS, MOMENTS_ROUNDINGS, RELEASE_CLIPPING, RULES, STATE_DTYPES


@dataclass(frozen=True)
class Job:
    dump_folder: str = ""
    """Where the run writes config.toml, metrics.jsonl, summary.json and loss.png. Empty: runs/<timestamp>."""
    seed: int = 0
    """One seed for weight init, data order and stochastic rounding."""


@dataclass(frozen=True)
class Model:
    name: Literal["llama3"] = "llama3"
    """Architecture. Only the Llama 3 family (RMSNorm, RoPE, grouped-query attention, SwiGLU); model.hf_checkpoint
    also loads its Mistral and Qwen2/Qwen3 relatives."""
    flavor: Literal[tuple(FLAVORS)] = "small"
    """Size preset (leantrain.model.FLAVORS): debug (tests), small (a CPU model), 1B/3B/8B/70B (Llama 3.2-1B,
    3.2-3B, 3.1-8B, 3.1-70B)."""
    dim: int = 0
    """Hidden size. 0: the flavor's."""
    n_layers: int = 0
    """Number of transformer blocks. 0: the flavor's."""
    n_heads: int = 0
    """Attention heads. 0: the flavor's."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention); must divide n_heads. 0: the flavor's."""
    ffn_dim: int = 0
    """Hidden size of the SwiGLU feed-forward. 0: the flavor's."""
    vocab_size: int = 0
    """Vocabulary size. 0: the flavor's (debug and small: the tokenizer's)."""
    rope_theta: float = 0.0
    """RoPE base frequency. 0: the flavor's (500000, Llama 3)."""
    norm_eps: float = 0.0
    """RMSNorm epsilon. 0: the flavor's (1e-5)."""
    hf_checkpoint: str = ""
    """A local Hugging Face folder (config.json + safetensors) to start from, of model_type llama, mistral, qwen2
    or qwen3 (leantrain.hf.FAMILIES; any other is refused): its config.json sets the dimensions, the head size,
    Qwen's q/k/v bias or q/k norms and Mistral's sliding window (model.flavor is then ignored), and its weights
    replace the initial ones, cast to training.dtype.
    Ignored when the run resumes from its own checkpoint."""


@dataclass(frozen=True)
class Tokenizer:
    path: str = "auto"
    """'auto': the tokenizer.json of model.hf_checkpoint when that is set, else 'byte'. 'byte': 256 byte ids plus
    BOS, EOS, PAD. Or the path of a local Hugging Face tokenizer.json (or a folder holding one). config.toml
    records the tokenizer the run used."""


@dataclass(frozen=True)
class Data:
    path: str = "builtin"
    """'builtin' (the pydoc texts shipped with CPython), a .txt file, a .jsonl file (field data.text_field), a
    .parquet file (column data.text_field), a folder of them (tokenized in memory at every start: for small
    corpora), or a folder written by leantrain prepare (memory-mapped: any size)."""
    format: Literal["text", "sft", "chat"] = "text"
    """'text': pretraining, documents packed into seq_len windows with EOS between them. 'sft': .jsonl/.parquet
    with 'prompt' and 'response' (or 'completion') strings; the loss is on the response and its EOS. 'chat':
    .jsonl/.parquet with 'messages' (roles system/user/assistant) rendered with the tokenizer's chat template
    (tokenizer_config.json or chat_template.jinja; a built-in Llama 3 style one otherwise); the loss is on the
    assistant turns and their end-of-turn tokens."""
    packing: bool = True
    """sft/chat: pack several samples into each seq_len row (best-fit), each attending only to itself, instead of
    one sample per row padded to seq_len. text is always packed: false is refused there."""
    text_field: str = "text"
    """The field of a .jsonl record (or the column of a .parquet file) that holds a document's text
    (data.format=text)."""
    mix: str = ""
    """Several folders written by leantrain prepare, mixed by weight: 'DIR=WEIGHT,DIR=WEIGHT' (weights are
    relative). Each global batch's windows are drawn from them by weight, deterministically and resumably;
    eval covers every folder's eval split. Leave data.path at its default when this is set."""
    seq_len: int = 256
    """Tokens per training sample."""
    local_batch_size: int = 8
    """Samples per micro-batch (per rank)."""


@dataclass(frozen=True)
class Training:
    steps: int = 300
    """Optimizer steps to train."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Storage dtype of parameters, gradients and (with optimizer.state_dtype=auto) the Adam moments."""
    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute dtype when training.dtype is float32: autocast on one device or under DDP, the parameters cast by
    FSDP2's MixedPrecisionPolicy under FSDP2. Has no effect under full bfloat16."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """Dtype in which FSDP2 reduce-scatters the gradients when training.dtype is float32 (MixedPrecisionPolicy's
    reduce_dtype). No effect without FSDP2 (DDP and one device reduce in the gradients' dtype) or under full
    bfloat16, whose gradients are reduced in bfloat16."""
    max_norm: float = 1.0
    """Clip the global gradient norm (computed in fp32) to this value. 0 disables clipping. With gradient release
    (optimizer.in_backward) the global norm is known only after the updates; training.release_clipping says how
    release clips instead."""
    release_clipping: Literal[RELEASE_CLIPPING] = "per_tensor"
    """How gradient release clips (training.max_norm > 0 with optimizer.in_backward=true): per_tensor (each
    gradient to its share of max_norm, max_norm * sqrt(its elements / all elements), in the backward: the norm of
    the whole gradient then stays within max_norm, as with exact clipping) or previous_norm (every gradient by the
    factor exact clipping would have used at the previous step: the clip lags one step). The step's true norm is
    still measured and logged as grad_norm. No effect without gradient release, where clipping is exact."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    max_nonfinite_steps: int = 10
    """A step whose loss or gradient norm is NaN/Inf is skipped (weights and optimizer state unchanged, the step
    logged with "skipped": true); after this many skipped steps in a row the run stops with exit code 3. 1: stop
    at the first one."""


@dataclass(frozen=True)
class Optimizer:
    name: Literal[tuple(RULES)] = "AdamW"
    """The update rule: AdamW (m and v per element: torch.optim.AdamW's update), FactoredAdamW (for the 2-D weights
    of the transformer blocks v is kept as Adafactor's row and column factors, fp32, with Adam's bias correction;
    m per element; the embedding, the output layer and the norms as AdamW) or Adafactor (FactoredAdamW's v and no
    m: the step is g / (sqrt(v) + eps), each tensor's clipped to an RMS of 1; betas[0] unused). Each with the
    recipe's storage."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's beta1, beta2."""
    eps: float = 1e-8
    """Adam's epsilon, added to sqrt of the second moment."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms)."""
    state_dtype: Literal[STATE_DTYPES] = "auto"
    """Dtype of the Adam moments: auto (= training.dtype), float32, bfloat16, or block-wise quantized: int8, int4,
    int4-int8 (exp_avg in 4 bits, exp_avg_sq in 8)."""
    compensation: Literal[COMPENSATIONS] = "stochastic"
    """How a bf16 weight update keeps steps smaller than half a bf16 ulp: none (nearest rounding, they are lost),
    stochastic (unbiased stochastic rounding of weights and bf16 moments), kahan (a bf16 compensation buffer).
    No effect when training.dtype is float32."""
    moments_rounding: Literal[MOMENTS_ROUNDINGS] = "auto"
    """How bf16 Adam moments, int8/int4 moment codes (and the Kahan buffer) are written: auto (stochastically unless
    compensation is none), nearest, or stochastic. 'nearest' rounds as torchao's / optimi's / bitsandbytes'
    optimizers do, for comparison (int8/int4 codes: on leantrain's companded maps, not their dynamic ones)."""
    in_backward: bool = False
    """Gradient release: run each parameter's update during the backward, as soon as its gradient is complete, and
    free the gradient at once, so no full set of gradients exists (2 bytes/param less in full bf16). Clips by
    training.release_clipping's rule; needs training.gradient_accumulation_steps = 1, and FSDP2 or one process
    (not DDP)."""


@dataclass(frozen=True)
class LRScheduler:
    warmup_steps: int = 30
    """Steps of linear warmup from 0 to optimizer.lr."""
    decay: Literal["cosine", "linear", "none"] = "cosine"
    """Shape of the decay after warmup, down to min_lr_factor * lr at the last step."""
    min_lr_factor: float = 0.1
    """Final learning rate as a fraction of the peak."""


@dataclass(frozen=True)
class Eval:
    interval: int = 100
    """Evaluate on the held-out split every this many steps (and at the end). 0: only at the end."""
    steps: int = 10
    """Batches per evaluation."""


@dataclass(frozen=True)
class Checkpoint:
    enable: bool = False
    """Save checkpoints (torch.distributed.checkpoint) and resume from the latest one when the run starts on a
    dump folder that has some."""
    folder: str = "checkpoints"
    """Where checkpoints go, relative to job.dump_folder: one step-N folder per checkpoint."""
    interval: int = 500
    """Save every this many steps, and at the last step."""
    keep_latest_k: int = 0
    """Keep only the k most recent checkpoints (older ones are deleted after a save). 0: keep all."""


@dataclass(frozen=True)
class Metrics:
    log_freq: int = 10
    """Log a line to metrics.jsonl every this many steps (and at the first and last step)."""
    progress: bool = True
    """Show a progress bar with loss, tokens/s and memory."""
    tensorboard: bool = False
    """Also write each logged line as TensorBoard scalars (event files beside metrics.jsonl; `tensorboard --logdir
    runs`). Needs the tensorboard package: pip install 'leantrain[tensorboard]'."""


@dataclass(frozen=True)
class Parallelism:
    dp_shard: int = -1
    """FSDP2 degree: parameters, gradients and optimizer state are split over this many ranks (fully_shard per
    transformer block and the root); each rank holds 1/dp_shard of the training state. -1: every rank that
    dp_replicate leaves (so a plain torchrun run is FSDP2). 1: no sharding."""
    dp_replicate: int = 1
    """Data-parallel replicas: each holds the whole model (DDP) or, with dp_shard > 1, one sharded copy (HSDP:
    sharded within a group of dp_shard ranks, e.g. a node, replicated across groups). -1: every rank that
    dp_shard leaves. dp_replicate * dp_shard * tp must equal the number of processes (the world size)."""
    tp: int = 1
    """Tensor-parallel degree: each transformer block's matmuls split over this many ranks (attention heads and
    SwiGLU's hidden units: column-wise in, row-wise out), its norms and residual stream split along the sequence
    (sequence parallelism); the ranks of one tensor-parallel group see the same batch. Composes with dp_shard
    (FSDP2 over the data-parallel ranks: a 2-D mesh). tp must divide the heads, the key/value heads, ffn_dim
    and data.seq_len. 1: none."""


@dataclass(frozen=True)
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    """Recompute activations in the backward instead of keeping them: none; full (each transformer block keeps
    only its input and recomputes everything else); selective (each block keeps the outputs of its matmuls and
    of attention, and recomputes the cheap rest: norms, RoPE, SwiGLU's activation, casts)."""


@dataclass(frozen=True)
class Compile:
    enable: Literal["auto", True, False] = "auto"
    """torch.compile each transformer block (with FSDP2, per block, inside the sharding) and the optimizer's
    per-tensor update (one fused kernel per tensor: `leantrain.optim.update`). auto: on where a compiler works for
    the device (a C++ compiler and Python's headers on a CPU, Triton on a GPU), off with one warning saying why
    where it does not. The first steps compile: their compile time is shown on the progress bar, logged as
    compile_s, and left out of tokens/s."""


@dataclass(frozen=True)
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    eval: Eval = field(default_factory=Eval)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    recipe: str = ""
    """A named precision recipe (fp32, bf16-mixed, bf16, bf16-fp32state, bf16-sr, bf16-kahan, bf16-int8, bf16-int4,
    bf16-int4-int8, bf16-int8-factored, bf16-int4-int8-factored, bf16-factored-no-m): a set of the keys above."""


# A recipe is only a named set of config values; `--recipe NAME` and these keys give the same run. Every recipe
# sets the same keys: the full-bf16 base, with what the recipe changes.
_BF16_BASE: dict[str, object] = {
    "training.dtype": "bfloat16",
    "training.mixed_precision_param": "bfloat16",
    "optimizer.name": "AdamW",
    "optimizer.state_dtype": "auto",
    "optimizer.compensation": "none",
    "optimizer.moments_rounding": "auto",
}
_RECIPE_CHANGES: dict[str, dict[str, object]] = {
    "fp32": {"training.dtype": "float32", "training.mixed_precision_param": "float32"},
    "bf16-mixed": {"training.dtype": "float32"},
    "bf16": {},
    "bf16-fp32state": {"optimizer.state_dtype": "float32"},
    "bf16-sr": {"optimizer.compensation": "stochastic"},
    "bf16-kahan": {"optimizer.compensation": "kahan"},
    "bf16-int8": {"optimizer.state_dtype": "int8", "optimizer.compensation": "stochastic"},
    "bf16-int4": {"optimizer.state_dtype": "int4", "optimizer.compensation": "stochastic"},
    "bf16-int4-int8": {"optimizer.state_dtype": "int4-int8", "optimizer.compensation": "stochastic"},
    # FactoredAdamW: m in the named format, v factored for the blocks' matrices and int8 for every other tensor
    "bf16-int8-factored": {
        "optimizer.name": "FactoredAdamW",
        "optimizer.state_dtype": "int8",
        "optimizer.compensation": "stochastic",
    },
    "bf16-int4-int8-factored": {
        "optimizer.name": "FactoredAdamW",
        "optimizer.state_dtype": "int4-int8",
        "optimizer.compensation": "stochastic",
    },
    # Adafactor (no m): v factored for the blocks' matrices and int8 for every other tensor, nothing else
    "bf16-factored-no-m": {
        "optimizer.name": "Adafactor",
        "optimizer.state_dtype": "int8",
        "optimizer.compensation": "stochastic",
    },
}
RECIPES: dict[str, dict[str, object]] = {name: {**_BF16_BASE, **changes} for name, changes in _RECIPE_CHANGES.items()}


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def recipe_of(cfg: Config) -> str | None:
    """The recipe whose keys the config matches (a run is named by its values, not by how they were set)."""
    for name, keys in RECIPES.items():
        if all(_get(cfg, k) == v for k, v in keys.items()):
            return name
    return None


def _replace(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of the (frozen) config with {'section.key': value} replaced; not validated."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items()})


def with_recipe(cfg: Config, name: str) -> Config:
    """The config with recipe ``name``'s keys (as leantrain plan compares recipes for one model), validated."""
    out = dataclasses.replace(_replace(cfg, RECIPES[name]), recipe=name)
    validate(out, warn=False)
    return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "recipe"}


def _section_class(name: str) -> type:
    return {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "recipe"}[name]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from the source, as torchtitan's --help does)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of " + str(len(typing.get_args(tp))) + " numbers"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(key: str, value: Any, tp: Any, from_cli: bool) -> Any:
    """Check (and, for command-line strings, parse) one value against its field type."""
    bad = ConfigError(f"Config key '{key}' has the value {value!r}, but it must be {_describe(tp)}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if from_cli and isinstance(value, str) and True in allowed and value.lower() in ("true", "false"):
            value = value.lower() == "true"  # a choice that is also a switch: --compile.enable=true
        if not any(value == a and type(value) is type(a) for a in allowed):  # (1 == True: types too)
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"Config key '{key}' has the value {value!r}, which is not allowed: it must be {_describe(tp)}.{extra}"
            )
        return value
    if origin is tuple:
        if from_cli and isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise bad
        return tuple(_coerce(key, v, float, from_cli) for v in value)
    if tp is bool:
        if from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if from_cli and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if from_cli and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unsupported config type {tp}")


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(name, known, n=1)
    extra = f" Did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(
        f"Unknown config {kind} {name!r}.{extra} Known {kind}s: {', '.join(sorted(known))}. "
        f"Run 'leantrain train --help' to see every key."
    )


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """TOML tables -> {'section.key': value}, rejecting unknown sections."""
    flat = {}
    for name, value in raw.items():
        if name == "recipe":
            flat["recipe"] = value
            continue
        if name not in SECTIONS:
            raise _unknown("section", name, list(SECTIONS) + ["recipe"])
        if not isinstance(value, dict):
            raise ConfigError(f"In {source}, '{name}' must be a table ([{name}]) of keys, not {value!r}.")
        for key, v in value.items():
            flat[f"{name}.{key}"] = v
    return flat


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``--section.key=value`` / ``--section.key value`` / ``--recipe NAME`` -> {'section.key': 'value'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"Unexpected argument {arg!r}: options look like --section.key=value "
                f"(e.g. --training.steps=100). Run with --help to see every key."
            )
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"Option '--{name}' needs a value, e.g. --{name}=VALUE.")
            value = args[i + 1]
            i += 1
        out[name] = value
        i += 1
    return out


def load_config(toml_path: str | None = None, overrides: dict[str, Any] | None = None, *, warn: bool = True) -> Config:
    """Defaults <- recipe <- TOML file <- command-line overrides, type-checked and validated, frozen.
    ``warn=False``: no warnings for legal but suspicious settings (a checkpoint's config, warned about when it ran)."""
    flat: dict[str, tuple[Any, bool]] = {}  # key -> (value, from_cli)
    if toml_path:
        try:
            with open(toml_path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(
                f"The config file '{toml_path}' does not exist. Pass --config with the path of a "
                f"TOML file, or leave it out to use the defaults."
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"The config file '{toml_path}' is not valid TOML: {e}.") from None
        except OSError as e:
            raise ConfigError(f"The config file '{toml_path}' cannot be read: {e.strerror}.") from None
        flat.update({k: (v, False) for k, v in _flatten(raw, toml_path).items()})
    flat.update({k: (v, True) for k, v in (overrides or {}).items()})

    recipe_value, _ = flat.pop("recipe", ("", False))
    values: dict[str, Any] = {}
    if recipe_value:
        if not isinstance(recipe_value, str) or recipe_value not in RECIPES:  # TOML may give any type
            raise _unknown("recipe", str(recipe_value), list(RECIPES))
        values.update(RECIPES[recipe_value])

    for key, (value, from_cli) in flat.items():
        section, dot, name = key.partition(".")
        if not dot or section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS) + ["recipe"])
        hints = _hints(_section_class(section))
        if name not in hints:
            raise _unknown("key", key, [f"{section}.{k}" for k in hints])
        value = _coerce(key, value, hints[name], from_cli)
        if recipe_value and key in RECIPES[recipe_value] and RECIPES[recipe_value][key] != value:
            raise ConfigError(
                f"The recipe '{recipe_value}' sets {key} = {RECIPES[recipe_value][key]!r}, but "
                f"{key} = {value!r} was also given. A recipe is a fixed set of keys: drop --recipe "
                f"and set the keys yourself, or drop {key}."
            )
        values[key] = value
    cfg = dataclasses.replace(_replace(Config(), values), recipe=recipe_value or "")
    validate(cfg, warn=warn)
    return cfg


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Config key '{key}' has the value {value!r}, but it must be {allowed}.")


def validate(cfg: Config, warn: bool = True) -> None:
    """Every range check, contradiction and warning, in one place, before any work."""
    t, o, d, m, s = cfg.training, cfg.optimizer, cfg.data, cfg.model, cfg.lr_scheduler
    _require(t.steps >= 1, "training.steps", t.steps, "at least 1")
    _require(0 <= t.max_norm < math.inf, "training.max_norm", t.max_norm, "0 (no clipping) or a positive number")
    _require(
        t.gradient_accumulation_steps >= 1,
        "training.gradient_accumulation_steps",
        t.gradient_accumulation_steps,
        "at least 1",
    )
    if o.in_backward and t.gradient_accumulation_steps > 1:
        raise ConfigError(
            f"optimizer.in_backward=true updates each parameter during the backward, as soon as its gradient of "
            f"this micro-batch is complete, so it cannot sum micro-batches (training.gradient_accumulation_steps = "
            f"{t.gradient_accumulation_steps}): the first micro-batch's update would be taken before the others' "
            f"gradients exist. Set training.gradient_accumulation_steps=1 and a larger data.local_batch_size (the "
            f"same global batch in one micro-batch; activation_checkpoint.mode=full keeps its activations small), "
            f"or leave optimizer.in_backward at false."
        )
    _require(
        t.max_nonfinite_steps >= 1,
        "training.max_nonfinite_steps",
        t.max_nonfinite_steps,
        "at least 1 (1: stop at the first NaN/Inf step)",
    )
    _require(d.seq_len >= 1, "data.seq_len", d.seq_len, "at least 1")
    _require(d.local_batch_size >= 1, "data.local_batch_size", d.local_batch_size, "at least 1")
    _require(0 < o.lr < 3e38, "optimizer.lr", o.lr, "a positive number (below 3e38: the update is float32)")
    _require(all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas), "two numbers in [0, 1)")
    _require(0 < o.eps < math.inf, "optimizer.eps", o.eps, "a positive number")
    _require(0 <= o.weight_decay < math.inf, "optimizer.weight_decay", o.weight_decay, "0 or a positive number")
    _require(s.warmup_steps >= 0, "lr_scheduler.warmup_steps", s.warmup_steps, "0 or positive")
    _require(0 <= s.min_lr_factor <= 1, "lr_scheduler.min_lr_factor", s.min_lr_factor, "between 0 and 1")
    _require(cfg.eval.interval >= 0, "eval.interval", cfg.eval.interval, "0 (only at the end) or positive")
    _require(cfg.eval.steps >= 1, "eval.steps", cfg.eval.steps, "at least 1")
    _require(cfg.metrics.log_freq >= 1, "metrics.log_freq", cfg.metrics.log_freq, "at least 1")
    par = cfg.parallelism
    _require(
        par.dp_shard == -1 or par.dp_shard >= 1,
        "parallelism.dp_shard",
        par.dp_shard,
        "-1 (every rank dp_replicate leaves) or a positive number of ranks",
    )
    _require(
        par.dp_replicate == -1 or par.dp_replicate >= 1,
        "parallelism.dp_replicate",
        par.dp_replicate,
        "-1 (every rank dp_shard leaves) or a positive number of ranks",
    )
    _require(par.tp >= 1, "parallelism.tp", par.tp, "a positive number of ranks (1: no tensor parallelism)")
    if par.dp_shard == par.dp_replicate == -1:
        raise ConfigError(
            "parallelism.dp_shard and parallelism.dp_replicate are both -1 ('every rank the other "
            "leaves'); set one of them to a number, e.g. parallelism.dp_replicate=1."
        )
    c = cfg.checkpoint
    _require(c.interval >= 1, "checkpoint.interval", c.interval, "at least 1")
    _require(c.keep_latest_k >= 0, "checkpoint.keep_latest_k", c.keep_latest_k, "0 (keep all) or positive")
    _require(bool(c.folder.strip()), "checkpoint.folder", c.folder, "a folder name (relative to job.dump_folder)")
    fields = {"sft": "'prompt' and 'response' fields", "chat": "a 'messages' list"}
    if d.format in fields and (d.path == "builtin" or d.path.lower().endswith(".txt")):
        raise ConfigError(
            f"data.format='{d.format}' reads .jsonl or .parquet files with {fields[d.format]}, but "
            f"data.path is {d.path!r}. Point data.path at such a file (or a folder of them), "
            f"or use data.format='text'."
        )
    if d.mix and d.path != Data.path:
        raise ConfigError(
            f"data.mix and data.path are both set (data.path={d.path!r}); a mixture names its prepared "
            "folders in data.mix. Set one of them."
        )
    if d.mix and d.format != "text":
        raise ConfigError(f"data.mix mixes prepared text corpora, but data.format={d.format!r}. Use data.format=text.")
    _require(bool(d.text_field), "data.text_field", d.text_field, "the name of a .jsonl field or .parquet column")
    if d.format == "text" and not d.packing:
        raise ConfigError(
            "data.packing=false applies to data.format='sft' or 'chat' (one sample per padded row); "
            "text data is always cut into full seq_len windows. Leave data.packing at true."
        )
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        _require(getattr(m, name) >= 0, f"model.{name}", getattr(m, name), "0 (the flavor's) or positive")
    _require(0 <= m.rope_theta < math.inf, "model.rope_theta", m.rope_theta, "0 (the flavor's) or a positive number")
    _require(0 <= m.norm_eps < math.inf, "model.norm_eps", m.norm_eps, "0 (the flavor's) or a positive number")
    _require(0 <= cfg.job.seed < 2**63, "job.seed", cfg.job.seed, "an integer from 0 to 2**63 - 1")
    _require(
        bool(d.path.strip()),
        "data.path",
        d.path,
        "'builtin', or the path of a .txt / .jsonl file or a folder "
        "of them (an empty path would read every such file under the current directory)",
    )
    messages = suspicious_precision_settings(cfg)
    if s.warmup_steps > t.steps:
        messages.append(
            f"lr_scheduler.warmup_steps = {s.warmup_steps} is longer than training.steps = {t.steps}: "
            f"the learning rate never reaches optimizer.lr = {o.lr}."
        )
    for message in messages if warn else []:
        warn_once(message)


def suspicious_precision_settings(cfg: Config, dp_shard: int | None = None) -> list[str]:
    """Legal settings that are probably not meant, in words a user understands (validate warns once).

    ``dp_shard``: the FSDP degree once the world size is known (runplan.resolve asks again then); None before.
    """
    t, o = cfg.training, cfg.optimizer
    out = []
    if dp_shard is None and cfg.parallelism.dp_shard != -1:
        dp_shard = cfg.parallelism.dp_shard
    if t.mixed_precision_reduce == "bfloat16" and t.dtype == "bfloat16":
        out.append(
            "training.mixed_precision_reduce=bfloat16 has no effect with training.dtype=bfloat16: full "
            "bfloat16 gradients are reduced in bfloat16 anyway. It only chooses the reduce dtype of "
            "fp32 parameters under FSDP2."
        )
    elif t.mixed_precision_reduce == "bfloat16" and dp_shard == 1:
        out.append(
            "training.mixed_precision_reduce=bfloat16 has no effect without FSDP2 (parallelism.dp_shard "
            "is 1): one device does not reduce gradients, and DDP reduces them in their own dtype."
        )
    if t.dtype == "bfloat16" and t.mixed_precision_param == "float32":
        out.append(
            "training.dtype=bfloat16 with training.mixed_precision_param=float32: parameters are stored in "
            "bfloat16, so the forward and backward run in bfloat16 anyway; mixed_precision_param only "
            "chooses the compute dtype when training.dtype=float32. Set training.dtype=float32 for fp32 "
            "compute, or leave mixed_precision_param at bfloat16."
        )
    if t.dtype == "float32" and t.mixed_precision_param == "bfloat16" and recipe_of(cfg) != "bf16-mixed":
        out.append(
            "training.dtype=float32 stores fp32 weights, but training.mixed_precision_param=bfloat16 (its "
            "default) makes the forward and backward compute in bfloat16 (as recipe bf16-mixed does). For "
            "fp32 compute set training.mixed_precision_param=float32, or use --recipe fp32."
        )
    if t.dtype == "float32" and o.compensation != "none":
        out.append(
            f"optimizer.compensation={o.compensation} has no effect with training.dtype=float32: "
            "compensation only protects bfloat16 weights from rounding. Set it to 'none'."
        )
    if t.dtype == "float32" and o.state_dtype == "bfloat16":
        out.append(
            "optimizer.state_dtype=bfloat16 with training.dtype=float32 stores the Adam moments in less "
            "precision than the weights; this saves 4 bytes/param but is not a recipe we measure."
        )
    if t.release_clipping != "per_tensor" and not (o.in_backward and t.max_norm > 0):
        out.append(
            f"training.release_clipping={t.release_clipping} has no effect: it is how gradient release clips, "
            "and this run clips exactly (optimizer.in_backward=false) or not at all (training.max_norm=0)."
        )
    return out


def data_parallel_degrees(cfg: Config, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) for ``world_size`` processes, -1 resolved against the ranks tensor parallelism
    leaves (world_size / tp); dp_replicate * dp_shard * tp must be the world size."""
    par = cfg.parallelism
    replicate, shard = par.dp_replicate, par.dp_shard
    if world_size % par.tp:
        raise ConfigError(
            f"parallelism.tp = {par.tp} does not divide the {world_size} process(es) of this run: "
            f"dp_replicate * dp_shard * tp must equal the world size. Launch a multiple of {par.tp} processes "
            f"(torchrun --nproc_per_node), or choose a tp that divides {world_size}."
        )
    world_size //= par.tp  # the data-parallel ranks
    if replicate == -1:
        replicate = world_size // shard if world_size % shard == 0 else 0
    if shard == -1:
        shard = world_size // replicate if world_size % replicate == 0 else 0
    if replicate * shard != world_size:
        raise ConfigError(
            f"parallelism.dp_replicate = {par.dp_replicate} and parallelism.dp_shard = {par.dp_shard} "
            f"do not fit the {world_size * par.tp} process(es) of this run with parallelism.tp = {par.tp}: "
            f"dp_replicate * dp_shard * tp must equal the world size (-1 takes every rank the others leave). "
            f"Launch with torchrun --nproc_per_node=N (N = dp_replicate * dp_shard * tp per node), or change "
            f"the degrees."
        )
    return replicate, shard


_warned: set[str] = set()


def warn_once(message: str, key: str | None = None) -> None:
    """Warn once per process for each key (by default the message itself)."""
    if (key or message) not in _warned:
        _warned.add(key or message)
        warnings.warn(message, UserWarning, stacklevel=2)


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["optimizer"]["betas"] = list(cfg.optimizer.betas)
    return d


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (what config.toml in the run folder holds; it loads back with --config)."""
    d = to_dict(cfg)
    lines = [f"recipe = {_toml_value(d.pop('recipe'))}"]
    for section, values in d.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def help_text() -> str:
    """Every key with its type, default and docstring (the body of --help)."""
    out = []
    defaults = Config()
    for section in SECTIONS:
        cls = _section_class(section)
        docs, hints = field_docs(cls), _hints(cls)
        out.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            out.append(f"  --{section}.{f.name}  ({_describe(hints[f.name])}; default {default!r})")
            out.append(textwrap.indent(textwrap.fill(docs.get(f.name, ""), 92), "      "))
    out.append("--recipe NAME")
    out.append(textwrap.indent(textwrap.fill(field_docs(Config)["recipe"], 92), "      "))
    return "\n".join(out)
