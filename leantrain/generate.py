"""``leantrain generate``: continue a prompt with a run's model or a Hugging Face model.

One forward over the prompt fills a :class:`leantrain.model.KVCache`; then each new token runs alone, at its
position, attending to the cached keys and values. Everything runs in the model's own dtype (a bf16 model
generates in bf16); only the choice of the next token is made from fp32 logits (precision island 8).

temperature 0 (the default): greedy, the most likely token each step. Otherwise the token is drawn from
softmax(logits / temperature), cut to the top-p nucleus, with a ``torch.Generator`` seeded by ``seed``, so
the same settings give the same text. Generation stops after max_new_tokens or at EOS (which it returns).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .data.tokenizer import Tokenizer
from .errors import ConfigError
from .loader import load_for_inference
from .model import KVCache
from .precision import sampling_probs

DEFAULT_NEW_TOKENS = 64


def check_settings(max_new_tokens: int | None, temperature: float, top_p: float) -> None:
    """ConfigError (exit 2) for settings generation cannot use."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens={max_new_tokens}: it must be a whole number of at least 1.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(
            f"--temperature={temperature}: it must be 0 (greedy) or a positive number (softmax of "
            f"logits / temperature)."
        )
    if not (0 < top_p <= 1):
        raise ConfigError(
            f"--top_p={top_p}: it must be in (0, 1] (the share of probability the sampled tokens "
            f"come from; 1: all of them)."
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The ids that continue ``prompt_ids`` (without the prompt), the last one ``eos_id`` where generation stopped
    there. ``max_new_tokens`` None: 64, or as many as the model's positions (max_seq_len) leave after the prompt;
    given, a prompt and max_new_tokens beyond max_seq_len is a ConfigError naming both numbers."""
    check_settings(max_new_tokens, temperature, top_p)
    limit = model.args.max_seq_len
    if not prompt_ids:
        raise ConfigError("The prompt has no tokens (an empty prompt and a tokenizer without BOS); give some text.")
    needed = len(prompt_ids) + (max_new_tokens or 1)
    if needed > limit:
        raise ConfigError(
            f"The prompt's {len(prompt_ids)} tokens and {max_new_tokens or 1} new token(s) need {needed} "
            f"positions, but the model has {limit} (its max_seq_len). Shorten the prompt or lower "
            f"--max_new_tokens to at most {max(limit - len(prompt_ids), 0)}."
        )
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, limit - len(prompt_ids))
    weight = model.tok_embeddings.weight
    cache = KVCache(model.args, 1, len(prompt_ids) + max_new_tokens, weight.dtype, weight.device)
    generator = torch.Generator(weight.device).manual_seed(seed) if temperature > 0 else None
    logits = model(torch.tensor([prompt_ids], device=weight.device), cache, 0)[0, -1]
    out: list[int] = []
    while True:
        if temperature > 0:
            probs = sampling_probs(logits, temperature, top_p)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())  # exact in any dtype: the largest logit is the largest in fp32 too
        out.append(token)
        if token == eos_id or len(out) == max_new_tokens:
            return out
        position = len(prompt_ids) + len(out) - 1
        logits = model(torch.tensor([[token]], device=weight.device), cache, position)[0, -1]


def continuation(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of ``new_ids`` after the prompt: decoded together with the prompt and cut after the prompt's own
    text where that is a prefix (tokenizers that merge a leading space, or a character split over two ids), a
    final EOS dropped."""
    body = [i for i in prompt_ids if i != tokenizer.bos_id]
    new = new_ids[:-1] if new_ids and new_ids[-1] == tokenizer.eos_id else new_ids
    before, whole = tokenizer.decode(body), tokenizer.decode(body + new)
    return whole[len(before) :] if whole.startswith(before) else tokenizer.decode(new)


def run_generate(
    checkpoint_path: str | None,
    overrides: dict[str, str],
    prompt: str,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """What ``leantrain generate`` does: prints the prompt and its continuation; returns the continuation."""
    check_settings(max_new_tokens, temperature, top_p)
    loaded = load_for_inference("generate", checkpoint_path, overrides)
    tokenizer = loaded.tokenizer
    prompt_ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(prompt)
    new_ids = generate(loaded.model, prompt_ids, max_new_tokens, temperature, top_p, seed, tokenizer.eos_id)
    text = continuation(tokenizer, prompt_ids, new_ids)
    print(prompt + text, flush=True)
    return text
