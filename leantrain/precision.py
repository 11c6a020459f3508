"""Every dtype decision of leantrain, in one place.

Numerics only: the recipes that choose the dtypes are config facts (leantrain.config). A run has a
*storage* dtype (params, grads, and Adam moments unless optimizer.state_dtype says otherwise) and a
*compute* dtype (the matmuls), held in a :class:`Precision`. Full bf16 stores and computes in bf16;
``bf16-mixed`` stores fp32 and computes bf16 under autocast.

The fp32 islands, kept in fp32 in every recipe, are the functions of this module that the model,
the loss and the trainer call (and nowhere else casts):

1. RoPE: frequencies computed and stored in fp32 (:func:`rope_cos_sin`), the rotation applied in
   fp32 and cast back (:func:`apply_rotary`). In bf16, angles of positions in the thousands lose
   all their fractional part.
2. RMSNorm statistics: mean of squares and rsqrt in fp32 (:func:`rms_norm`), for every RMSNorm: the two
   of each block, the final one, and Qwen3's per-head q and k norms (before RoPE), whose bf16 statistic
   would otherwise set the scale of every attention logit.
3. Attention softmax accumulation: done in fp32 by ``scaled_dot_product_attention``'s kernels for
   bf16 inputs (their accumulate type is fp32); tested in tests/test_precision.py.
4. The logits fed to the loss and the loss itself: cast in the loss (:func:`cross_entropy`), not in
   the model, so the model's output stays in the compute dtype. Training and evaluation compute the output
   projection and the loss together (:func:`linear_cross_entropy`), one chunk of the vocabulary at a time, so
   that neither the full logits nor their fp32 copy ever exists.
5. The gradient-norm accumulation for clipping (:func:`clip_grad_norm_`).
6. The optimizer's arithmetic (upcast, compute, round once): leantrain.optim.
7. Initial weights: drawn in fp32 one tensor at a time, then rounded to the storage dtype
   (:func:`init_normal_`), so every recipe starts from the same weights, and full bf16
   never holds an fp32 copy of the model.
8. The sampling distribution of ``leantrain generate``: the last position's logits upcast to fp32, then
   temperature, softmax and top-p (:func:`sampling_probs`), whatever the model's dtype. In bf16 a
   temperature-divided softmax would round the probabilities of the tail (and the nucleus' cumulative sum)
   to 8 bits of mantissa.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn.functional as F

from .distributed import is_dtensor, local, part_like, split_dim

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE_INDEX = -100  # the label of a token the loss skips (a prompt token, padding)


@dataclass(frozen=True)
class Precision:
    """The dtypes of a run: ``storage`` (parameters, gradients), ``compute`` (the matmuls) and ``reduce`` (FSDP2's
    gradient reduce-scatter over fp32 storage). Built from the config by leantrain.runplan."""

    storage: torch.dtype
    compute: torch.dtype
    reduce: torch.dtype

    def autocast(self, device: torch.device, sharded: bool = False) -> contextlib.AbstractContextManager:
        """Autocast for ``bf16-mixed`` (fp32 storage, bf16 compute) on one device or under DDP; a no-op otherwise.

        ``sharded``: the model is under FSDP2, whose MixedPrecisionPolicy (:meth:`fsdp_policy`) casts the
        parameters to the compute dtype instead, so autocast is not used.
        """
        if not sharded and self.storage == torch.float32 and self.compute == torch.bfloat16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fsdp_policy(self) -> MixedPrecisionPolicy:
        """FSDP2's MixedPrecisionPolicy for the run.

        fp32 storage (``fp32``, ``bf16-mixed``): the fp32 shards are cast to the compute dtype when FSDP
        gathers them for the forward and backward (instead of autocast), and gradients are reduce-scattered
        in ``reduce``, then stored in fp32. Full bf16: no policy; parameters are gathered, and gradients
        reduced and stored, in bf16, so no fp32 copy exists anywhere.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.storage == torch.float32:
            return MixedPrecisionPolicy(
                param_dtype=None if self.compute == torch.float32 else self.compute, reduce_dtype=self.reduce
            )
        return MixedPrecisionPolicy()


# ---- fp32 islands ---------------------------------------------------------------------------


def rope_cos_sin(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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
    """Rotate x [batch, seq, heads, head_dim] (Meta's interleaved pairs) in fp32, cast back (island 1).

    ``cos``/``sin``: the tables [positions, head_dim // 2] (x is positions 0..seq-1), or the tables already
    gathered at each token's position [batch, seq, head_dim // 2] (packed samples)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    if cos.dim() == 2:
        cos, sin = cos[None, : x.shape[1]], sin[None, : x.shape[1]]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the statistics in fp32, the result cast back to x's dtype (island 2)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy, the mean over the labels that are not IGNORE_INDEX, with the logits upcast to fp32
    here, in the loss, not in the model (island 4)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


LOSS_VOCAB_CHUNK = 8192  # vocabulary entries per chunk of the output projection and the loss (island 4)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_VOCAB_CHUNK
) -> torch.Tensor:
    """The output projection and the token cross-entropy in one, without the full logits (island 4).

    ``hidden`` [..., dim] (the final norm's output, in the compute dtype), ``weight`` [vocab, dim] (the output
    matrix, cast to the compute dtype by the caller), ``labels`` [...] -> the fp32 mean loss over the labels that
    are not IGNORE_INDEX: the value of ``cross_entropy(hidden @ weight.T, labels)`` within fp32 rounding.

    At Llama 3's 128,256-token vocabulary the logits (compute dtype) and their fp32 copy are a training step's
    largest activation: 10 bytes per vocabulary entry per token, 10.5 GB at 8,192 tokens. Here they exist one
    chunk of ``chunk`` vocabulary entries at a time, in the forward (a running log-sum-exp in fp32) and again in
    the backward, which recomputes each chunk's logits from ``hidden`` and ``weight`` (one more matmul of the
    output layer per step). The loss and every softmax stay fp32.

    Chunks of the vocabulary rather than of tokens (torchtune's chunked loss cuts tokens): each chunk's rows of
    the output matrix's gradient are then one matmul over every token, rounded once as without chunking, where
    token chunks would sum per-chunk partial gradients of the (in full bf16: bf16) output matrix. The gradient of
    ``hidden`` is summed over vocabulary chunks in fp32 and rounded once; each chunk's part of it is a
    compute-dtype matmul (torch 2.13 has no bf16 matmul with fp32 output on CPU).
    """
    if weight.shape[0] <= chunk and not is_dtensor(weight):  # one chunk: the logits once, as they always were
        return cross_entropy(F.linear(hidden, weight), labels)
    return _ChunkedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), chunk)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy over vocabulary chunks; saves the fp32 log-sum-exp per token (4 bytes) for the
    backward. Why not torch.utils.checkpoint around each chunk: autograd would still keep every chunk's fp32
    logits (log_softmax saves its output) until the backward reached them, i.e. all of them.

    Under tensor parallelism ``weight`` is a DTensor split by vocabulary rows over the tp group (``hidden`` whole on
    every rank of it): each rank runs the chunks of its own rows, and the group combines the per-token log-sum-exps
    (a max and a sum of exponentials, all-reduced) and target logits (summed: one rank holds each label), so every
    rank gets the whole vocabulary's loss; the backward sums the hidden state's gradient over the group and returns
    each rank's rows of the matrix's gradient. Written here because torch's loss_parallel takes the whole logits
    (10 bytes per vocabulary entry per token), not chunks of them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        rows, first, group, layout = _vocabulary_part(weight)
        valid = labels != IGNORE_INDEX
        lse = torch.full(labels.shape, float("-inf"), dtype=torch.float32, device=hidden.device)
        target = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.shape[0], chunk):
            logits = F.linear(hidden, rows[start : start + chunk]).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            vocab = first + start  # the chunk's first vocabulary id
            inside = valid & (labels >= vocab) & (labels < vocab + logits.shape[1])
            local = torch.where(inside, labels - vocab, 0)
            target += torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), 0.0)
        if group is not None:  # the other ranks' rows
            top = lse.clone()
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
            total = (lse - top).exp()
            torch.distributed.all_reduce(total, group=group)
            torch.distributed.all_reduce(target, group=group)
            lse = top + total.log()
        count = valid.sum()
        ctx.save_for_backward(hidden, rows, labels, lse, count)
        ctx.chunk, ctx.first, ctx.group, ctx.layout = chunk, first, group, layout
        return torch.where(valid, lse - target, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse, count = ctx.saved_tensors
        valid = labels != IGNORE_INDEX
        scale = torch.where(valid, grad_loss / count, 0.0)[:, None]  # fp32 d loss / d logit, per token
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight)
        for start in range(0, weight.shape[0], ctx.chunk):
            w = weight[start : start + ctx.chunk]
            probs = F.linear(hidden, w).float().sub_(lse[:, None]).exp_()
            vocab = ctx.first + start
            inside = valid & (labels >= vocab) & (labels < vocab + w.shape[0])
            rows = inside.nonzero().squeeze(1)
            probs[rows, labels[rows] - vocab] -= 1.0  # softmax minus the one-hot target
            grad_logits = probs.mul_(scale).to(hidden.dtype)  # as the loss's fp32 gradient reaches the matmul
            grad_weight[start : start + w.shape[0]] = grad_logits.T @ hidden
            grad_hidden += grad_logits @ w
        if ctx.group is not None:  # every rank's rows' share of it
            torch.distributed.all_reduce(grad_hidden, group=ctx.group)
        if ctx.layout is not None:
            from torch.distributed.tensor import DTensor

            mesh, placements, shape, stride = ctx.layout
            grad_weight = DTensor.from_local(grad_weight, mesh, placements, shape=shape, stride=stride)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None


def _vocabulary_part(weight: torch.Tensor) -> tuple[torch.Tensor, int, Any, tuple | None]:
    """The output matrix's rows this rank holds, the vocabulary id of the first, the process group holding the other
    rows and the DTensor layout to give its gradient; (weight, 0, None, None) where one rank holds every row."""
    if not is_dtensor(weight):
        return weight, 0, None, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    (dim,) = [d for d, pl in enumerate(weight.placements) if split_dim(pl) is not None]
    first = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)[1][0]
    layout = (weight.device_mesh, weight.placements, weight.shape, weight.stride())
    return weight.to_local(), first, weight.device_mesh.get_group(dim), layout


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, each tensor's norm and their sum accumulated in fp32 (island 5).

    Sharded (FSDP2, tensor-parallel: DTensor) gradients: each rank sums the squares of its own shards in fp32 and
    the sums are all-reduced over the ranks that hold different shards (not over replicas, which hold the same
    ones), so every rank gets the norm of the whole model's gradient. Gradients sharded over different mesh
    dimensions (under tensor parallelism: the blocks' matrices over dp_shard and tp, the norms' and the
    embedding's over dp_shard only) are summed and reduced group by group.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([local(g) for g in grads], 2, dtype=torch.float32)
    if not any(is_dtensor(g) for g in grads):
        return torch.linalg.vector_norm(torch.stack(norms))
    groups: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for g, norm in zip(grads, norms):
        groups.setdefault(_shard_dims(g), (g, []))[1].append(norm)
    return _global_norm((like, torch.stack(ns).square().sum()) for like, ns in groups.values())


def _global_norm(groups: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The norm from (a tensor sharded like the group's, this rank's fp32 sum of the group's squares) pairs: each sum
    all-reduced over the ranks holding the group's other shards, then added (island 5)."""
    return sum(sum_over_shards(squares, like) for like, squares in groups).sqrt()


class SquareSums:
    """fp32 sums of squares of gradients as they are made (gradient release, optim/release.py), kept apart by how
    the gradients are sharded, so that the global norm reduces each over its own ranks (:func:`grad_norm`'s
    grouping: under tensor parallelism the blocks' matrices are split over dp_shard and tp, the norms over
    dp_shard only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._groups: dict[tuple, list] = {}

    def add(self, squares: torch.Tensor, like: torch.Tensor) -> None:
        """Add this rank's sum of squares of one gradient sharded like ``like``."""
        entry = self._groups.setdefault(
            _shard_dims(like), [like, torch.zeros((), dtype=torch.float32, device=self.device)]
        )
        entry[1] += squares

    def norm(self) -> torch.Tensor:
        """The global L2 norm of everything added (every rank's shards)."""
        if not self._groups:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return _global_norm((like, squares) for like, squares in self._groups.values())


def _shard_dims(t: torch.Tensor) -> tuple:
    """The mesh dimensions (by name) over which DTensor `t` is split; () for a plain tensor."""
    if not is_dtensor(t):
        return ()
    names = t.device_mesh.mesh_dim_names or tuple(range(t.device_mesh.ndim))
    return tuple(names[d] for d, pl in enumerate(t.placements) if split_dim(pl) is not None)


def grad_squares(grad: torch.Tensor) -> torch.Tensor:
    """The fp32 sum of squares of one gradient (this rank's shard of a DTensor), for a norm summed as gradients are
    made (island 5: gradient release, optim/release.py, frees each gradient before the next exists). The norm
    accumulated in fp32 and squared, as `grad_norm` takes each tensor's: one reduction over the bf16 gradient,
    with no fp32 copy of it (`.float().square().sum()` made two, transient fp32 copies of the largest gradient
    in the backward whose memory release exists to save)."""
    return torch.linalg.vector_norm(local(grad), 2, dtype=torch.float32).square()


def norm_from_squares(squares: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The global L2 norm from this rank's fp32 sum of squares (island 5): for sharded tensors shaped like ``like``
    (a DTensor) the sums are all-reduced over the ranks holding different shards. Gradient release
    (optim/release.py) sums the squares as each gradient is made, before freeing it."""
    return sum_over_shards(squares, like).sqrt()


def sum_over_shards(squares: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's fp32 sum of squares of tensors sharded like ``like`` summed over the ranks that hold their other
    shards (a new tensor; the sum itself for a plain tensor)."""
    if is_dtensor(like):
        squares = squares.clone()
        mesh = like.device_mesh
        for dim, placement in enumerate(like.placements):
            if split_dim(placement) is not None:
                torch.distributed.all_reduce(squares, group=mesh.get_group(dim))
    return squares


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm (fp32) is at most max_norm; returns the norm before clipping.

    Like torch.nn.utils.clip_grad_norm_, but the per-tensor norms are returned in fp32 rather than
    in the gradients' dtype (bf16 would round the norm itself by up to 0.4%). No host sync.
    """
    params = list(params)
    total = grad_norm(params)
    if max_norm > 0:
        torch._foreach_mul_([local(p.grad) for p in params if p.grad is not None], clip_coefficient(total, max_norm))
    return total


def clip_coefficient(norm: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """The factor that scales a gradient of this (fp32) norm to at most max_norm: 1 when it is within it."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


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
        param.copy_(part_like(values, param))


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The next-token distribution [..., vocab] from logits, in fp32 (island 8): softmax(logits / temperature),
    then top-p nucleus filtering: only the most likely tokens whose cumulated probability first reaches top_p
    (the most likely one always) keep theirs, renormalised. ``temperature`` > 0; top_p in (0, 1], 1: no filter."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    ranked, order = probs.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)  # tokens after the nucleus is full
    kept = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return kept / kept.sum(-1, keepdim=True)
