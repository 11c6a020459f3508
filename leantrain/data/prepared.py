"""A prepared corpus: the folder ``leantrain prepare`` writes, and the memory-mapped token stream it is read as.

On disk (every file is complete once its final name exists; ``manifest.json`` is written last)::

    DIR/manifest.json          what the folder holds (below); its presence marks the folder complete
    DIR/shard-00000.tokens     token ids, flat, little-endian uint16 (vocabulary <= 65536) or uint32
    DIR/shard-00000.index      int64 document offsets into that shard: documents + 1 of them, 0 first, its length last
    DIR/.progress.json         while prepare runs: the finished shards and where reading resumes

The token stream is the corpus' documents in order, each as ``[BOS] ids EOS`` (BOS when the tokenizer has
one), exactly what in-memory data packs, so a prepared folder and its raw source give the same batches.
The eval split is held out by document as for raw data (the last 5% of documents, at least one): training
reads tokens ``[0, train_tokens)``, evaluation ``[train_tokens, tokens)``.

``manifest.json``: ``format`` ("leantrain-prepared"), ``version``, ``kind`` ("text"), ``dtype``, ``tokenizer``
(its identity: kind, sha256 of tokenizer.json, vocab_size, bos/eos/pad ids, and the path it was read from),
``tokens``, ``documents``, ``train_tokens``, ``eval_documents``, ``shards`` (file names, tokens, documents,
bytes), ``sources`` (every source file with its size) and ``text_field``.

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


def shard_names(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.tokens", f"shard-{i:05d}.index"


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What must match between a prepared folder and the run that reads it: the same ids for the same text."""
    ident: dict[str, Any] = {"vocab_size": int(tokenizer.vocab_size), "bos_id": tokenizer.bos_id,
                             "eos_id": int(tokenizer.eos_id), "pad_id": int(tokenizer.pad_id)}
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte", "path": "byte", **ident}
    path = str(getattr(tokenizer, "path", ""))
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    return {"kind": "hf", "path": path, "sha256": digest, **ident}


def describe_tokenizer(ident: dict[str, Any]) -> str:
    if ident.get("kind") == "byte":
        return "the byte tokenizer"
    return (f"the tokenizer.json at {ident.get('path')!r} (sha256 {str(ident.get('sha256'))[:12]}..., "
            f"{ident.get('vocab_size')} tokens)")


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("kind", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
    return all(a.get(k) == b.get(k) for k in keys)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends tokenized documents to the open shard (a hidden ``.tmp`` file) and closes a shard into its final
    names -- index first, tokens last, each fsynced -- so a shard under its final name is always whole."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, first_shard: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.index = first_shard
        self._file = None
        self._tokens = 0
        self._offsets: list[np.ndarray] = []

    def _tmp(self, name: str) -> Path:
        return self.out / f".{name}.tmp"

    @property
    def full(self) -> bool:
        return self._tokens >= self.shard_tokens

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._tmp(shard_names(self.index)[0]), "wb")
            self._offsets = [np.zeros(1, dtype=np.int64)]
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._offsets.append(self._tokens + np.cumsum(doc_lengths, dtype=np.int64))
        self._tokens += int(tokens.size)

    def finish(self) -> dict[str, Any] | None:
        """Close the open shard under its final names; its manifest record (None when nothing was added)."""
        if self._file is None:
            return None
        tokens_name, index_name = shard_names(self.index)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        offsets = np.concatenate(self._offsets)
        with open(self._tmp(index_name), "wb") as f:
            f.write(offsets.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp(index_name), self.out / index_name)
        os.replace(self._tmp(tokens_name), self.out / tokens_name)
        record = {"tokens_file": tokens_name, "index_file": index_name, "tokens": self._tokens,
                  "documents": int(offsets.size - 1), "bytes": self._tokens * self.dtype.itemsize}
        self.index, self._file, self._tokens, self._offsets = self.index + 1, None, 0, []
        return record

    def abandon(self) -> None:
        """Close and delete the open shard (an error or interrupt: the next prepare redoes it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp(shard_names(self.index)[0]).unlink(missing_ok=True)


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
            parts.append(self._shards[shard][a - begin:a - begin + take])
            a, shard = a + take, shard + 1
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


@dataclass(frozen=True)
class PreparedCorpus:
    """A complete prepared folder, checked: every shard present, of its recorded size, with a sound index."""

    path: Path
    manifest: dict[str, Any]
    stream: TokenStream

    @property
    def train(self) -> TokenStream:
        return self.stream.view(0, self.manifest["train_tokens"])

    @property
    def eval(self) -> TokenStream:
        return self.stream.view(self.manifest["train_tokens"], self.manifest["tokens"])

    def check_tokenizer(self, tokenizer: Tokenizer, tokenizer_path: str) -> None:
        """DataError (exit 2) unless the run's tokenizer is the one the folder was prepared with."""
        theirs, ours = self.manifest["tokenizer"], tokenizer_identity(tokenizer)
        if not same_tokenizer(theirs, ours):
            raise DataError(
                f"The prepared data {str(self.path)!r} was tokenized with {describe_tokenizer(theirs)}, but this run "
                f"uses tokenizer.path={tokenizer_path!r}, {describe_tokenizer(ours)}: the ids would mean other "
                f"tokens. Train with the tokenizer the folder names, or prepare the corpus again with this one.")


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"The prepared data {str(path)!r} is damaged: {what}. Nothing was trained. Run leantrain "
                     f"prepare again into a new folder (or this one, after deleting it).")


def open_prepared(path: str | os.PathLike) -> PreparedCorpus:
    """Open and check a prepared folder (DataError naming the damage: an incomplete folder, a missing or
    truncated shard, a corrupt index, a manifest that does not add up)."""
    p = Path(path).expanduser()
    manifest_path = p / MANIFEST
    if not manifest_path.is_file():
        if (p / PROGRESS).is_file():
            raise DataError(f"The prepared data {str(p)!r} is incomplete: leantrain prepare was interrupted before "
                            f"it wrote manifest.json. Run the same prepare command again; it resumes.")
        raise DataError(f"{str(p)!r} is not a prepared data folder (no manifest.json in it).")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(p, f"manifest.json is not readable JSON ({e})") from e
    _check_manifest(p, manifest)
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for rec in manifest["shards"]:
        tokens_path, index_path = p / rec["tokens_file"], p / rec["index_file"]
        for f in (tokens_path, index_path):
            if not f.is_file():
                raise _bad(p, f"the shard file {f.name} is missing")
        size = tokens_path.stat().st_size
        if size != rec["tokens"] * dtype.itemsize:
            raise _bad(p, f"{tokens_path.name} holds {size} bytes, but the manifest records {rec['tokens']} "
                          f"{dtype.name} tokens ({rec['tokens'] * dtype.itemsize} bytes): the file is truncated or "
                          "was replaced")
        _check_index(p, index_path, rec)
        shards.append(np.memmap(tokens_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype))
    return PreparedCorpus(p, manifest, TokenStream(shards))


_MANIFEST_KEYS = {"format": str, "version": int, "kind": str, "dtype": str, "tokenizer": dict, "tokens": int,
                  "documents": int, "train_tokens": int, "eval_documents": int, "shards": list}


def _check_manifest(p: Path, m: Any) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(p, "manifest.json is not a leantrain prepare manifest")
    if m.get("version") != VERSION:
        raise DataError(f"The prepared data {str(p)!r} has format version {m.get('version')!r}; this leantrain reads "
                        f"version {VERSION}. Prepare the corpus again with this leantrain.")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(m.get(key), kind):
            raise _bad(p, f"manifest.json's {key!r} is missing or not a {kind.__name__}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise _bad(p, f"manifest.json's dtype {m['dtype']!r} is not uint16 or uint32")
    shards = m["shards"]
    if sum(s.get("tokens", 0) for s in shards) != m["tokens"] or \
            sum(s.get("documents", 0) for s in shards) != m["documents"]:
        raise _bad(p, "the shards' token or document counts do not add up to the manifest's totals")
    if not 0 < m["train_tokens"] < m["tokens"]:
        raise _bad(p, f"train_tokens={m['train_tokens']} is not inside the {m['tokens']} tokens")


def _check_index(p: Path, index_path: Path, rec: dict[str, Any]) -> None:
    size = index_path.stat().st_size
    if size != (rec["documents"] + 1) * 8:
        raise _bad(p, f"{index_path.name} holds {size} bytes, but {rec['documents']} documents need "
                      f"{(rec['documents'] + 1) * 8} (int64 offsets, one more than documents)")
    offsets = np.fromfile(index_path, dtype="<i8")
    if offsets[0] != 0 or offsets[-1] != rec["tokens"] or (np.diff(offsets) < 0).any():
        raise _bad(p, f"{index_path.name} is not a document index of {rec['tokens']} tokens (offsets must start at "
                      "0, never decrease, and end at the shard's length)")
