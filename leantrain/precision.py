"""Every dtype decision of leantrain, in one place.

Recipes (SPEC.md section 4) are named sets of config keys. A run has a *storage* dtype (params,
grads, and Adam moments unless optimizer.state_dtype says otherwise) and a *compute* dtype (the
matmuls). Full bf16 stores and computes in bf16; ``bf16-mixed`` stores fp32 and computes bf16 under
autocast.

The fp32 islands, kept in fp32 in every recipe, are the functions of this module that the model,
the loss and the trainer call (and nowhere else casts):

1. RoPE: frequencies computed and stored in fp32 (:func:`rope_cos_sin`), the rotation applied in
   fp32 and cast back (:func:`apply_rotary`). In bf16, angles of positions in the thousands lose
   all their fractional part.
2. RMSNorm statistics: mean of squares and rsqrt in fp32 (:func:`rms_norm`).
3. Attention softmax accumulation: done in fp32 by ``scaled_dot_product_attention``'s kernels for
   bf16 inputs (their accumulate type is fp32); tested in tests/test_precision.py.
4. The logits fed to the loss and the loss itself: cast in the loss (:func:`cross_entropy`), not in
   the model, so the model's output stays in the compute dtype.
5. The gradient-norm accumulation for clipping (:func:`clip_grad_norm_`).
6. The optimizer's arithmetic (upcast, compute, round once): leantrain.optim.
7. Initial weights: drawn in fp32 one tensor at a time, then rounded to the storage dtype
   (:func:`init_normal_`), so every recipe starts from the same weights, and full bf16
   never holds an fp32 copy of the model.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A recipe is only a named set of config values; `--recipe NAME` and these keys give the same run.
RECIPES: dict[str, dict[str, object]] = {
    "fp32": {"training.dtype": "float32", "training.mixed_precision_param": "float32",
             "optimizer.state_dtype": "auto", "optimizer.compensation": "none", "optimizer.moments_rounding": "auto"},
    "bf16-mixed": {"training.dtype": "float32", "training.mixed_precision_param": "bfloat16",
                   "optimizer.state_dtype": "auto", "optimizer.compensation": "none", "optimizer.moments_rounding": "auto"},
    "bf16": {"training.dtype": "bfloat16", "training.mixed_precision_param": "bfloat16",
             "optimizer.state_dtype": "auto", "optimizer.compensation": "none", "optimizer.moments_rounding": "auto"},
    "bf16-fp32state": {"training.dtype": "bfloat16", "training.mixed_precision_param": "bfloat16",
                       "optimizer.state_dtype": "float32", "optimizer.compensation": "none", "optimizer.moments_rounding": "auto"},
    "bf16-sr": {"training.dtype": "bfloat16", "training.mixed_precision_param": "bfloat16",
                "optimizer.state_dtype": "auto", "optimizer.compensation": "stochastic", "optimizer.moments_rounding": "auto"},
    "bf16-kahan": {"training.dtype": "bfloat16", "training.mixed_precision_param": "bfloat16",
                   "optimizer.state_dtype": "auto", "optimizer.compensation": "kahan", "optimizer.moments_rounding": "auto"},
    "bf16-int8": {"training.dtype": "bfloat16", "training.mixed_precision_param": "bfloat16",
                  "optimizer.state_dtype": "int8", "optimizer.compensation": "stochastic", "optimizer.moments_rounding": "auto"},
}


def recipe_of(cfg: Config) -> str | None:
    """The recipe whose keys the config matches (a run is named by its values, not by how they were set)."""
    for name, keys in RECIPES.items():
        if all(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == v for k, v in keys.items()):
            return name
    return None


def storage_dtype(cfg: Config) -> torch.dtype:
    """Dtype of parameters and gradients."""
    return DTYPES[cfg.training.dtype]


def compute_dtype(cfg: Config) -> torch.dtype:
    """Dtype of the matmuls: the storage dtype under full bf16, mixed_precision_param over fp32 storage."""
    if cfg.training.dtype == "bfloat16":
        return torch.bfloat16
    return DTYPES[cfg.training.mixed_precision_param]


def autocast(cfg: Config, device: torch.device, sharded: bool = False) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16-mixed`` (fp32 storage, bf16 compute) on one device or under DDP; a no-op otherwise.

    ``sharded``: the model is under FSDP2, whose MixedPrecisionPolicy (:func:`fsdp_policy`) casts the
    parameters to the compute dtype instead, so autocast is not used.
    """
    if not sharded and storage_dtype(cfg) == torch.float32 and compute_dtype(cfg) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fsdp_policy(cfg: Config) -> MixedPrecisionPolicy:
    """FSDP2's MixedPrecisionPolicy for the run.

    fp32 storage (``fp32``, ``bf16-mixed``): the fp32 shards are cast to the compute dtype when FSDP
    gathers them for the forward and backward (instead of autocast), and gradients are reduce-scattered
    in training.mixed_precision_reduce, then stored in fp32. Full bf16: no policy; parameters are
    gathered, and gradients reduced and stored, in bf16, so no fp32 copy exists anywhere.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if storage_dtype(cfg) == torch.float32:
        compute = compute_dtype(cfg)
        return MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute,
                                    reduce_dtype=DTYPES[cfg.training.mixed_precision_reduce])
    return MixedPrecisionPolicy()


def suspicious_precision_settings(cfg: Config, dp_shard: int | None = None) -> list[str]:
    """Legal settings that are probably not meant, in words a user understands (config.validate warns once).

    ``dp_shard``: the FSDP degree once the world size is known (the trainer asks again then); None before.
    """
    t, o = cfg.training, cfg.optimizer
    out = []
    if dp_shard is None and cfg.parallelism.dp_shard != -1:
        dp_shard = cfg.parallelism.dp_shard
    if t.mixed_precision_reduce == "bfloat16" and t.dtype == "bfloat16":
        out.append("training.mixed_precision_reduce=bfloat16 has no effect with training.dtype=bfloat16: full "
                   "bfloat16 gradients are reduced in bfloat16 anyway. It only chooses the reduce dtype of "
                   "fp32 parameters under FSDP2.")
    elif t.mixed_precision_reduce == "bfloat16" and dp_shard == 1:
        out.append("training.mixed_precision_reduce=bfloat16 has no effect without FSDP2 (parallelism.dp_shard "
                   "is 1): one device does not reduce gradients, and DDP reduces them in their own dtype.")
    if t.dtype == "bfloat16" and t.mixed_precision_param == "float32":
        out.append("training.dtype=bfloat16 with training.mixed_precision_param=float32: parameters are stored in "
                   "bfloat16, so the forward and backward run in bfloat16 anyway; mixed_precision_param only "
                   "chooses the compute dtype when training.dtype=float32. Set training.dtype=float32 for fp32 "
                   "compute, or leave mixed_precision_param at bfloat16.")
    if t.dtype == "float32" and o.compensation != "none":
        out.append(f"optimizer.compensation={o.compensation} has no effect with training.dtype=float32: "
                   "compensation only protects bfloat16 weights from rounding. Set it to 'none'.")
    if t.dtype == "float32" and o.state_dtype == "bfloat16":
        out.append("optimizer.state_dtype=bfloat16 with training.dtype=float32 stores the Adam moments in less "
                   "precision than the weights; this saves 4 bytes/param but is not a recipe we measure.")
    return out


# ---- fp32 islands ---------------------------------------------------------------------------


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float,
                 scaling: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables [max_seq_len, head_dim // 2], computed and kept in fp32 (island 1).

    ``scaling`` is Llama 3.1's frequency rescaling (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings), as in the reference implementation.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    if scaling:
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
        mid = (1 - smooth) * freqs / factor + smooth * freqs
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        freqs = torch.where(is_mid, mid, scaled)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] (Meta's interleaved pairs) in fp32, cast back (island 1)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, : x.shape[1], None, :], sin[None, : x.shape[1], None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the statistics in fp32, the result cast back to x's dtype (island 2)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy (mean over the labels that are not ``ignore_index``, or their ``sum``) with the
    logits upcast to fp32 here, in the loss, not in the model (island 4)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index,
                           reduction=reduction)


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP2 shard). None can exist before torch.distributed.tensor is imported, and importing it
    costs a second, so commands that never shard do not."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, each tensor's norm and their sum accumulated in fp32 (island 5).

    Sharded (FSDP2, DTensor) gradients: each rank sums the squares of its own shards in fp32 and the
    sums are all-reduced over the ranks that hold different shards (not over replicas, which hold the
    same ones), so every rank gets the norm of the whole model's gradient.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([_local(g) for g in grads], 2, dtype=torch.float32)
    if not is_sharded(grads[0]):
        return torch.linalg.vector_norm(torch.stack(norms))
    squares = torch.stack(norms).square().sum()
    mesh = grads[0].device_mesh
    for dim, placement in enumerate(grads[0].placements):
        if placement.is_shard():
            torch.distributed.all_reduce(squares, group=mesh.get_group(dim))
    return squares.sqrt()


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm (fp32) is at most max_norm; returns the norm before clipping.

    Like torch.nn.utils.clip_grad_norm_, but the per-tensor norms are returned in fp32 rather than
    in the gradients' dtype (bf16 would round the norm itself by up to 0.4%). No host sync.
    """
    params = list(params)
    total = grad_norm(params)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([_local(p.grad) for p in params if p.grad is not None], coef)
    return total


def init_normal_(param: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    """Fill ``param`` with N(0, std) clipped to ±3 std, drawn in fp32 and rounded once to its dtype (island 7).

    Drawing in fp32 makes the initial weights of every recipe the same values (the bf16 ones are
    the fp32 ones rounded), which compare needs; only one tensor at a time exists in fp32.

    A sharded (DTensor) parameter gets its slice of the same full draw, so FSDP starts from the
    weights of a single-process run: every rank draws the whole tensor from the same generator
    (one parameter at a time, never the model) and keeps its own shard, without communication.
    """
    with torch.no_grad():
        values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        values.normal_(0.0, std, generator=generator).clamp_(-3 * std, 3 * std)
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            values = distribute_tensor(values, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(values)
