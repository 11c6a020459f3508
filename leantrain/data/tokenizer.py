"""Tokenizers: ``byte`` (256 byte ids + BOS, EOS, PAD) and a local Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from leantrain.errors import ConfigError, DataError
from leantrain.files import read_json

# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer.

    ``encode`` returns the ids of the text only -- no BOS/EOS; the datasets add those.
    ``bos_id`` is ``None`` when the tokenizer has no beginning-of-text token.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then BOS=256, EOS=257, PAD=258.

    ``decode`` drops the special ids and replaces byte sequences that are not valid UTF-8
    (e.g. a window cut in the middle of a character) with U+FFFD.
    """

    vocab_size = 259
    bos_id: int | None = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array, without a Python loop over the bytes."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"byte tokenizer ids must be in 0..{self.vocab_size - 1}")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, bos_id=256, eos_id=257, pad_id=258)"


# ---- the byte tokenizer as a Hugging Face tokenizer.json (export) --------------------------------------------

# The names the exported byte tokenizer gives its specials (ids 256, 257, 258).
BYTE_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _gpt2_byte_chars() -> dict[int, str]:
    """byte -> the printable character that the ``tokenizers`` ByteLevel pre-tokenizer maps it to (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the rest take code points from 256 on, in byte order). The
    library applies this table but does not expose it in order, so it is written out here."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


@functools.cache
def byte_tokenizer_json() -> str:
    """ByteTokenizer as a ``tokenizers`` tokenizer.json: ids 0..255 the bytes (a byte-level BPE with every byte in
    its vocabulary and no merges), 256/257/258 BOS/EOS/PAD; encoding with special tokens adds BOS, as leantrain's
    prompts and documents start."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as _HFTok

    chars = _gpt2_byte_chars()
    tok = _HFTok(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS])
    bos = BYTE_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, ByteTokenizer.bos_id)])
    return tok.to_str()


def byte_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json of the exported byte tokenizer. ``split_special_tokens``: a text that spells a special
    token's name is encoded as its bytes, as ByteTokenizer does, not as the special id."""
    bos, eos, pad = BYTE_SPECIAL_TOKENS
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }


def _is_byte_tokenizer_json(path: Path) -> bool:
    """The file is the byte tokenizer as export writes it (then leantrain reads it as ByteTokenizer)."""
    if path.stat().st_size > 64 * 1024:  # ours is about 10 KB; a real vocabulary is far larger
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(byte_tokenizer_json())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> list[str]:
    """Write a tokenizer into a Hugging Face folder so that ``AutoTokenizer.from_pretrained(out)`` loads it: the byte
    tokenizer as :func:`byte_tokenizer_json`, an HF tokenizer's own files copied. Returns the names written."""
    import shutil

    if isinstance(tokenizer, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
        (out / "tokenizer_config.json").write_text(
            json.dumps(byte_tokenizer_config(), indent=2) + "\n", encoding="utf-8"
        )
        return ["tokenizer.json", "tokenizer_config.json"]
    source = Path(getattr(tokenizer, "path", "")).parent
    written = []
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            written.append(name)
    return written


# Special-token names, in order of preference, for tokenizers without a tokenizer_config.json.
# EOS: for pretraining the end-of-document token (<|end_of_text|>) is preferred over the chat
# end-of-turn token (<|eot_id|>), which is only used when nothing else is there.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]", "<|bos|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]", "<|eos|>", "<|eot_id|>", "<|im_end|>")
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    ``encode`` does not add special tokens (``add_special_tokens=False``); ``decode`` keeps
    them, so BOS/EOS stay visible in generated samples.
    """

    def __init__(self, tok: Any, path: str, bos_id: int | None, eos_id: int, pad_id: int):
        self._tok = tok
        self.path = path
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


TOKENIZER_VALUES = (
    "tokenizer.path must be 'auto' (an HF model folder's own tokenizer.json, else byte), 'byte' "
    "(256 byte ids plus BOS, EOS, PAD), or a local Hugging Face tokenizer.json (or a folder that "
    "contains one)"
)


def build_tokenizer(path: str) -> Tokenizer:
    """``tokenizer.path`` -> a tokenizer.

    ``"byte"`` gives :class:`ByteTokenizer`, and so does the byte tokenizer's own tokenizer.json (as
    ``leantrain export`` writes it). Anything else is a local Hugging Face ``tokenizer.json`` (or a folder
    holding one). BOS/EOS/PAD come from ``bos_token`` /
    ``eos_token`` / ``pad_token`` in a ``tokenizer_config.json`` beside it when there is one;
    otherwise from the well-known names (``<|begin_of_text|>``, ``<s>``, ``<|end_of_text|>``,
    ``</s>``, ``<|eot_id|>``, ...) and then from added tokens flagged special whose name says
    bos/begin/start or eos/end. No EOS found -> :class:`DataError`. PAD falls back to EOS.
    """
    if path == "byte":
        return ByteTokenizer()
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise DataError(f"Tokenizer file {str(p)!r} (tokenizer.path={path!r}) does not exist. {TOKENIZER_VALUES}.")
    if _is_byte_tokenizer_json(p):
        return ByteTokenizer()
    try:
        from tokenizers import Tokenizer as _HFTok
    except ImportError as e:  # pragma: no cover - tokenizers is a runtime dependency
        raise DataError(
            f"tokenizer.path={path!r} needs the 'tokenizers' package, which is not "
            f"installed ({e}); install it or use tokenizer.path=byte."
        ) from e
    try:
        tok = _HFTok.from_file(str(p))
    except Exception as e:  # the library raises plain Exception for bad JSON and bad schema
        raise DataError(
            f"Tokenizer file {str(p)!r} (tokenizer.path={path!r}) could not be loaded as a Hugging "
            f"Face tokenizer: {e}. It must be a tokenizer.json as written by "
            f"tokenizers.Tokenizer.save() or transformers' save_pretrained(); {TOKENIZER_VALUES}."
        ) from e

    vocab = tok.get_vocab(with_added_tokens=True)
    added = _special_added_tokens(tok)
    cfg = _read_tokenizer_config(p.parent / "tokenizer_config.json", vocab)

    def pick(role: str, names: tuple[str, ...], hints: tuple[str, ...]) -> int | None:
        if role in cfg:
            return cfg[role]
        for n in names:
            if n in vocab:
                return int(vocab[n])
        for content in added:
            low = content.lower()
            if any(h in low for h in hints) and content in vocab:
                return int(vocab[content])
        return None

    bos = pick("bos_token", _BOS_NAMES, ("bos", "begin", "start"))
    eos = pick("eos_token", _EOS_NAMES, ("eos", "end"))
    pad = pick("pad_token", _PAD_NAMES, ("pad",))
    if eos is None:
        specials = ", ".join(repr(a) for a in added[:20]) or "none"
        raise DataError(
            f"Tokenizer file {str(p)!r} has no end-of-text token: set eos_token in a "
            f"tokenizer_config.json beside it, or add one of {', '.join(_EOS_NAMES)} as a special "
            f"token. Its special tokens are: {specials}. leantrain puts EOS after every document."
        )
    return HFTokenizer(tok, str(p), bos, eos, eos if pad is None else pad)


def _special_added_tokens(tok: Any) -> list[str]:
    try:
        decoder = tok.get_added_tokens_decoder()  # {id: AddedToken}
        items = sorted(decoder.items())
        return [t.content for _, t in items if getattr(t, "special", False)]
    except Exception:  # older tokenizers versions
        return []


def read_tokenizer_config(cfg_path: Path) -> dict[str, Any]:
    """A tokenizer_config.json as a dict ({} if absent): its special tokens and chat template."""
    if not cfg_path.is_file():
        return {}
    return read_json(
        cfg_path,
        lambda reason: DataError(
            f"Tokenizer config {reason}; fix or remove it (it is optional: it names bos_token/eos_token and the chat "
            "template)."
        ),
    )


def _read_tokenizer_config(cfg_path: Path, vocab: dict[str, int]) -> dict[str, int]:
    """bos/eos/pad ids from a tokenizer_config.json (strings or {"content": ...}); {} if absent."""
    cfg = read_tokenizer_config(cfg_path)
    out: dict[str, int] = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        val = cfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        if val is None:
            continue
        if not isinstance(val, str) or val not in vocab:
            raise DataError(
                f"Tokenizer config {str(cfg_path)!r}: {key}={val!r} is not a token of "
                f"the tokenizer.json beside it; it must name one of its tokens, or be "
                "null/absent."
            )
        out[key] = int(vocab[val])
    return out


def _encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Tokenize many texts into int arrays, using each tokenizer's fast path."""
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_array(t) for t in texts]
    batch = getattr(tokenizer, "encode_batch", None)
    out: list[np.ndarray] = []
    if batch is not None:
        step = 1024  # bound the memory held in Python lists at once
        for i in range(0, len(texts), step):
            out.extend(np.asarray(ids, dtype=np.int64) for ids in batch(texts[i : i + step]))
        return out
    return [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]


def check_vocab(tokenizer_size: int, tokenizer_path: str, embedding_rows: int, hf_folder: str = "") -> None:
    """The tokenizer fits the model: never more ids than embedding rows; for a Hugging Face model (``hf_folder``)
    a tokenizer other than the folder's own must have exactly as many (another size means another tokenizer;
    the folder's own may be smaller, as checkpoints pad their embeddings)."""
    if tokenizer_size > embedding_rows:
        raise ConfigError(
            f"The tokenizer '{tokenizer_path}' has {tokenizer_size} tokens but the model's vocabulary "
            f"(its embedding) has only {embedding_rows}. Set model.vocab_size to at least "
            f"{tokenizer_size} (a model trained here), or use the model's own tokenizer."
        )
    own = Path(hf_folder).expanduser() / "tokenizer.json" if hf_folder else None
    given = Path(tokenizer_path).expanduser()
    given = given / "tokenizer.json" if given.is_dir() else given
    if own is not None and tokenizer_size != embedding_rows and given.resolve() != own.resolve():
        raise ConfigError(
            f"The tokenizer '{tokenizer_path}' has {tokenizer_size} tokens, but the model in "
            f"model.hf_checkpoint='{hf_folder}' has {embedding_rows} embedding rows: it is not the "
            f"model's tokenizer. Leave tokenizer.path at 'auto' (the folder's tokenizer.json) or "
            f"name the tokenizer the model was trained with."
        )
