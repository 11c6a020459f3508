"""Data: tokenizers, corpus loading, the train/eval split and packed pretraining batches.

The trainer uses five names from here:

* :func:`build_tokenizer` -- ``"byte"`` or a local Hugging Face ``tokenizer.json``.
* :func:`load_documents` -- ``"builtin"``, a ``.txt`` file, a ``.jsonl`` file or a folder of them.
* :func:`split_documents` -- the last 5% of documents are the held-out eval split.
* :class:`PackedDataset` -- documents tokenized once, joined with BOS/EOS, cut into windows of
  ``seq_len + 1`` tokens and served in a seeded, resumable, infinite order.
* :class:`Tokenizer` -- the protocol both tokenizers follow.

Every bad input raises :class:`leantrain.errors.DataError` with a message that names the file
(or key), says what is wrong and what is allowed.

``data.format="sft"`` uses :class:`SftDataset` (prompt/response pairs from :func:`load_sft_samples`,
one sample per row, loss on the response only) with the same interface; :func:`build_datasets`
gives the train and eval datasets of either format.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from leantrain.errors import DataError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "load_documents",
    "split_documents",
    "PackedDataset",
    "SftDataset",
    "load_sft_samples",
    "build_datasets",
]

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


# Special-token names, in order of preference, for tokenizers without a tokenizer_config.json.
# EOS: for pretraining the end-of-document token (<|end_of_text|>) is preferred over the chat
# end-of-turn token (<|eot_id|>), which is only used when nothing else is there.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]", "<|bos|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]", "<|eos|>",
              "<|eot_id|>", "<|im_end|>")
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
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def build_tokenizer(path: str) -> Tokenizer:
    """``tokenizer.path`` -> a tokenizer.

    ``"byte"`` gives :class:`ByteTokenizer`. Anything else is a local Hugging Face
    ``tokenizer.json`` (or a folder holding one). BOS/EOS/PAD come from ``bos_token`` /
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
    allowed = ('tokenizer.path must be "byte" or a local Hugging Face tokenizer.json '
               "(or a folder that contains one)")
    if not p.exists():
        raise DataError(f"Tokenizer file {str(p)!r} (tokenizer.path={path!r}) does not exist. {allowed}.")
    try:
        from tokenizers import Tokenizer as _HFTok
    except ImportError as e:  # pragma: no cover - tokenizers is a runtime dependency
        raise DataError(f"tokenizer.path={path!r} needs the 'tokenizers' package, which is not "
                        f"installed ({e}); install it or use tokenizer.path=byte.") from e
    try:
        tok = _HFTok.from_file(str(p))
    except Exception as e:  # the library raises plain Exception for bad JSON and bad schema
        raise DataError(
            f"Tokenizer file {str(p)!r} (tokenizer.path={path!r}) could not be loaded as a Hugging "
            f"Face tokenizer: {e}. It must be a tokenizer.json as written by "
            f"tokenizers.Tokenizer.save() or transformers' save_pretrained(); {allowed}.") from e

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
            f"token. Its special tokens are: {specials}. leantrain puts EOS after every document.")
    return HFTokenizer(tok, str(p), bos, eos, eos if pad is None else pad)


def _special_added_tokens(tok: Any) -> list[str]:
    try:
        decoder = tok.get_added_tokens_decoder()  # {id: AddedToken}
        items = sorted(decoder.items())
        return [t.content for _, t in items if getattr(t, "special", False)]
    except Exception:  # older tokenizers versions
        return []


def _read_tokenizer_config(cfg_path: Path, vocab: dict[str, int]) -> dict[str, int]:
    """bos/eos/pad ids from a tokenizer_config.json (strings or {"content": ...}); {} if absent."""
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"Tokenizer config {str(cfg_path)!r} is not readable JSON ({e}); fix or "
                        "remove it (it is optional and only names bos_token/eos_token).") from e
    if not isinstance(cfg, dict):
        raise DataError(f"Tokenizer config {str(cfg_path)!r} must be a JSON object, got "
                        f"{type(cfg).__name__}.")
    out: dict[str, int] = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        val = cfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        if val is None:
            continue
        if not isinstance(val, str) or val not in vocab:
            raise DataError(f"Tokenizer config {str(cfg_path)!r}: {key}={val!r} is not a token of "
                            f"the tokenizer.json beside it; it must name one of its tokens, or be "
                            "null/absent.")
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
            out.extend(np.asarray(ids, dtype=np.int64) for ids in batch(texts[i:i + step]))
        return out
    return [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".txt", ".jsonl")
# A .txt file is cut into at most this many documents (see load_documents).
TXT_PIECES = 20
TXT_MIN_PIECE_CHARS = 4096
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_ALLOWED_PATHS = ('data.path must be "builtin", a .txt file, a .jsonl file (one JSON object per '
                  'line with a "text" string), or a folder containing such files')


def load_documents(path: str) -> list[str]:
    """``data.path`` -> a list of documents (strings), in a deterministic order.

    * ``"builtin"``: the pydoc topic texts shipped with CPython (``pydoc_data.topics.topics``),
      one document per topic, in sorted topic order (~0.5 MB).
    * ``.jsonl``: one JSON object per line with a ``"text"`` string; blank lines are skipped, and
      so are records whose text is empty or only whitespace.
    * ``.txt``: the file is one document unless it is long. **Rule:** a ``.txt`` file is cut
      into at most ``TXT_PIECES`` (20) documents of at least ``TXT_MIN_PIECE_CHARS`` (4096)
      characters each: a cut is made at the first blank line at or after every
      ``max(len/20, 4096)`` characters (at a plain newline when the remaining text has no blank
      line); the blank line itself is dropped. So a file under 8 KiB is one document, and in a
      long file the last 5% of documents (the eval split) is about the last 5% of its text.
    * a folder: every ``.txt``/``.jsonl`` file under it, recursively, in sorted path order;
      files and folders whose name starts with ``.`` are skipped.

    Text that is not valid UTF-8 is decoded with ``errors="replace"`` (bad bytes become U+FFFD)
    and one ``UserWarning`` per file names the file and the first bad byte's offset: a few bad
    bytes in a large scraped corpus should not stop a run, but should not pass silently either.
    A leading UTF-8 byte-order mark is removed.

    Raises :class:`DataError` for a missing or unreadable path, a folder without data files,
    another file extension, a bad ``.jsonl`` line (file and line number named), or a corpus that
    is empty or only whitespace.
    """
    if path == "builtin":
        return _builtin_documents()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist. {_ALLOWED_PATHS}.")
    if p.is_dir():
        files = sorted(
            (f for f in p.rglob("*")
             if f.is_file() and f.suffix.lower() in DATA_SUFFIXES
             and not any(part.startswith(".") for part in f.relative_to(p).parts)),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        if not files:
            raise DataError(f"data.path={path!r} is a folder with no .txt or .jsonl files in it "
                            f"(searched recursively, hidden files skipped). {_ALLOWED_PATHS}.")
    elif p.suffix.lower() in DATA_SUFFIXES:
        files = [p]
    else:
        raise DataError(f"data.path={path!r} has the extension {p.suffix or '(none)'!r}, which "
                        f"leantrain cannot read. {_ALLOWED_PATHS}.")
    docs: list[str] = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            for lineno, rec in _read_jsonl(f):
                if "text" not in rec:
                    keys = ", ".join(repr(k) for k in list(rec)[:10]) or "none"
                    raise DataError(f"{f}:{lineno}: the JSON object has no \"text\" field (its keys: "
                                    f"{keys}). Every line of a .jsonl file for data.format=text "
                                    "must be an object with a \"text\" string.")
                text = rec["text"]
                if not isinstance(text, str):
                    raise DataError(f"{f}:{lineno}: \"text\" is a {type(text).__name__}, not a "
                                    "string. Every line of a .jsonl file for data.format=text must "
                                    "be an object with a \"text\" string.")
                if text.strip():
                    docs.append(text)
        else:
            docs.extend(d for d in _split_txt(_read_text(f)) if d.strip())
    if not docs:
        what = "file" if len(files) == 1 and not p.is_dir() else "folder's .txt/.jsonl files"
        raise DataError(f"data.path={path!r}: the {what} contain(s) no text (empty or only "
                        f"whitespace). Training needs a non-empty corpus. {_ALLOWED_PATHS}.")
    return docs


def _builtin_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - some distributions strip pydoc_data
        raise DataError("data.path=builtin needs the pydoc topic texts of the standard library "
                        f"(pydoc_data.topics), which this Python lacks ({e}). Point data.path at "
                        "a .txt/.jsonl file or folder instead.") from e
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def _read_text(f: Path) -> str:
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise DataError(f"Data file {str(f)!r} cannot be read ({e.strerror or e}). Check that it "
                        "exists and that this user may read it.") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw.count(b"\xef\xbf\xbd")
        text = raw.decode("utf-8", errors="replace")
        n = text.count("\ufffd") - bad
        warnings.warn(f"Data file {str(f)!r} is not valid UTF-8 (first bad byte at offset "
                      f"{e.start}); {n} invalid byte sequence(s) were replaced with U+FFFD.",
                      UserWarning, stacklevel=3)
    return text[1:] if text.startswith("\ufeff") else text


def _read_jsonl(f: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a .jsonl file."""
    for lineno, line in enumerate(_read_text(f).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). A .jsonl "
                            "file must hold one JSON object per line; blank lines are allowed.") from e
        if not isinstance(rec, dict):
            raise DataError(f"{f}:{lineno}: expected a JSON object, got {type(rec).__name__}. A "
                            ".jsonl file must hold one JSON object per line.")
        yield lineno, rec


def _split_txt(text: str) -> list[str]:
    """Cut a .txt file's text into documents (the rule is in load_documents' docstring)."""
    target = max(math.ceil(len(text) / TXT_PIECES), TXT_MIN_PIECE_CHARS)
    docs: list[str] = []
    pos = 0
    while len(text) - pos >= 2 * target:
        m = _BLANK_LINE.search(text, pos + target)
        if m is not None:
            docs.append(text[pos:m.start()])
            pos = m.end()
            continue
        nl = text.find("\n", pos + target)
        if nl < 0:
            break
        docs.append(text[pos:nl])
        pos = nl + 1
    docs.append(text[pos:])
    return docs


def split_documents(docs: list[str], eval_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """(train, eval): the last ``eval_fraction`` of documents, at least one, are the eval split.

    The count is ``max(1, round(len(docs) * eval_fraction))``, never all of them; training never
    sees those documents. **With a single document** its text is cut instead: the first
    ``floor(len * (1 - eval_fraction))`` characters train, the rest is the eval split (so a
    single small .txt still has one). Both splits are non-empty.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"The eval fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}.")
    if not docs:
        raise DataError("There are no documents to split into train and eval; data.path must "
                        "hold some text.")
    if len(docs) == 1:
        text = docs[0]
        if len(text) < 2:
            raise DataError(f"The corpus is a single document of {len(text)} character(s); it "
                            "cannot be split into train and eval. Add more text.")
        cut = min(max(int(len(text) * (1.0 - eval_fraction)), 1), len(text) - 1)
        return [text[:cut]], [text[cut:]]
    n_eval = min(max(1, round(len(docs) * eval_fraction)), len(docs) - 1)
    return list(docs[:-n_eval]), list(docs[-n_eval:])


# --------------------------------------------------------------------------------------------
# Order and resumable state (shared by all dataset kinds)
# --------------------------------------------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & 0x7FFFFFFFFFFFFFFF)


class _Sampler:
    """An infinite stream of item indices: epoch e is a permutation of range(n) drawn from a
    torch.Generator seeded by (seed, e) (or range(n) in order when shuffle=False). Batches take
    the next ``batch_size * world_size`` indices, crossing epoch boundaries when needed (so nothing
    is dropped and n < batch size still works); rank r keeps its slice of them."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int, world_size: int):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                self._order = torch.randperm(self.n, generator=_epoch_generator(self.seed, self.epoch))
            else:
                self._order = torch.arange(self.n)
        return self._order

    def next_indices(self) -> torch.Tensor:
        need = self.batch_size * self.world_size
        parts = []
        while need > 0:
            order = self._epoch_order()
            take = min(need, self.n - self.position)
            parts.append(order[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        idx = torch.cat(parts) if len(parts) > 1 else parts[0]
        return idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._order = int(epoch), int(position), None


# --------------------------------------------------------------------------------------------
# Packed pretraining data
# --------------------------------------------------------------------------------------------


class PackedDataset:
    """Documents tokenized, concatenated with EOS after each document (and BOS before each when
    the tokenizer has one), cut into windows of ``seq_len + 1`` tokens (inputs = w[:-1],
    labels = w[1:]).

    Window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: consecutive windows share
    one token so every token except the first is a label once. The tail shorter than a window
    is not used. Tokens are stored once as an int32 tensor; windows are views of it.

    Order: an infinite stream over epochs; epoch ``e`` is a permutation of the windows drawn from
    a ``torch.Generator`` seeded by ``(seed, e)`` (in order when ``shuffle=False``). Each
    :meth:`next_batch` takes the next ``batch_size`` windows (``batch_size * world_size`` under
    data parallelism, rank ``r`` keeping the r-th slice, so ranks see disjoint windows and every
    rank computes the same order). A batch may cross an epoch boundary.

    :meth:`state_dict` / :meth:`load_state_dict` carry ``epoch`` and ``position`` so a resumed
    run sees the same batches as an uninterrupted one.
    """

    def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, name: str = "train", *,
                 rank: int = 0, world_size: int = 1):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"data.seq_len must be a positive integer, got {seq_len!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"data.local_batch_size must be a positive integer, got {batch_size!r}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.name = name
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.tokens = self._pack(list(docs), tokenizer)
        self.num_tokens = int(self.tokens.numel())
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"The {name} split has {self.num_tokens} tokens after tokenization, but one "
                f"window needs data.seq_len + 1 = {seq_len + 1}. Use a smaller "
                f"data.seq_len (at most {max(self.num_tokens - 1, 1)}) or more text in data.path.")
        self.num_windows = (self.num_tokens - 1) // seq_len
        self.windows = self.tokens.unfold(0, seq_len + 1, seq_len)[: self.num_windows]  # a view
        self._sampler = _Sampler(self.num_windows, batch_size, seed, shuffle, rank, world_size)

    @staticmethod
    def _pack(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        head = np.asarray([] if bos is None else [bos], dtype=np.int32)
        tail = np.asarray([eos], dtype=np.int32)
        parts: list[np.ndarray] = []
        for ids in _encode_many(tokenizer, docs):
            parts.extend((head, ids.astype(np.int32, copy=False), tail))
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return torch.from_numpy(flat)

    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.windows[idx].long()
        return w[:, :-1], w[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both LongTensor [batch_size, seq_len]; labels are inputs shifted by one."""
        return self._batch(self._sampler.next_indices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed pass over the windows in order, ``batch_size`` at a time (the last batch may be
        smaller), at most ``max_batches`` batches. Does not touch the training order or state.
        It ignores rank: every rank gets the same batches (the same count, as FSDP needs)."""
        n_batches = math.ceil(self.num_windows / self.batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max(int(max_batches), 0))
        for b in range(n_batches):
            lo = b * self.batch_size
            w = self.windows[lo:lo + self.batch_size].long()
            yield w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict:
        return {**self._sampler.state_dict(), "seed": self.seed, "num_tokens": self.num_tokens,
                "num_windows": self.num_windows, "seq_len": self.seq_len}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("num_tokens", "seq_len"):
            if key in sd and int(sd[key]) != getattr(self, key):
                raise DataError(
                    f"The checkpoint's {self.name} data state was saved with {key}={int(sd[key])}, "
                    f"but the data now has {key}={getattr(self, key)}: data.path, tokenizer.path or "
                    "data.seq_len changed since the checkpoint. Resume with the same data settings, "
                    "or start a new run (another job.dump_folder).")
        if "seed" in sd and int(sd["seed"]) != self.seed:
            raise DataError(f"The checkpoint's {self.name} data order was drawn with job.seed="
                            f"{int(sd['seed'])}, this run has job.seed={self.seed}. Resume with the "
                            "same seed, or start a new run.")
        epoch, position = int(sd["epoch"]), int(sd["position"])
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise DataError(f"The checkpoint's {self.name} data state (epoch={epoch}, "
                            f"position={position}) is out of range for {self.num_windows} windows.")
        self._sampler.load_state_dict(epoch, position)

    def __repr__(self) -> str:
        return (f"PackedDataset(name={self.name!r}, num_tokens={self.num_tokens}, "
                f"num_windows={self.num_windows}, seq_len={self.seq_len}, batch_size={self.batch_size})")


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning data
# --------------------------------------------------------------------------------------------

IGNORE_INDEX = -100  # label of a token the loss skips (precision.cross_entropy's ignore_index)
_ALLOWED_SFT = ('data.format=sft needs data.path to be a .jsonl file (one JSON object per line with '
                '"prompt" and "response" strings) or a folder of such files')


def load_sft_samples(path: str) -> list[tuple[str, str]]:
    """``data.path`` for ``data.format=sft`` -> (prompt, response) pairs, in file and line order.

    A ``.jsonl`` file, or a folder whose ``.jsonl`` files (recursively, sorted, hidden ones skipped)
    are read. Every non-blank line must be an object with ``prompt`` and ``response`` strings;
    anything else raises :class:`DataError` naming the file and line.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist. {_ALLOWED_SFT}.")
    if p.is_dir():
        files = sorted((f for f in p.rglob("*.jsonl") if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise DataError(f"data.path={path!r} is a folder with no .jsonl files in it. {_ALLOWED_SFT}.")
    elif p.suffix.lower() == ".jsonl":
        files = [p]
    else:
        raise DataError(f"data.path={path!r} is not a .jsonl file. {_ALLOWED_SFT}.")
    samples = []
    for f in files:
        for lineno, rec in _read_jsonl(f):
            for key in ("prompt", "response"):
                if key not in rec:
                    keys = ", ".join(repr(k) for k in list(rec)[:10]) or "none"
                    raise DataError(f"{f}:{lineno}: the JSON object has no \"{key}\" field (its keys: {keys}). "
                                    f"{_ALLOWED_SFT}.")
                if not isinstance(rec[key], str):
                    raise DataError(f"{f}:{lineno}: \"{key}\" is a {type(rec[key]).__name__}, not a string. "
                                    f"{_ALLOWED_SFT}.")
            samples.append((rec["prompt"], rec["response"]))
    if not samples:
        raise DataError(f"data.path={path!r} holds no samples (only blank lines). {_ALLOWED_SFT}.")
    return samples


class SftDataset:
    """Prompt/response pairs for supervised fine-tuning: one sample per row, padded to ``seq_len``.

    A sample is ``[BOS] + prompt + response + [EOS]`` (BOS when the tokenizer has one; prompt and
    response are tokenized separately and used as they are, so apply a chat template before writing
    the jsonl). Row ``i`` holds sample ``i``'s first ``seq_len + 1`` tokens, then ``pad_id``;
    inputs = row[:-1], labels = row[1:], with labels set to -100 (skipped by the loss) where the
    label is a prompt token or padding: the loss is on the response and its EOS only.

    No sample attends to another: each is alone in its row, and its padding comes after it, where
    the causal mask hides it (padding positions have no label). A sample longer than
    ``seq_len + 1`` tokens is cut at the end (one warning counts them); a sample whose prompt fills
    the whole window has nothing to learn and is dropped (warning).

    Order, rank slicing, :meth:`eval_batches` and :meth:`state_dict` work as in
    :class:`PackedDataset`, over samples instead of windows. ``num_tokens`` counts the samples'
    tokens (after cutting), not the padding.
    """

    def __init__(self, samples: Sequence[tuple[str, str]], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True, name: str = "train", *, rank: int = 0, world_size: int = 1):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"data.seq_len must be a positive integer, got {seq_len!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"data.local_batch_size must be a positive integer, got {batch_size!r}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.name, self.seq_len, self.batch_size, self.seed = name, seq_len, batch_size, seed
        self.pad_id = tokenizer.pad_id
        self.tokens, self.offsets, self.prompt_lens = self._tokenize(list(samples), tokenizer, seq_len, name)
        self.num_samples = len(self.prompt_lens)
        self.num_tokens = int(self.tokens.numel())
        self._sampler = _Sampler(self.num_samples, batch_size, seed, shuffle, rank, world_size)

    @staticmethod
    def _tokenize(samples: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int,
                  name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        prompts = _encode_many(tokenizer, [p for p, _ in samples])
        responses = _encode_many(tokenizer, [r for _, r in samples])
        parts, offsets, prompt_lens, cut, dropped = [], [0], [], 0, 0
        for prompt, response in zip(prompts, responses):
            ids = np.concatenate([np.asarray(head, dtype=np.int64), prompt, response,
                                  np.asarray([tokenizer.eos_id], dtype=np.int64)])
            n_prompt = len(head) + len(prompt)
            if n_prompt >= seq_len + 1:  # not one response token would be a label
                dropped += 1
                continue
            if len(ids) > seq_len + 1:
                ids, cut = ids[:seq_len + 1], cut + 1
            parts.append(ids.astype(np.int32))
            offsets.append(offsets[-1] + len(ids))
            prompt_lens.append(n_prompt)
        if cut or dropped:
            warnings.warn(f"SFT {name} data: {cut} sample(s) longer than data.seq_len + 1 = {seq_len + 1} tokens were "
                          f"cut at the end, and {dropped} whose prompt alone fills the window were dropped. Raise "
                          f"data.seq_len to keep them whole.", UserWarning, stacklevel=3)
        if not parts:
            raise DataError(f"The SFT {name} split has no sample whose response fits in data.seq_len = {seq_len} "
                            f"tokens. Raise data.seq_len.")
        return (torch.from_numpy(np.concatenate(parts)), torch.tensor(offsets, dtype=torch.int64),
                torch.tensor(prompt_lens, dtype=torch.int64))

    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.full((len(idx), self.seq_len + 1), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(idx), self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        for r, i in enumerate(idx.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            rows[r, :b - a] = self.tokens[a:b]
            # label j is token j + 1: learned from the first response token to the EOS
            first = int(self.prompt_lens[i]) - 1
            labels[r, first:b - a - 1] = rows[r, first + 1:b - a]
        return rows[:, :-1], labels

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both LongTensor [batch_size, seq_len]; labels are -100 on prompt and padding."""
        return self._batch(self._sampler.next_indices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample in order, ``batch_size`` at a time (the last batch may be smaller), at most
        ``max_batches`` batches; does not touch the training order or state."""
        n_batches = math.ceil(self.num_samples / self.batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max(int(max_batches), 0))
        for b in range(n_batches):
            lo = b * self.batch_size
            yield self._batch(torch.arange(lo, min(lo + self.batch_size, self.num_samples)))

    def state_dict(self) -> dict:
        return {**self._sampler.state_dict(), "seed": self.seed, "num_samples": self.num_samples,
                "num_tokens": self.num_tokens, "seq_len": self.seq_len}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("num_samples", "num_tokens", "seq_len"):
            if key in sd and int(sd[key]) != getattr(self, key):
                raise DataError(
                    f"The checkpoint's SFT {self.name} data state was saved with {key}={int(sd[key])}, but the "
                    f"data now has {key}={getattr(self, key)}: data.path, tokenizer.path or data.seq_len changed "
                    "since the checkpoint. Resume with the same data settings, or start a new run.")
        if "seed" in sd and int(sd["seed"]) != self.seed:
            raise DataError(f"The checkpoint's SFT {self.name} data order was drawn with job.seed={int(sd['seed'])}, "
                            f"this run has job.seed={self.seed}. Resume with the same seed, or start a new run.")
        epoch, position = int(sd["epoch"]), int(sd["position"])
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise DataError(f"The checkpoint's SFT {self.name} data state (epoch={epoch}, position={position}) "
                            f"is out of range for {self.num_samples} samples.")
        self._sampler.load_state_dict(epoch, position)

    def __repr__(self) -> str:
        return (f"SftDataset(name={self.name!r}, num_samples={self.num_samples}, num_tokens={self.num_tokens}, "
                f"seq_len={self.seq_len}, batch_size={self.batch_size})")


def build_datasets(data: Any, tokenizer: Tokenizer, seed: int, *, rank: int = 0,
                   world_size: int = 1) -> tuple[PackedDataset | SftDataset, PackedDataset | SftDataset]:
    """(train, eval) datasets for the config's ``data`` section, either format. The eval split is the
    last 5% of documents (text) or samples (sft); it is read in order, never shuffled."""
    common = dict(rank=rank, world_size=world_size)
    if data.format == "sft":
        samples = load_sft_samples(data.path)
        if len(samples) < 2:
            raise DataError(f"data.path={data.path!r} holds {len(samples)} SFT sample; at least 2 are needed "
                            "(the last 5%, at least one, are the held-out eval split).")
        n_eval = min(max(1, round(len(samples) * 0.05)), len(samples) - 1)
        train_samples, eval_samples = samples[:-n_eval], samples[-n_eval:]
        return (SftDataset(train_samples, tokenizer, data.seq_len, data.local_batch_size, seed, **common),
                SftDataset(eval_samples, tokenizer, data.seq_len, data.local_batch_size, seed, shuffle=False,
                           name="eval", **common))
    train_docs, eval_docs = split_documents(load_documents(data.path))
    return (PackedDataset(train_docs, tokenizer, data.seq_len, data.local_batch_size, seed, **common),
            PackedDataset(eval_docs, tokenizer, data.seq_len, data.local_batch_size, seed, shuffle=False,
                          name="eval", **common))
