"""``leantrain plan``: will this model and recipe fit on my GPUs? Counted, not guessed.

The model is built on the meta device (no memory), its parameters counted exactly, and the optimizer's
state is laid out on the meta parameters by the optimizer itself, so the planned state bytes are the
bytes a real run allocates (tested against measured runs). FSDP (dp_shard = N) divides parameters,
gradients and optimizer state by N; tensor parallelism (tp = T) divides the blocks' matrices, the embedding and
the output (by vocabulary rows) and their state by T as well (the norms are not split over tp:
parallel.apply_tp), the blocks' activations by T (sequence parallelism), except the gathered inputs of attention
and of the MLP that their first matmuls keep (2 c h per token and block), and the loss's logits island by T (each
rank computes the logits of its own vocabulary rows).

Every recipe is planned twice: as it is, and with gradient release (`optimizer.in_backward`, the row
"RECIPE + in_backward"), where no full set of gradients exists: the planned gradient bytes are then the
largest set alive at once, one parameter's gradient on one process, one FSDP2 unit's (a block's, or the
root's: embedding, final norm, output) reduce-scattered shards under FSDP2.

Activation estimate, per transformer block and token, for compute dtype width c bytes (2 for bf16),
hidden size h, query width h_q = n_heads * head_dim (h for a Llama; not for Qwen3 or Mistral-Nemo, whose
head_dim is set apart from h), key/value width h_kv = n_kv_heads * head_dim and feed-forward width f: the
tensors autograd saves in leantrain's block are

    c * (4h + 5h_q + 4f)   both RMSNorms' outputs before and after the weight; SDPA's q, k and v (k, v
                           repeated to n_heads) and output; wo's input; SwiGLU's three products and w2's input
    4 * (2h + h_q + h_kv)  the fp32 islands: both RMSNorms' fp32 inputs, RoPE's fp32 q and k
    (c + 4) * (h_q + h_kv) with Qwen3's q/k norms: their fp32 inputs and outputs

plus, once, the loss's logits island (precision.linear_cross_entropy): c + 8 bytes per vocabulary entry per
token (the compute-dtype logits, their fp32 copy, the softmax's fp32 temporary), for a vocabulary of at most
LOSS_VOCAB_CHUNK entries over the whole vocabulary, above that over one chunk of LOSS_VOCAB_CHUNK entries only,
plus the backward's fp32 gradient of the final norm's output (4h) and the per-token fp32 log-sum-exp and
target logit (8). With activation checkpointing (`full`) only each block's input
(c * h) is kept, plus one block's activations while it is recomputed. It is an estimate (allocator
fragmentation and temporary buffers come on top), unlike the state bytes, which are exact.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from .config import Config, with_recipe
from .data.tokenizer import Tokenizer, build_tokenizer
from .loader import build_model_for
from .model import FLAVORS, TOKENIZER_SIZED_FLAVORS, Transformer, num_params
from .optim import build_optimizer
from .parallel import TP_COLUMNWISE, TP_ROWWISE, TP_VOCABULARY
from .precision import LOSS_VOCAB_CHUNK, Precision
from .runplan import OptimizerSpec, optimizer_spec, precision_of, tokenizer_path
from .utils import set_default_dtype


LLAMA3_FLAVORS = tuple(size for size in FLAVORS if size not in TOKENIZER_SIZED_FLAVORS)  # 1B, 3B, 8B, 70B


def _storage_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# State that FSDP2 does not shard: every rank holds it whole (factored.py's column factors)
REPLICATED_STATE = ("exp_avg_sq_col",)


# The parameters of the blocks' matrices that tensor parallelism splits (parallel.apply_tp); row-wise: their columns.
TP_SPLIT = tuple(f"{name}.weight" for name in TP_COLUMNWISE + TP_ROWWISE + TP_VOCABULARY)
TP_ROWWISE_WEIGHTS = tuple(f"{name}.weight" for name in TP_ROWWISE)


def _per_rank(sizes: list[tuple[str, int]], dp_shard: int, tp: int) -> int:
    """One rank's part of the bytes of (parameter name, bytes) pairs: tensor parallelism's split matrices divided by
    dp_shard x tp, the rest by dp_shard (with tp = 1, all of it together, as FSDP2 alone)."""
    split = sum(b for n, b in sizes if tp > 1 and n.endswith(TP_SPLIT))
    rest = sum(b for _, b in sizes) - split
    return -(-split // (dp_shard * tp)) + -(-rest // dp_shard)


def state_bytes(model: torch.nn.Module, spec: OptimizerSpec, dp_shard: int = 1, tp: int = 1) -> dict[str, int]:
    """Params, grads and optimizer state on one rank of dp_shard FSDP ranks x tp tensor-parallel ranks, laid out on
    meta tensors."""
    named = list(model.named_parameters())
    opt = build_optimizer(model, **spec.build_kwargs())
    states = {name: opt.init_state(p) for name, p in named}
    weights = _per_rank([(n, _storage_bytes([p])) for n, p in named], dp_shard, tp)
    sharded_state = [
        (n, _storage_bytes(v for k, v in states[n].items() if k not in REPLICATED_STATE)) for n, _ in named
    ]
    out = {"params": weights, "grads": weights, "optimizer": _per_rank(sharded_state, dp_shard, tp)}
    # the column factors: whole on every rank, except a row-wise matrix's, whose columns tp splits
    for name, _ in named:
        replicated = _storage_bytes(v for k, v in states[name].items() if k in REPLICATED_STATE)
        out["optimizer"] += -(-replicated // tp) if name.endswith(TP_ROWWISE_WEIGHTS) else replicated
    if spec.in_backward:
        out["grads"] = released_grad_bytes(model, dp_shard, tp)
    return out


def released_grad_bytes(model: Transformer, dp_shard: int, tp: int = 1) -> int:
    """Gradient release: the gradient bytes alive at once (module docstring), one rank's part of them."""

    def part(named) -> int:
        return _per_rank([(n, _storage_bytes([p])) for n, p in named], dp_shard, tp)

    named = list(model.named_parameters())
    if dp_shard == 1:
        return max(part([(n, p)]) for n, p in named)
    blocks = [[(f"layers.{i}.{n}", p) for n, p in block.named_parameters()] for i, block in enumerate(model.layers)]
    root = [(n, p) for n, p in named if not n.startswith("layers.")]
    return max(part(unit) for unit in [*blocks, root])


def planned_state_bytes(
    model: torch.nn.Module, precision: Precision, spec: OptimizerSpec, dp_shard: int = 1, tp: int = 1
) -> dict[str, int]:
    """What the planner predicts for this run's model (its meta twin) on one of dp_shard x tp ranks, to set beside
    the measured bytes."""
    with torch.device("meta"), set_default_dtype(precision.storage):
        twin = Transformer(model.args)
    return state_bytes(twin, spec, dp_shard, tp)


def activation_bytes(
    compute_dtype: torch.dtype, tokens: int, model: torch.nn.Module, checkpointing: bool, tp: int = 1
) -> int:
    """Activation bytes of ``tokens`` tokens per micro-batch on one of tp tensor-parallel ranks (formula in the module
    docstring)."""
    a = model.args
    c = torch.finfo(compute_dtype).bits // 8
    h_q, h_kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    block = c * (4 * a.dim + 5 * h_q + 4 * a.ffn_dim) + 4 * (2 * a.dim + h_q + h_kv)
    if a.qk_norm:
        block += (c + 4) * (h_q + h_kv)
    if tp > 1:  # sequence parallelism splits it all, but the gathered inputs of attention and the MLP are kept whole
        block = -(-block // tp) + 2 * c * a.dim
    logits = logits_island_bytes(c, -(-a.vocab_size // tp), a.dim)
    if checkpointing:
        layers = a.n_layers * -(-c * a.dim // tp) + block
    else:
        layers = a.n_layers * block
    return tokens * (layers + logits)


def logits_island_bytes(c: int, vocab: int, dim: int) -> int:
    """Per token: the loss's logits and their fp32 copies (module docstring), chunked above LOSS_VOCAB_CHUNK."""
    if vocab <= LOSS_VOCAB_CHUNK:
        return (c + 8) * vocab
    return (c + 8) * LOSS_VOCAB_CHUNK + 4 * dim + 8


def parse_bytes(text: str) -> int:
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    try:
        return int(float(num) * units[s[len(num) :]])
    except (ValueError, KeyError):
        from .errors import ConfigError

        raise ConfigError(f"--gpu-memory={text!r} is not a size; write e.g. 80GiB, 80GB or 85899345920.") from None


def _meta_model(cfg: Config, storage: torch.dtype, tokenizer: Tokenizer | None, tokenizer_name: str) -> Transformer:
    """The run's model on the meta device, built as train builds it (leantrain.loader), for any seq_len."""
    return build_model_for(
        cfg.model, storage, None, None, tokenizer, tokenizer_name, "meta", hf_weights=False, positions=cfg.data.seq_len
    )


def plan(cfg: Config, recipes: list[str], dp_shard: int, gpu_memory: int, tp: int = 1) -> dict[str, Any]:
    """The plan of every recipe for this model. It takes the config itself, not a run plan: it is the `plan`
    command, which varies the config per recipe (config.with_recipe) for GPUs that are not this process's."""
    out: dict[str, Any] = {
        "flavor": cfg.model.flavor,
        "dp_shard": dp_shard,
        "tp": tp,
        "gpu_memory_bytes": gpu_memory,
        "seq_len": cfg.data.seq_len,
        "local_batch_size": cfg.data.local_batch_size,
        "recipes": {},
    }
    tokens = cfg.data.seq_len * cfg.data.local_batch_size
    # The tokenizer sizes a debug/small model and is checked against any other; an HF folder's own (auto) is not
    # read: its config.json has the vocabulary, and the folder may hold nothing else.
    own = cfg.model.hf_checkpoint and cfg.tokenizer.path == "auto"
    tokenizer_name = "" if own else tokenizer_path(cfg)
    tokenizer = None if own else build_tokenizer(tokenizer_name)
    for name, release in [(name, release) for name in recipes for release in (False, True)]:
        rcfg = with_recipe(cfg, name)
        precision = precision_of(rcfg)
        model = _meta_model(cfg, precision.storage, tokenizer, tokenizer_name)
        # What is planned: 'llama3 8B', or a Hugging Face folder's model_type and path.
        out["model"] = (
            f"{model.args.family} {cfg.model.hf_checkpoint}"
            if cfg.model.hf_checkpoint
            else f"llama3 {cfg.model.flavor}"
        )
        out["num_params"] = num_params(model)
        spec = optimizer_spec(rcfg).with_release(release)
        state = state_bytes(model, spec, dp_shard, tp)
        name = f"{name} + in_backward" if release else name
        act = activation_bytes(precision.compute, tokens, model, checkpointing=False, tp=tp)
        act_ckpt = activation_bytes(precision.compute, tokens, model, checkpointing=True, tp=tp)
        total = sum(state.values()) + act
        out["recipes"][name] = {
            "state_bytes_per_gpu": state,
            "state_bytes_per_param": sum(state.values()) * dp_shard * tp / out["num_params"],
            "activation_bytes_per_gpu": act,
            "activation_bytes_per_gpu_checkpointed": act_ckpt,
            "total_bytes_per_gpu": total,
            "total_bytes_per_gpu_checkpointed": sum(state.values()) + act_ckpt,
            "state_fits": sum(state.values()) <= gpu_memory,
            "fits": total <= gpu_memory,
            "fits_checkpointed": sum(state.values()) + act_ckpt <= gpu_memory,
        }
    return out


def largest(cfg: Config, recipes: list[str], dp_shard: int, gpu_memory: int) -> dict[str, Any]:
    """Per recipe (and with gradient release): the largest of leantrain's Llama 3 flavors (1B, 3B, 8B, 70B) whose
    full fine-tune fits in `gpu_memory` per GPU with full activation checkpointing and the chunked loss, at the
    config's seq_len and local_batch_size, and every flavor's planned total."""
    totals: dict[str, dict[str, int]] = {}
    for size in LLAMA3_FLAVORS:
        sized = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, flavor=size, hf_checkpoint=""))
        for name, r in plan(sized, recipes, dp_shard, gpu_memory)["recipes"].items():
            totals.setdefault(name, {})[size] = r["total_bytes_per_gpu_checkpointed"]
    return {
        "gpu_memory_bytes": gpu_memory,
        "dp_shard": dp_shard,
        "seq_len": cfg.data.seq_len,
        "local_batch_size": cfg.data.local_batch_size,
        "recipes": {
            name: {"largest": largest_that_fits(row, gpu_memory), "total_bytes_checkpointed": row}
            for name, row in totals.items()
        },
    }


def largest_that_fits(totals: dict[str, int], gpu_memory: int) -> str | None:
    """The largest flavor whose planned total (flavor -> bytes per GPU) is within gpu_memory, or None."""
    return next((size for size in reversed(LLAMA3_FLAVORS) if totals[size] <= gpu_memory), None)


def format_largest(p: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"The largest Llama 3 that fully fine-tunes on one of dp_shard={p['dp_shard']} GPUs of "
        f"{p['gpu_memory_bytes'] / gib:.1f} GiB: seq_len={p['seq_len']}, local_batch_size={p['local_batch_size']}"
        f", full activation checkpointing, the chunked loss (planned totals per GPU)",
        "",
        "| recipe | largest | " + " | ".join(f"{s} (GiB)" for s in LLAMA3_FLAVORS) + " |",
        "|---" * (2 + len(LLAMA3_FLAVORS)) + "|",
    ]
    for name, r in p["recipes"].items():
        row = r["total_bytes_checkpointed"]
        lines.append(
            f"| {name} | {r['largest'] or 'none'} | " + " | ".join(f"{row[s] / gib:.1f}" for s in LLAMA3_FLAVORS) + " |"
        )
    return "\n".join(lines)


def format_plan(p: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"{p['model']}: {p['num_params']:,} parameters; dp_shard={p['dp_shard']}, tp={p['tp']}, "
        f"seq_len={p['seq_len']}, local_batch_size={p['local_batch_size']}, "
        f"GPU memory {p['gpu_memory_bytes'] / gib:.1f} GiB",
        "",
        "| recipe | bytes/param | params | grads | optimizer | activations (AC none / full) | "
        "total (AC none / full) | state fits | fits (AC none / full) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in p["recipes"].items():
        s = r["state_bytes_per_gpu"]
        lines.append(
            f"| {name} | {r['state_bytes_per_param']:.2f} | {s['params'] / gib:.1f} GiB | {s['grads'] / gib:.1f} GiB | "
            f"{s['optimizer'] / gib:.1f} GiB | {r['activation_bytes_per_gpu'] / gib:.1f} / "
            f"{r['activation_bytes_per_gpu_checkpointed'] / gib:.1f} GiB | {r['total_bytes_per_gpu'] / gib:.1f} / "
            f"{r['total_bytes_per_gpu_checkpointed'] / gib:.1f} GiB | {'yes' if r['state_fits'] else 'no'} | "
            f"{'yes' if r['fits'] else 'no'} / {'yes' if r['fits_checkpointed'] else 'no'} |"
        )
    return "\n".join(lines)


def to_json(p: dict[str, Any]) -> str:
    return json.dumps(p, indent=2)
