"""Hugging Face weights in and out: local folders of ``config.json`` + safetensors.

**Families.** The Llama-shaped ``model_type``s of :data:`FAMILIES`: ``llama``; ``mistral`` (a head size
independent of hidden_size / num_attention_heads, Mistral 7B v0.1's sliding window); ``qwen2`` (Qwen2 and
Qwen2.5: a bias on q/k/v); ``qwen3`` (an RMSNorm of each q and k head, an explicit head_dim). Anything else
(mixture-of-experts, Gemma's norms, another activation, another RoPE) is refused, named, before a tensor is read.

    HF tensor                                   leantrain parameter
    model.embed_tokens.weight                   tok_embeddings.weight
    model.layers.{i}.input_layernorm.weight     layers.{i}.attention_norm.weight
    model.layers.{i}.self_attn.q_proj.weight    layers.{i}.attention.wq.weight   (rows reordered, below)
    model.layers.{i}.self_attn.k_proj.weight    layers.{i}.attention.wk.weight   (rows reordered, below)
    model.layers.{i}.self_attn.v_proj.weight    layers.{i}.attention.wv.weight
    model.layers.{i}.self_attn.o_proj.weight    layers.{i}.attention.wo.weight
    model.layers.{i}.self_attn.q_proj.bias      layers.{i}.attention.wq.bias     (qwen2; k, v alike; reordered)
    model.layers.{i}.self_attn.q_norm.weight    layers.{i}.attention.q_norm.weight   (qwen3; k alike; reordered)
    model.layers.{i}.post_attention_layernorm   layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.gate_proj / up_proj / down_proj    layers.{i}.feed_forward.w1 / w3 / w2
    model.norm.weight                           norm.weight
    lm_head.weight                              output.weight   (absent when tie_word_embeddings)

**RoPE layouts.** transformers rotates the two halves of each head (``rotate_half``: dimension j pairs
with j + head_dim/2); Meta's reference code, and :func:`leantrain.precision.apply_rotary`, rotate
interleaved pairs (2j, 2j+1). The same network in the two layouts differs only in the order of the
rows of wq and wk inside each head, so loading reorders them (:func:`_hf_to_meta`) and saving puts
them back (:func:`_meta_to_hf`), the permutation of transformers' ``convert_llama_weights_to_hf.py``.
Whatever is indexed by those rows moves with them: the q and k biases (Qwen2), and the q/k norm weights
(Qwen3, one weight per head dimension, applied before RoPE: the same reordering, as for a single head).
The norm's statistic (the mean of squares over a head) does not depend on the order.

**Dtypes.** The model is built on the meta device in the run's storage dtype and each tensor is read
from its safetensors file and cast on its own, so loading a bf16 model never holds an fp32 copy.
Only safetensors are read: pickled ``.bin`` checkpoints can run code when loaded, and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .data.tokenizer import save_tokenizer
from .distributed import part_like
from .errors import CheckpointError
from .families import (
    FAMILIES,
    MOE_KEYS,
    REQUIRED_VALUES,
    family_names,
    family_of,
    rope_of,
    weight_names,
    window_keys,
    window_of,
)
from .files import read_json
from .model import ModelArgs, Transformer, build_model_from_args

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Tensors some HF checkpoints carry that are not weights (recomputed RoPE frequencies).
_NOT_WEIGHTS = ("rotary_emb.inv_freq",)
_CONVERT_HINT = (
    'Convert it to safetensors first, e.g. python -c "from transformers import AutoModelForCausalLM; '
    "AutoModelForCausalLM.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\""
)


def _hf_names(args: ModelArgs) -> dict[str, str]:
    return weight_names(args.n_layers, args.tie_embeddings, args.qkv_bias, args.qk_norm)


def _heads_of(name: str, args: ModelArgs) -> int | None:
    """How many heads the rows (or entries) of a tensor hold, for those indexed by the dimensions RoPE rotates:
    wq and wk with their biases, and the q/k norm weights (one head's worth); None for every other tensor."""
    if name.endswith(("attention.wq.weight", "attention.wq.bias")):
        return args.n_heads
    if name.endswith(("attention.wk.weight", "attention.wk.bias")):
        return args.n_kv_heads
    if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        return 1
    return None


def _hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from HF's half-split order (j, j + d/2) to Meta's interleaved pairs (2j, 2j+1).
    A 1-d tensor (bias, norm weight) is reordered as a matrix of one column."""
    rows = w.shape[0]
    m = w.reshape(rows, -1)
    return m.view(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def _meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`_hf_to_meta`."""
    rows = w.shape[0]
    m = w.reshape(rows, -1)
    return m.view(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# ---- config.json ------------------------------------------------------------------------------------


def read_config(path: str | Path) -> dict[str, Any]:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"model.hf_checkpoint={str(path)!r} is not a folder. It must be a local Hugging Face "
            f"model folder ({family_names()}) with config.json and *.safetensors (what "
            f"save_pretrained writes)."
        )
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"{folder} has no config.json; a Hugging Face model folder needs one (it gives the model's dimensions)."
        )
    return read_json(config_file, lambda reason: CheckpointError(f"{reason}."))


def model_args_from_hf(config: dict[str, Any], max_seq_len: int | None = None, where: str = "config.json") -> ModelArgs:
    """ModelArgs from the config.json of a model_type in FAMILIES; anything else it cannot represent is refused."""
    family = family_of(config.get("model_type"), where)
    # What the family's config.json may say that leantrain's model cannot represent, named.
    unsupported = [f"{k}={config[k]!r}" for k, ok in REQUIRED_VALUES if k in config and config[k] != ok]
    unsupported += [f"{k}=true ({why})" for k, why in family.refused_if_true.items() if config.get(k)]
    unsupported += [f"{k}={config[k]!r} (mixture-of-experts)" for k in MOE_KEYS if config.get(k)]
    if config.get("quantization_config"):
        unsupported.append("quantization_config (quantized weights; load the full-precision model instead)")
    try:
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        n_kv_heads, n_layers = int(config.get("num_key_value_heads") or n_heads), int(config["num_hidden_layers"])
        head_dim = int(config.get("head_dim") or family.default_head_dim or dim // n_heads)
        if head_dim % 2 or n_heads % n_kv_heads:
            unsupported.append(
                f"head_dim={head_dim}, num_attention_heads={n_heads}, num_key_value_heads="
                f"{n_kv_heads} (RoPE needs an even head_dim; the key/value heads must divide the heads)"
            )
        theta, scaling = rope_of(config, unsupported)
        positions = int(config.get("max_position_embeddings", 2048))  # the model's own, whatever a run trains on
        window = window_of(config, family, n_layers, int(max_seq_len or positions), unsupported)
        if unsupported:
            raise CheckpointError(
                f"{where} (model_type {family.model_type!r}) describes a model leantrain cannot "
                f"represent: {'; '.join(unsupported)}."
            )
        return ModelArgs(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_seq_len=positions,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=head_dim,
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
            sliding_window=window,
            family=family.model_type,
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]!r}, which a {family.model_type} config.json has.") from None


def _check_family(args: ModelArgs) -> None:
    """save_hf writes args.family: refuse a model that this model_type would not rebuild as it is."""
    family = FAMILIES.get(args.family)
    if family is None:
        raise CheckpointError(
            f"This model cannot be written as a Hugging Face {args.family!r}: it is not a "
            f"model_type leantrain writes ({family_names()}). Set ModelArgs.family to the "
            f"model_type that matches it."
        )
    wrong = [
        f"{feature}={getattr(args, feature)} (a {family.model_type} has {'' if getattr(family, feature) else 'no '}"
        f"{what})"
        for feature, what in (("qkv_bias", "q/k/v bias"), ("qk_norm", "q/k norms"))
        if getattr(args, feature) != getattr(family, feature)
    ]
    if args.sliding_window and family.window == "none":
        wrong.append(f"sliding_window={args.sliding_window} (a {family.model_type} has no sliding window)")
    if wrong:
        raise CheckpointError(
            f"This model cannot be written as a Hugging Face {args.family!r}: {'; '.join(wrong)}. "
            f"Set ModelArgs.family to the model_type that matches it."
        )


def _config_from_args(args: ModelArgs, dtype: torch.dtype, tokenizer: Any = None) -> dict[str, Any]:
    family = FAMILIES[args.family]
    scaling = None
    max_positions = args.max_seq_len
    if args.rope_scaling:
        scaling = {"rope_type": "llama3", **args.rope_scaling}
        max_positions = max(max_positions, int(args.rope_scaling["original_max_position_embeddings"]))
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        **family.export_keys,
        **window_keys(family, args.sliding_window, args.n_layers),
    }
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return config


# ---- loading ----------------------------------------------------------------------------------------


def _weight_map(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, lambda reason: CheckpointError(f"{reason}; a safetensors index is one."))
        if not isinstance(weight_map.get("weight_map"), dict):
            raise CheckpointError(f"{index} is not a safetensors index: it has no 'weight_map' object.")
        return {name: folder / file for name, file in weight_map["weight_map"].items()}
    files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).exists() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise CheckpointError(
                f"{folder} holds PyTorch pickle weights ({', '.join(pickled[:3])}), which "
                f"leantrain does not load (unpickling can run code). {_CONVERT_HINT}."
            )
        raise CheckpointError(f"{folder} holds no *.safetensors weights (nor {INDEX_FILE}).")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                out.update({name: f for name in st.keys()})
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}).") from None
    return out


def load_hf(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
    weights: bool = True,
) -> Transformer:
    """A local HF folder (a model_type of FAMILIES) -> leantrain model in ``dtype`` (each tensor cast on its own).

    ``max_seq_len``: the longest sequence the caller will run (a window on some layers only is refused only where
    it is shorter). The model keeps config.json's max_position_embeddings as its positions (and RoPE tables).
    ``weights=False`` builds the model from config.json only, leaving the weights uninitialised.
    """
    folder = Path(path).expanduser()
    config = read_config(folder)
    args = model_args_from_hf(config, max_seq_len, where=str(folder / "config.json"))
    model = build_model_from_args(args, dtype, device, seed=None)
    if weights:
        load_hf_weights(model, folder)
    return model


def load_hf_weights(model: Transformer, path: str | Path) -> None:
    """Copy an HF folder's weights into ``model`` (built from its config.json), one tensor at a time, cast to the
    model's dtype. A sharded model (FSDP2 and / or tensor-parallel DTensors, materialized) keeps each rank's part:
    every rank reads the whole tensor and keeps its shard (distribute_tensor without communication, as
    precision.init_normal_ does), so no rank ever holds more than one full tensor beside its shards."""
    from safetensors import safe_open

    folder = Path(path).expanduser()
    args = model.args
    weight_map = _weight_map(folder)
    names = _hf_names(args)
    missing = [hf for hf in names.values() if hf not in weight_map]
    ours = set(names.values()) | ({"lm_head.weight"} if args.tie_embeddings else set())
    unexpected = [n for n in weight_map if n not in ours and not n.endswith(_NOT_WEIGHTS)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            )
        if unexpected:
            parts.append(
                f"tensors a {args.family} of this config does not have: {', '.join(unexpected[:4])}"
                + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else "")
            )
        raise CheckpointError(
            f"The weights in {folder} do not match its config.json ({args.n_layers} layers, "
            f"tie_word_embeddings={args.tie_embeddings}): {'; '.join(parts)}."
        )
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for ours_name, hf_name in names.items():
        by_file.setdefault(weight_map[hf_name], []).append(ours_name)
    with torch.no_grad():
        for file, ours_names in by_file.items():
            if not file.exists():
                raise CheckpointError(f"{file} is listed in {folder / INDEX_FILE} but does not exist.")
            try:
                with safe_open(str(file), framework="pt") as st:
                    for name in ours_names:
                        tensor = st.get_tensor(names[name])
                        param = params[name]
                        if tuple(tensor.shape) != tuple(param.shape):
                            raise CheckpointError(
                                f"{names[name]} in {file} has shape {list(tensor.shape)}, but "
                                f"config.json implies {list(param.shape)}."
                            )
                        heads = _heads_of(name, args)
                        if heads:
                            tensor = _hf_to_meta(tensor, heads)
                        param.copy_(part_like(tensor.to(param.dtype), param))  # one tensor at a time
                        del tensor
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file} could not be read ({type(e).__name__}: {e}).") from None


# ---- saving -----------------------------------------------------------------------------------------


def save_hf(
    model: Transformer, out_dir: str | Path, tokenizer: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write ``model`` as an HF folder of its ``args.family`` (config.json + safetensors, sharded with an index
    above ``max_shard_bytes``) that transformers' ``AutoModelForCausalLM.from_pretrained`` (e.g.
    ``LlamaForCausalLM``, ``Qwen3ForCausalLM``) loads, in the model's dtype.

    With a ``tokenizer`` (leantrain.data), its BOS/EOS/PAD ids go into config.json and its files beside it
    (leantrain.data.tokenizer.save_tokenizer: the byte tokenizer as an exact tokenizer.json, a Hugging Face
    tokenizer's own files copied), so ``AutoTokenizer.from_pretrained`` loads it too.
    """
    from safetensors.torch import save_file

    _check_family(model.args)
    out = Path(out_dir).expanduser()
    if (out / "config.json").exists() or any(out.glob("*.safetensors")):
        raise CheckpointError(
            f"{out} already holds a model (config.json or *.safetensors); choose another --out "
            f"folder or delete it first."
        )
    out.mkdir(parents=True, exist_ok=True)
    args: ModelArgs = model.args
    params = dict(model.named_parameters())
    dtype = params["tok_embeddings.weight"].dtype
    names = _hf_names(args)

    def hf_tensor(name: str) -> torch.Tensor:
        t = params[name].detach().to("cpu")
        heads = _heads_of(name, args)
        return _meta_to_hf(t, heads) if heads else t.contiguous()

    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = params[name].numel() * params[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file({names[n]: hf_tensor(n) for n in shards[0]}, str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {names[n]: hf_tensor(n) for n in shard}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(out / file), metadata={"format": "pt"})
            weight_map.update({names[n]: file for n in shard})
            del tensors
        (out / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8"
        )
    (out / "config.json").write_text(
        json.dumps(_config_from_args(args, dtype, tokenizer), indent=2) + "\n", encoding="utf-8"
    )
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out
