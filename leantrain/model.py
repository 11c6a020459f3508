"""The Llama 3 model: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Also the few things by which the Llama-shaped families of Hugging Face differ from it, each off for a Llama:
a head size independent of dim / n_heads (Mistral-Nemo, Qwen3), a bias on the q/k/v projections (Qwen2),
an RMSNorm of each query and key head before RoPE (Qwen3), and a sliding attention window (Mistral 7B v0.1).

A :class:`KVCache` lets generation run one new position at a time against the keys and values already computed.

Model code only: precision and parallelism are applied to it by other modules. The fp32 islands it
touches (RoPE, RMSNorm statistics) are functions of leantrain.precision, called here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import precision
from .errors import ConfigError
from .utils import set_default_dtype

LLAMA3_ROPE_SCALING_8K = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # The Llama-shaped families (off, or derived, for a Llama: an older checkpoint, which lacks these
    # fields, still describes the same model).
    head_dim: int = 0
    """Size of one attention head. 0: dim // n_heads (Llama), filled in when the ModelArgs is made."""
    qkv_bias: bool = False
    """A bias on the q, k and v projections (Qwen2, Qwen2.5)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head, before RoPE (Qwen3)."""
    sliding_window: int = 0
    """Each token attends to itself and the sliding_window - 1 tokens before it (Mistral 7B v0.1). 0: all."""
    family: str = "llama"
    """The Hugging Face model_type these weights came from and export writes: llama, mistral, qwen2, qwen3."""

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads


# The model sizes, declared here once (config's model.flavor, the planner and the benchmarks read them). 1B / 3B /
# 8B / 70B are the published Llama 3.2-1B, 3.2-3B, 3.1-8B and 3.1-70B (their config.json); debug and small are
# for tests and CPUs, their vocabulary the tokenizer's (TOKENIZER_SIZED_FLAVORS).
FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=259, max_seq_len=256),
    "small": ModelArgs(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024, vocab_size=259, max_seq_len=1024),
    "1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        tie_embeddings=True,
        rope_scaling={**LLAMA3_ROPE_SCALING_8K, "factor": 32.0},
        max_seq_len=131072,
    ),
    "3B": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim=8192,
        tie_embeddings=True,
        rope_scaling={**LLAMA3_ROPE_SCALING_8K, "factor": 32.0},
        max_seq_len=131072,
    ),
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        rope_scaling=LLAMA3_ROPE_SCALING_8K,
        max_seq_len=131072,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        rope_scaling=LLAMA3_ROPE_SCALING_8K,
        max_seq_len=131072,
    ),
}

TOKENIZER_SIZED_FLAVORS = ("debug", "small")  # vocab_size: the tokenizer's unless model.vocab_size says


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return precision.rms_norm(x, self.weight, self.eps)


def check_seq_len(seq_len: int, args: ModelArgs, model: str) -> None:
    """data.seq_len fits the model's positions (max_seq_len: a flavor's, or an HF config's max_position_embeddings,
    which includes its RoPE scaling); ConfigError naming both otherwise."""
    if seq_len > args.max_seq_len:
        raise ConfigError(
            f"data.seq_len = {seq_len} is longer than the {args.max_seq_len} positions of {model} (its "
            f"max_position_embeddings, RoPE scaling included): positions past them were never trained "
            f"and would not be exported. Use data.seq_len <= {args.max_seq_len}."
        )


def sliding_window_mask(seq: int, window: int, device: torch.device, start_pos: int = 0) -> torch.Tensor | None:
    """The attention mask [seq, start_pos + seq] (True: attend) of queries at positions start_pos.. against keys
    at 0..: causal, within the sliding window when there is one. None where plain causal attention is the same
    thing (from position 0, no window or one at least as long as the sequence), so that SDPA keeps its
    ``is_causal`` fast path: a mask costs seq x seq memory and rules out the flash kernels. ``start_pos`` > 0:
    a chunk decoded against a :class:`KVCache` (SDPA's ``is_causal`` aligns a short query block to the first
    keys, not the last, so such a chunk always gets a mask)."""
    if not start_pos and (not window or seq <= window):
        return None
    behind = (
        torch.arange(start_pos, start_pos + seq, device=device)[:, None]
        - torch.arange(start_pos + seq, device=device)[None, :]
    )  # query position minus key position
    return (behind >= 0) & (behind < window) if window else behind >= 0


def segment_mask(positions: torch.Tensor, window: int) -> torch.Tensor:
    """The attention mask [batch, 1, seq, seq] (True: attend) of packed rows: block-diagonal causal, each token
    attending only to the tokens before it in its own sample (within the sliding window when there is one).
    ``positions`` [batch, seq] count from 0 in each sample, so a sample starts wherever a position is 0.

    SDPA with this boolean mask, not flex_attention: on CPU (torch 2.13) flex_attention has no backward at all,
    and SDPA with the mask measured only a little slower than causal SDPA (a one-off measurement, torch 2.13).
    Made once per forward, shared by the layers."""
    segment = (positions == 0).cumsum(dim=1)  # [batch, seq]: which sample of the row a token belongs to
    same = segment[:, :, None] == segment[:, None, :]
    behind = positions[:, :, None] - positions[:, None, :]  # within a sample, query position minus key position
    allowed = same & (behind >= 0)
    if window:
        allowed &= behind < window
    return allowed[:, None]


def batch_loss(model: nn.Module, batch: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """The fp32 mean token loss of a batch (on the model's device): (inputs, labels), or (inputs, labels, positions)
    for packed SFT samples. Training's step and evaluation both call this."""
    positions = batch[2] if len(batch) > 2 else None
    return model(batch[0], positions=positions, labels=batch[1])


class KVCache:
    """The keys and values of the positions already run, so that generation runs each new token alone.

    Per layer a key and a value buffer [batch, max_len, n_kv_heads, head_dim] (per key/value head, before GQA's
    repeat; keys after RoPE), preallocated in the model's dtype. ``model(tokens, cache, start_pos)`` writes the
    keys and values of positions start_pos.. and attends to every position before them that the causal mask
    (and the sliding window) lets them see.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, max_len, args.n_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3 normalizes each head of q and k (one weight per head_dim, shared by the heads) in place of
        # Qwen2's q/k/v bias: q . k can then not grow with the weights, which steadies training.
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """``cache``: this layer's (keys, values) buffers of a :class:`KVCache`; x holds positions start_pos.."""
        bsz, seq, _ = x.shape
        # -1 heads: all of them, or under tensor parallelism this rank's (parallel.apply_tp splits whole heads)
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = precision.apply_rotary(q, cos, sin), precision.apply_rotary(k, cos, sin)
        if cache is not None:  # store this chunk's keys and values, attend to the whole prefix
            end = start_pos + seq
            cache[0][:, start_pos:end], cache[1][:, start_pos:end] = k, v
            k, v = cache[0][:, :end], cache[1][:, :end]
        # Grouped-query attention: each key/value head serves n_heads // n_kv_heads query heads.
        repeat = self.n_heads // self.n_kv_heads
        k, v = (t.repeat_interleave(repeat, dim=2) if repeat > 1 else t for t in (k, v))
        # SDPA's kernels accumulate the softmax in fp32 for bf16 inputs (fp32 island 3). ``mask``: a sliding
        # window (sliding_window_mask) or packed samples (segment_mask), which already hold the causal part.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # RoPE tables: fp32 whatever the default dtype, not saved in checkpoints (recomputed by init_weights).
        cos, sin = precision.rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """Llama 3.2-1B shares the embedding and output matrices (to_empty unties them: call again after)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        *,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab] in the compute dtype (the loss upcasts them).

        With ``labels`` [batch, seq]: the fp32 mean token loss instead (training and evaluation), computed with the
        output projection by :func:`precision.linear_cross_entropy`, so the full logits never exist. Inside the
        forward, so that FSDP2 has gathered the output matrix (it belongs to the root's parameters).

        With a ``cache`` (generation), tokens are positions start_pos.. (RoPE at those absolute positions): their
        keys and values go into the cache and they attend to the positions before them held there.

        With ``positions`` [batch, seq] (packed samples, restarting at 0 at each sample): RoPE at those positions,
        and each token attends only to its own sample (:func:`segment_mask`).
        """
        seq = tokens.shape[1]
        if start_pos + seq > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + seq} tokens is longer than max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        if positions is not None:
            if cache is not None:
                raise ValueError("positions (packed samples) and a KV cache (generation) do not go together")
            mask = segment_mask(positions, self.args.sliding_window)  # one for all layers
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            for layer in self.layers:
                h = layer(h, cos, sin, mask)
            return self._head(h, labels)
        mask = sliding_window_mask(seq, self.args.sliding_window, tokens.device, start_pos)  # one for all layers
        if cache is None:
            for layer in self.layers:
                h = layer(h, self.rope_cos, self.rope_sin, mask)
        else:
            cos, sin = self.rope_cos[start_pos:], self.rope_sin[start_pos:]
            for i, layer in enumerate(self.layers):
                h = layer(h, cos, sin, mask, (cache.k[i], cache.v[i]), start_pos)
        return self._head(h, labels)

    def _head(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The final norm, then the logits, or with labels the loss (the output projection inside it)."""
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        weight = self.output.weight
        if torch.is_autocast_enabled(h.device.type):  # bf16-mixed without FSDP: the matmuls' dtype, cast once here
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            return precision.linear_cross_entropy(h, weight, labels)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter (in its own dtype, via fp32 draws) and recompute the RoPE tables.

        nanoGPT's scheme: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers) so
        the residual stream's variance does not grow with depth; norms start at 1, biases (Qwen2's q/k/v) at 0.
        """
        device = self.tok_embeddings.weight.device
        generator = torch.Generator(device).manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                precision.init_normal_(param, std, generator)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the fp32 RoPE tables on the model's device (after to_empty, or when loading weights)."""
        device = self.tok_embeddings.weight.device
        cos, sin = precision.rope_cos_sin(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.args.rope_scaling
        )
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)


def model_args(flavor: str, **overrides) -> ModelArgs:
    """The flavor's dimensions with overrides (None or 0 keeps the flavor's value)."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; known: {', '.join(FLAVORS)}")
    given = {k: v for k, v in overrides.items() if v}
    # The flavors are Llamas, whose head size follows dim / n_heads: derived again after the overrides.
    args = dataclasses.replace(FLAVORS[flavor], **{"head_dim": 0, **given})
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or args.head_dim % 2:
        raise ValueError(
            f"dim={args.dim}, n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}: dim must be a "
            "multiple of n_heads with an even head size, and n_kv_heads must divide n_heads"
        )
    return args


def build_model(
    flavor: str = "debug", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0, **dims
) -> Transformer:
    """Build a Llama on the meta device in ``dtype``, then materialize it on ``device`` and initialise it.

    No parameter ever exists in another dtype: full bf16 never allocates an fp32 copy of the model.
    With ``device="meta"`` the model is only a shape (for counting and planning).
    """
    return build_model_from_args(model_args(flavor, **dims), dtype, device, seed)


def build_model_from_args(
    args: ModelArgs, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int | None = 0
) -> Transformer:
    """:func:`build_model` for explicit dimensions. ``seed=None`` leaves the weights uninitialised (for a
    caller about to load them from a checkpoint or a Hugging Face folder); the RoPE tables are computed."""
    with torch.device("meta"), set_default_dtype(dtype):
        model = Transformer(args)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        if seed is None:
            model.init_rope()
        else:
            model.init_weights(seed)
    return model


def num_params(model: nn.Module) -> int:
    """Parameters counted once (tied embeddings count once, as in the published figures)."""
    return sum(p.numel() for p in model.parameters())
