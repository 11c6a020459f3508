"""A plain Llama and training loop written as a new user would, with no fp32 islands: the yardstick of
benchmarks/throughput.py's `plain` and `plain-compiled` rows (issue 37).

Everything runs in the parameters' dtype: RMSNorm's statistics, RoPE's tables and rotation, the logits and the
loss (F.cross_entropy on bf16 logits), torch.optim.AdamW(foreach=True) on bf16 parameters, no gradient clipping
island (torch's clip_grad_norm_ in the gradients' dtype). Same shapes as leantrain's flavor (dims read from
leantrain.model.FLAVORS), same attention kernel (SDPA, causal), GQA by repeat_interleave.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):  # x [batch, seq, heads, head_dim], interleaved pairs, in x's dtype
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, : x.shape[1], None], sin[None, : x.shape[1], None]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.kv, self.hd = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, self.h * self.hd, bias=False)
        self.wk = nn.Linear(a.dim, self.kv * self.hd, bias=False)
        self.wv = nn.Linear(a.dim, self.kv * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, a.dim, bias=False)
        self.w1 = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.w2 = nn.Linear(a.ffn_dim, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.n1, self.n2 = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        y = self.n1(x)
        q = rope(self.wq(y).view(b, s, self.h, self.hd), cos, sin)
        k = rope(self.wk(y).view(b, s, self.kv, self.hd), cos, sin).repeat_interleave(self.h // self.kv, dim=2)
        v = self.wv(y).view(b, s, self.kv, self.hd).repeat_interleave(self.h // self.kv, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(att.transpose(1, 2).reshape(b, s, -1))
        y = self.n2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


class PlainLlama(nn.Module):
    def __init__(self, a, seq: int):
        super().__init__()
        self.emb = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.out = nn.Linear(a.dim, a.vocab_size, bias=False)
        freqs = 1.0 / (a.rope_theta ** (torch.arange(0, a.dim // a.n_heads, 2) / (a.dim // a.n_heads)))
        angles = torch.outer(torch.arange(seq), freqs)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, tokens):
        h = self.emb(tokens)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        return self.out(self.norm(h))


def run_plain(flavor: str, dtype: torch.dtype, batches: list[torch.Tensor], compile: bool) -> list[float]:
    """Seconds per step of the plain loop over ``batches`` [batch, seq + 1]; ``compile``: torch.compile(model)."""
    from leantrain.model import FLAVORS

    args = FLAVORS[flavor]
    torch.manual_seed(0)
    model = PlainLlama(args, batches[0].shape[1] - 1).to(dtype)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    times = []
    for batch in batches:
        t = time.perf_counter()
        logits = step_model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times
