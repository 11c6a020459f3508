"""The Hugging Face model families leantrain loads and exports, one declaration each: the registry.

A family is a ``model_type`` of transformers whose network leantrain's :class:`leantrain.model.Transformer`
represents exactly. Its :class:`Family` says everything that differs between families: the architecture class
config.json names, how config.json spells the head size and the sliding window, which extra tensors the blocks
have (Qwen2's q/k/v bias, Qwen3's q/k norms), which config.json settings are refused, and which keys export
writes. Loading and export (:mod:`leantrain.hf`), the planner, the error messages and the tests' family table all
read :data:`FAMILIES`; adding a family is one entry here and a variant in ``tests/test_hf.py``.

What every family shares is here too: the tensor names (:func:`weight_names`, the same in every family) and
RoPE's reading (:func:`rope_of`: theta and Llama 3.1's scaling). Tying (``tie_word_embeddings``) is read from
config.json in every family, false where absent, as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import CheckpointError

# How a family's config.json gives its sliding attention window:
#   "none":     it has none (a window on a model of this family cannot be written);
#   "all":      ``sliding_window`` applies to every layer (Mistral);
#   "per_layer": only with ``use_sliding_window``, on the layers ``layer_types`` (or ``max_window_layers``) names
#               (Qwen2, Qwen3).
WindowStyle = Literal["none", "all", "per_layer"]


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    """The transformers class config.json names in "architectures" (AutoModelForCausalLM builds it)."""
    qkv_bias: bool = False
    """A bias on the q, k and v projections."""
    qk_norm: bool = False
    """An RMSNorm of each query and key head before RoPE."""
    default_head_dim: int | None = None
    """The head size where config.json has no head_dim (None: hidden_size / num_attention_heads)."""
    window: WindowStyle = "none"
    refused_if_true: dict[str, str] = field(default_factory=dict)
    """config.json keys whose true value describes a network leantrain lacks, with why."""
    export_keys: dict[str, Any] = field(default_factory=dict)
    """Keys export writes with these values, so transformers builds the same network (its defaults differ)."""


_NO_O_BIAS = {"attention_bias": "a bias on o_proj too; leantrain has Qwen2's q/k/v bias only"}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            refused_if_true=_NO_O_BIAS,
            export_keys={"attention_bias": False, "mlp_bias": False},
        ),
        Family("mistral", "MistralForCausalLM", window="all"),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, window="per_layer"),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            qk_norm=True,
            default_head_dim=128,
            window="per_layer",
            refused_if_true=_NO_O_BIAS,
            export_keys={"attention_bias": False},
        ),
    )
}

# Settings of any family's config.json that leantrain's blocks cannot represent: (key, the one value allowed).
REQUIRED_VALUES = (("hidden_act", "silu"), ("mlp_bias", False))
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# model_types of known relatives that are not families, and why (the refusal says it).
_MOE_TYPES = ("mixtral", "dbrx", "deepseek_v2", "deepseek_v3", "jamba", "llama4", "olmoe")
_GEMMA = (
    "Gemma's norms (RMSNorm scaled by 1 + weight, and Gemma 2/3's extra norms around each block), its scaled "
    "embeddings and GELU feed-forward differ from the Llama's"
)


def family_names() -> str:
    """'llama, mistral, qwen2, qwen3': for messages and help."""
    return ", ".join(FAMILIES)


def family_of(model_type: Any, where: str) -> Family:
    """The family of a config.json's model_type; anything else is refused, saying what differs where it is a
    known relative."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    name = str(model_type).lower()
    if "moe" in name or name in _MOE_TYPES:
        why = "a mixture-of-experts model; leantrain's blocks have one dense SwiGLU feed-forward"
    elif name.startswith("gemma"):
        why = _GEMMA
    else:
        why = "not one of the Llama-shaped families leantrain has"
    raise CheckpointError(
        f"{where} has model_type={model_type!r}: {why}. leantrain loads model_type "
        f"{', '.join(map(repr, FAMILIES))} only."
    )


def rope_of(config: dict[str, Any], unsupported: list[str]) -> tuple[float, dict[str, Any] | None]:
    """RoPE's theta and Llama 3.1 scaling (transformers 4.x rope_theta/rope_scaling or 5.x rope_parameters)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        unsupported.append(f"partial_rotary_factor={partial!r} (leantrain rotates the whole head)")
    if rope_type == "llama3":
        scaling = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        return theta, scaling
    if rope_type != "default":
        unsupported.append(f"RoPE type {rope_type!r} (leantrain has 'default' and Llama 3.1's 'llama3')")
    return theta, None


def window_of(config: dict[str, Any], family: Family, n_layers: int, max_seq_len: int, unsupported: list[str]) -> int:
    """The attention window of every layer (0: none), read as the family spells it (WindowStyle). leantrain has
    one window for all layers: a window on some layers only is refused where it would matter (shorter than
    max_seq_len, the trained seq_len) and dropped where it changes nothing."""
    window = int(config.get("sliding_window") or 0)
    if family.window == "none" or not window:
        return 0
    if family.window == "all":
        return window
    if not config.get("use_sliding_window"):
        return 0
    types = config.get("layer_types") or [
        "sliding_attention" if i >= int(config.get("max_window_layers", 0)) else "full_attention"
        for i in range(n_layers)
    ]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if len(sliding) == n_layers:
        return window
    if sliding and window < max_seq_len:
        unsupported.append(
            f"a sliding window of {window} tokens on {len(sliding)} of the {n_layers} layers only "
            f"(leantrain has one window for every layer; with seq_len <= {window} it changes nothing)"
        )
    return 0


def window_keys(family: Family, window: int, n_layers: int) -> dict[str, Any]:
    """The config.json keys that say ``window`` (0: none) the way the family spells it."""
    if family.window == "all":
        return {"sliding_window": window or None}
    if family.window == "per_layer":  # the window on every layer (max_window_layers=0), or on none
        return {
            "use_sliding_window": bool(window),
            "sliding_window": window or None,
            "max_window_layers": 0 if window else n_layers,
        }
    return {}


def weight_names(n_layers: int, tie_embeddings: bool, qkv_bias: bool, qk_norm: bool) -> dict[str, str]:
    """leantrain parameter name -> HF tensor name (the same names in every family; see leantrain.hf)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    if qkv_bias:
        per_layer.update({f"attention.w{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"})
    if qk_norm:
        per_layer.update({f"attention.{x}_norm.weight": f"self_attn.{x}_norm.weight" for x in "qk"})
    for i in range(n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in per_layer.items()})
    return names
