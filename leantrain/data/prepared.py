"""A prepared corpus: the folder ``leantrain prepare`` writes, and the memory-mapped token stream it is read as.

On disk (every file is complete once its final name exists; ``manifest.json`` is written last)::

    DIR/manifest.json          what the folder holds (below); its presence marks the folder complete
    DIR/shard-00000.tokens     token ids, flat, little-endian uint16 (vocabulary <= 65536) or uint32
    DIR/shard-00000.index      int64 document offsets into that shard: documents + 1 of them, 0 first, its length last
                               (sft/chat: then, per sample, the first position j >= 1 whose token is a target)
    DIR/shard-00000.mask       sft/chat only: one byte per token, 1 where the token is a training target
    DIR/.progress.json         while prepare runs: the finished shards and where reading resumes

``kind`` "text": the token stream is the corpus' documents in order, each as ``[BOS] ids EOS`` (BOS when the
tokenizer has one), exactly what in-memory data packs, so a prepared folder and its raw source give the same
batches. The eval split is held out by document as for raw data (the last 5% of documents, at least one):
training reads tokens ``[0, train_tokens)``, evaluation ``[train_tokens, tokens)``. ``kind`` "sft" or "chat":
each "document" is one whole sample (``leantrain.data.chat.record_sample``: ids and target mask, not yet cut
to a seq_len); the last 5% of samples are the eval split; packing and cutting happen when a run reads them.

``manifest.json``: ``format`` ("leantrain-prepared"), ``version``, ``kind``, ``dtype``, ``tokenizer``
(its identity: kind, sha256 of tokenizer.json, vocab_size, bos/eos/pad ids, and the path it was read from;
chat: the sha256 of the chat template too), ``tokens``, ``documents``, ``train_tokens``, ``eval_documents``,
``shards`` (file names, tokens, documents, bytes), ``sources`` (every source file with its size) and
``text_field``.

Why not a library format: nanoGPT's and Megatron's flat token file plus document index is the layout a
memory map reads without parsing (Arrow would work too, but would add a column decode per window).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from leantrain.errors import DataError
from leantrain.files import read_json

from .tokenizer import ByteTokenizer, Tokenizer

FORMAT, VERSION = "leantrain-prepared", 1
MANIFEST, PROGRESS = "manifest.json", ".progress.json"
SHARD_TOKENS = 1 << 27  # tokens per shard by default (256 MiB of uint16): a resumed prepare redoes at most one


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder written by ``leantrain prepare`` (complete or not): it has a manifest or a progress file."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / PROGRESS).is_file())


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


KINDS = ("text", "sft", "chat")


def shard_names(i: int) -> tuple[str, str, str]:
    return f"shard-{i:05d}.tokens", f"shard-{i:05d}.index", f"shard-{i:05d}.mask"


def tokenizer_identity(tokenizer: Tokenizer, kind: str = "text") -> dict[str, Any]:
    """What must match between a prepared folder and the run that reads it: the same ids for the same text (and
    for chat data the same template, which decides the text)."""
    ident: dict[str, Any] = {
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": tokenizer.bos_id,
        "eos_id": int(tokenizer.eos_id),
        "pad_id": int(tokenizer.pad_id),
    }
    if kind == "chat":
        from .chat import chat_template

        template = chat_template(tokenizer)
        ident["chat_template"] = {
            "origin": template.origin,
            "sha256": hashlib.sha256(
                json.dumps([template.source, template.variables], sort_keys=True).encode()
            ).hexdigest(),
        }
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte", "path": "byte", **ident}
    path = str(getattr(tokenizer, "path", ""))
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    return {"kind": "hf", "path": path, "sha256": digest, **ident}


def describe_tokenizer(ident: dict[str, Any]) -> str:
    template = ident.get("chat_template")
    chat = f" with the chat template of {template['origin']} (sha256 {template['sha256'][:12]}...)" if template else ""
    if ident.get("kind") == "byte":
        return "the byte tokenizer" + chat
    return (
        f"the tokenizer.json at {ident.get('path')!r} (sha256 {str(ident.get('sha256'))[:12]}..., "
        f"{ident.get('vocab_size')} tokens){chat}"
    )


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("kind", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id", "chat_template")
    return all(a.get(k) == b.get(k) for k in keys)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends tokenized documents (or SFT samples with their target masks) to the open shard (hidden ``.tmp``
    files) and closes a shard into its final names -- index and mask first, tokens last, each fsynced -- so a
    shard under its final name is always whole."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, first_shard: int, with_mask: bool = False):
        self.out, self.dtype, self.shard_tokens, self.with_mask = out, dtype, shard_tokens, with_mask
        self.index = first_shard
        self._files: dict[str, Any] = {}
        self._tokens = 0
        self._offsets: list[np.ndarray] = []
        self._first: list[np.ndarray] = []

    def _tmp(self, name: str) -> Path:
        return self.out / f".{name}.tmp"

    @property
    def full(self) -> bool:
        return self._tokens >= self.shard_tokens

    def _open(self) -> None:
        tokens_name, _, mask_name = shard_names(self.index)
        self._files = {"tokens": open(self._tmp(tokens_name), "wb")}
        if self.with_mask:
            self._files["mask"] = open(self._tmp(mask_name), "wb")
        self._offsets, self._first = [np.zeros(1, dtype=np.int64)], []

    def add(
        self,
        tokens: np.ndarray,
        doc_lengths: np.ndarray,
        mask: np.ndarray | None = None,
        first_targets: np.ndarray | None = None,
    ) -> None:
        if not self._files:
            self._open()
        self._files["tokens"].write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        if self.with_mask:
            self._files["mask"].write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
            self._first.append(np.asarray(first_targets, dtype=np.int64))
        self._offsets.append(self._tokens + np.cumsum(doc_lengths, dtype=np.int64))
        self._tokens += int(tokens.size)

    def finish(self) -> dict[str, Any] | None:
        """Close the open shard under its final names; its manifest record (None when nothing was added)."""
        if not self._files:
            return None
        tokens_name, index_name, mask_name = shard_names(self.index)
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        offsets = np.concatenate(self._offsets)
        with open(self._tmp(index_name), "wb") as f:
            f.write(offsets.tobytes())
            if self.with_mask:
                f.write(np.concatenate(self._first or [np.zeros(0, np.int64)]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp(index_name), self.out / index_name)
        if self.with_mask:
            os.replace(self._tmp(mask_name), self.out / mask_name)
        os.replace(self._tmp(tokens_name), self.out / tokens_name)
        record = {
            "tokens_file": tokens_name,
            "index_file": index_name,
            "tokens": self._tokens,
            "documents": int(offsets.size - 1),
            "bytes": self._tokens * self.dtype.itemsize,
        }
        if self.with_mask:
            record["mask_file"] = mask_name
        self.index, self._files, self._tokens, self._offsets, self._first = self.index + 1, {}, 0, [], []
        return record

    def abandon(self) -> None:
        """Close and delete the open shard (an error or interrupt: the next prepare redoes it)."""
        for f in self._files.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)
        self._files = {}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class TokenStream:
    """Tokens ``[start, stop)`` of the concatenated shards, read through memory maps: ``stream[a:b]`` copies just
    those tokens (int64), crossing shard boundaries as needed. Nothing is read until a window is asked for."""

    def __init__(self, shards: Sequence[np.memmap], start: int = 0, stop: int | None = None):
        self._shards = list(shards)
        self._ends = np.cumsum([len(s) for s in self._shards], dtype=np.int64)
        total = int(self._ends[-1]) if len(self._ends) else 0
        self.start, self.stop = start, total if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> TokenStream:
        return TokenStream(self._shards, self.start + start, self.start + stop)

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, _ = s.indices(len(self))
        a, b = self.start + a, self.start + max(a, b)
        parts = []
        shard = int(np.searchsorted(self._ends, a, side="right"))
        while a < b:
            begin = int(self._ends[shard - 1]) if shard else 0
            take = min(b, int(self._ends[shard])) - a
            parts.append(self._shards[shard][a - begin : a - begin + take])
            a, shard = a + take, shard + 1
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


@dataclass(frozen=True)
class PreparedCorpus:
    """A complete prepared folder, checked: every shard present, of its recorded size, with a sound index.

    For sft/chat folders also the target mask (a stream of 0/1 bytes beside the tokens), every sample's global
    offsets and its first target position (:class:`leantrain.data.datasets.TokenizedSamples` reads them)."""

    path: Path
    manifest: dict[str, Any]
    stream: TokenStream
    mask: TokenStream | None = None
    offsets: np.ndarray | None = None
    first_targets: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def train_samples(self) -> int:
        return self.manifest["documents"] - self.manifest["eval_documents"]

    @property
    def train(self) -> TokenStream:
        return self.stream.view(0, self.manifest["train_tokens"])

    @property
    def eval(self) -> TokenStream:
        return self.stream.view(self.manifest["train_tokens"], self.manifest["tokens"])

    def check_tokenizer(self, tokenizer: Tokenizer, tokenizer_path: str) -> None:
        """DataError (exit 2) unless the run's tokenizer (and chat template) is the one the folder was prepared
        with."""
        theirs, ours = self.manifest["tokenizer"], tokenizer_identity(tokenizer, self.kind)
        if not same_tokenizer(theirs, ours):
            raise DataError(
                f"The prepared data {str(self.path)!r} was tokenized with {describe_tokenizer(theirs)}, but this run "
                f"uses tokenizer.path={tokenizer_path!r}, {describe_tokenizer(ours)}: the ids would mean other "
                f"tokens. Train with the tokenizer the folder names, or prepare the corpus again with this one."
            )


def _bad(path: Path, what: str) -> DataError:
    return DataError(
        f"The prepared data {str(path)!r} is damaged: {what}. Nothing was trained. Run leantrain "
        f"prepare again into a new folder (or this one, after deleting it)."
    )


def open_prepared(path: str | os.PathLike) -> PreparedCorpus:
    """Open and check a prepared folder (DataError naming the damage: an incomplete folder, a missing or
    truncated shard, a corrupt index, a manifest that does not add up)."""
    p = Path(path).expanduser()
    manifest_path = p / MANIFEST
    if not manifest_path.is_file():
        if (p / PROGRESS).is_file():
            raise DataError(
                f"The prepared data {str(p)!r} is incomplete: leantrain prepare was interrupted before "
                f"it wrote manifest.json. Run the same prepare command again; it resumes."
            )
        raise DataError(f"{str(p)!r} is not a prepared data folder (no manifest.json in it).")
    manifest = read_json(manifest_path, lambda reason: _bad(p, reason))
    _check_manifest(p, manifest)
    dtype, samples = np.dtype(manifest["dtype"]), manifest["kind"] != "text"
    shards, masks, offsets, firsts, base = [], [], [np.zeros(1, np.int64)], [], 0
    for rec in manifest["shards"]:
        shards.append(_map(p, rec, "tokens_file", dtype))
        if samples:
            masks.append(_map(p, rec, "mask_file", np.dtype(np.uint8)))
        starts, first = _check_index(p, p / rec["index_file"], rec, samples)
        offsets.append(base + starts[1:])
        firsts.append(first)
        base += rec["tokens"]
    if not samples:
        return PreparedCorpus(p, manifest, TokenStream(shards))
    return PreparedCorpus(
        p, manifest, TokenStream(shards), TokenStream(masks), np.concatenate(offsets), np.concatenate(firsts)
    )


def _map(p: Path, rec: dict[str, Any], key: str, dtype: np.dtype) -> np.ndarray:
    """A shard file, memory-mapped, after checking that it holds exactly the recorded tokens."""
    if not isinstance(rec.get(key), str) or not (p / rec[key]).is_file():
        raise _bad(p, f"the shard file {rec.get(key) or '(' + key + ' not recorded)'} is missing")
    f = p / rec[key]
    size = f.stat().st_size
    if size != rec["tokens"] * dtype.itemsize:
        raise _bad(
            p,
            f"{f.name} holds {size} bytes, but the manifest records {rec['tokens']} {dtype.name} "
            f"values ({rec['tokens'] * dtype.itemsize} bytes): the file is truncated or was replaced",
        )
    return np.memmap(f, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)


_MANIFEST_KEYS = {
    "format": str,
    "version": int,
    "kind": str,
    "dtype": str,
    "tokenizer": dict,
    "tokens": int,
    "documents": int,
    "train_tokens": int,
    "eval_documents": int,
    "shards": list,
}


def _check_manifest(p: Path, m: Any) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(p, "manifest.json is not a leantrain prepare manifest")
    if m.get("version") != VERSION:
        raise DataError(
            f"The prepared data {str(p)!r} has format version {m.get('version')!r}; this leantrain reads "
            f"version {VERSION}. Prepare the corpus again with this leantrain."
        )
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(m.get(key), kind):
            raise _bad(p, f"manifest.json's {key!r} is missing or not a {kind.__name__}")
    if m["kind"] not in KINDS:
        raise _bad(p, f"manifest.json's kind {m['kind']!r} is not one of {', '.join(KINDS)}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise _bad(p, f"manifest.json's dtype {m['dtype']!r} is not uint16 or uint32")
    shards = m["shards"]
    if (
        sum(s.get("tokens", 0) for s in shards) != m["tokens"]
        or sum(s.get("documents", 0) for s in shards) != m["documents"]
    ):
        raise _bad(p, "the shards' token or document counts do not add up to the manifest's totals")
    if not 0 < m["train_tokens"] < m["tokens"]:
        raise _bad(p, f"train_tokens={m['train_tokens']} is not inside the {m['tokens']} tokens")


def _check_index(p: Path, index_path: Path, rec: dict[str, Any], samples: bool) -> tuple[np.ndarray, np.ndarray]:
    """The shard's document offsets (and, for samples, first target positions), checked."""
    if not index_path.is_file():
        raise _bad(p, f"the shard file {index_path.name} is missing")
    n, size = rec["documents"], index_path.stat().st_size
    want = (2 * n + 1 if samples else n + 1) * 8
    if size != want:
        raise _bad(
            p,
            f"{index_path.name} holds {size} bytes, but {n} documents need {want} (int64 offsets, one "
            f"more than documents{', then a first target per sample' if samples else ''})",
        )
    values = np.fromfile(index_path, dtype="<i8")
    offsets, first = values[: n + 1], values[n + 1 :]
    lengths = np.diff(offsets)
    if (
        offsets[0] != 0
        or offsets[-1] != rec["tokens"]
        or (lengths < 0).any()
        or (samples and ((first < 1) | (first > lengths)).any())
    ):
        raise _bad(
            p,
            f"{index_path.name} is not a document index of {rec['tokens']} tokens (offsets must start at "
            "0, never decrease, and end at the shard's length; a first target lies inside its sample)",
        )
    return offsets, first
