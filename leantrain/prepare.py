"""``leantrain prepare``: tokenize a corpus once, in parallel, into the memory-mapped shards of a prepared folder.

The source is read as a stream of chunks (``data.corpus.iter_chunks``: whole lines of a .jsonl, record batches
of a .parquet, pieces of a .txt); N worker processes turn each chunk into documents and token ids with the
``tokenizers`` library's batch encoding; the main process appends the results, in source order, to the open
shard (``data.prepared.ShardWriter``). What is held at once is bounded by the chunks in flight (two per
worker, ``CHUNK_BYTES`` each) and their tokens, not by the corpus.

Interrupted (a signal, a full disk, a bad line), the folder keeps the shards it finished and ``.progress.json``
says where reading resumes; the same command continues from there (a shard being written is hidden as a
``.tmp`` file and redone). ``manifest.json`` is written last: a folder without it is never read as data.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .data.corpus import (
    CHUNK_BYTES,
    EVAL_FRACTION,
    Chunk,
    chunk_documents,
    chunk_records,
    eval_count,
    iter_chunks,
    source_files,
)
from .data.prepared import (
    FORMAT,
    MANIFEST,
    PROGRESS,
    SHARD_TOKENS,
    VERSION,
    ShardWriter,
    token_dtype,
    tokenizer_identity,
)
from .data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer
from . import guard
from .errors import DataError, storage_error
from .files import read_json, write_json_atomic

# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, text_field: str, kind: str) -> None:
    # One process per core: the library's own threads would only compete with the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole process group: the main process decides how to stop (guard.stop_on_signals).
    for s in guard.STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    tokenizer = build_tokenizer(tokenizer_path)
    template = None
    if kind == "chat":
        from .data.chat import chat_template

        template = chat_template(tokenizer)
    _worker.update(tokenizer=tokenizer, text_field=text_field, kind=kind, template=template)


def encode_documents(tokenizer: Tokenizer, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the documents as one flat token array, each ``[BOS] ids EOS``; their lengths in tokens)."""
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if isinstance(tokenizer, ByteTokenizer):
        ids = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8) for d in docs]
    else:
        ids = [np.asarray(e.ids, dtype=dtype) for e in tokenizer._tok.encode_batch_fast(docs, add_special_tokens=False)]
    bos, eos = np.asarray(head, dtype=dtype), np.asarray([tokenizer.eos_id], dtype=dtype)
    parts = [p for i in ids for p in (bos, i.astype(dtype, copy=False), eos)]
    lengths = np.asarray([len(i) + len(head) + 1 for i in ids], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), lengths


def encode_samples(
    records: list[tuple[str, dict]], kind: str, tokenizer: Tokenizer, template: Any, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SFT/chat records -> (their tokens, flat; their lengths; the target mask, flat; each one's first target
    position j >= 1, or its length when it has none), by ``leantrain.data.chat.record_sample``."""
    from .data.chat import record_sample
    from .data.datasets import TokenizedSamples

    pairs = [record_sample(rec, kind, tokenizer, template, where) for where, rec in records]
    samples = TokenizedSamples.from_pairs(pairs)
    return (
        np.asarray(samples.tokens, dtype=dtype),
        samples.lengths,
        samples.mask.astype(np.uint8),
        samples.first_targets,
    )


def _encode_chunk(chunk: Chunk, dtype: np.dtype) -> tuple[tuple, int, int]:
    """In a worker: (the arrays for ShardWriter.add, characters that were not UTF-8, this worker's peak RSS)."""
    kind = _worker["kind"]
    if kind == "text":
        docs, bad = chunk_documents(chunk, _worker["text_field"])
        arrays: tuple = encode_documents(_worker["tokenizer"], docs, dtype)
    else:
        records, bad = chunk_records(chunk)
        arrays = encode_samples(records, kind, _worker["tokenizer"], _worker["template"], dtype)
    return arrays, bad, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _in_order(
    pool: ProcessPoolExecutor, chunks: Iterator[Chunk], dtype: np.dtype, in_flight: int
) -> Iterator[tuple[Chunk, tuple]]:
    """Each chunk with its worker's result, in source order, with at most ``in_flight`` chunks submitted at a
    time (``Pool.imap`` would read the whole source ahead into its queue)."""
    pending: deque[tuple[Chunk, Future]] = deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(_encode_chunk, chunk, dtype)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


# --------------------------------------------------------------------------------------------
# The output folder: new, resumed, or refused
# --------------------------------------------------------------------------------------------


def _settings(
    source: str, files: list[Path], ident: dict, text_field: str, kind: str, dtype: np.dtype, shard_tokens: int
) -> dict[str, Any]:
    """What the folder is made from: a resume continues only when all of it is unchanged."""
    root = Path(source).expanduser().resolve()
    return {
        "source": str(root),
        "sources": [
            {"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files
        ],
        "tokenizer": ident,
        "text_field": text_field,
        "kind": kind,
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
    }


_SHARD_FILE = re.compile(r"^\.?shard-\d{5}\.(tokens|index|mask)(\.tmp)?$")


def _is_ours(name: str) -> bool:
    """A file prepare writes (the only ones it ever deletes)."""
    return name in (MANIFEST, PROGRESS, PROGRESS + ".tmp", MANIFEST + ".tmp") or bool(_SHARD_FILE.match(name))


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(
        path,
        lambda reason: DataError(
            f"{reason}: it is not the record of a prepare this command can resume. Name a new --out folder, or delete "
            "this one first."
        ),
    )


def _start_state(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The progress to resume from (a fresh one for a new folder), or None when ``out`` is already this corpus."""
    fresh = {"settings": settings, "shards": [], "position": [0, 0], "bytes_done": 0}
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; leantrain prepare writes a folder. Name a new folder.")
    if (out / MANIFEST).is_file():
        manifest = _read_json(out / MANIFEST)
        if manifest.get("settings") == settings:
            return None
        raise DataError(
            f"--out {str(out)!r} already holds a prepared corpus made from other sources or settings "
            f"(its manifest.json names {manifest.get('settings', {}).get('source')!r}). Nothing was "
            "changed. Name a new folder, or delete this one first."
        )
    if (out / PROGRESS).is_file():
        progress = _read_json(out / PROGRESS)
        kept = {
            s[key]
            for s in progress.get("shards", [])
            for key in ("tokens_file", "index_file", "mask_file")
            if isinstance(s, dict) and key in s
        }
        for f in out.iterdir():  # the shard being written when it stopped, and anything after the journal
            if _SHARD_FILE.match(f.name) and f.name not in kept:
                f.unlink()
        if progress.get("settings") == settings:
            print(f"leantrain: prepare resumes {out} after {len(progress['shards'])} finished shard(s).", flush=True)
            return progress
        warnings.warn(
            f"{out} holds an interrupted prepare of other sources or settings; it is restarted from the "
            "beginning (its partial shards are deleted)."
        )
        for f in out.iterdir():
            if _is_ours(f.name) and f.name != PROGRESS:
                f.unlink()
        return fresh
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"--out {str(out)!r} is a folder with other files in it; leantrain prepare writes into a new "
            "or empty folder (it resumes only its own interrupted work). Name a new folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    return fresh


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def prepare(
    source: str,
    tokenizer_path: str,
    out: str,
    workers: int = 0,
    text_field: str = "text",
    shard_tokens: int = SHARD_TOKENS,
    progress_bar: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
    kind: str = "text",
) -> dict[str, Any] | None:
    """Tokenize ``source`` into the prepared folder ``out``; returns its manifest (also written as manifest.json)
    with a ``run`` entry: seconds, MB/s, tokens/s and the peak RSS of the main process and of one worker.
    ``kind``: "text" (documents), or "sft" / "chat" (one sample per record, with its target mask).
    A SIGTERM/SIGINT stops it after the chunks in flight, keeping the finished shards; it then returns None
    (and the command exits 0, as ``train`` does): the same call resumes.

    A shard is closed at the first chunk boundary after ``shard_tokens`` tokens (a chunk: about ``chunk_bytes``
    of source), so shards hold about that many tokens; a resumed prepare redoes at most the open shard."""
    if source == "builtin":
        raise DataError(
            "data.path=builtin is 0.5 MB shipped with Python: train on it directly. leantrain prepare "
            "takes a .txt, .jsonl or .parquet file or a folder of them."
        )
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be a positive number of tokens, got {shard_tokens}.")
    workers = workers or os.cpu_count() or 1
    if kind == "text":
        files = source_files(source)
    else:
        from .data.chat import sft_files

        files = sft_files(source, kind)
    tokenizer = build_tokenizer(tokenizer_path)
    ident = tokenizer_identity(tokenizer, kind)
    dtype = token_dtype(tokenizer.vocab_size)
    settings = _settings(source, files, ident, text_field, kind, dtype, shard_tokens)
    out_dir = Path(out).expanduser()
    state = _start_state(out_dir, settings)
    if state is None:
        print(f"leantrain: {out_dir} already holds this corpus, prepared; nothing to do.", flush=True)
        return _read_json(out_dir / MANIFEST)
    try:
        with guard.stop_on_signals("finishing the chunks being tokenized, keeping the finished shards, stopping"):
            return _run(
                files, tokenizer_path, out_dir, workers, text_field, dtype, settings, state, progress_bar, chunk_bytes
            )
    except OSError as e:
        raise storage_error("a prepared shard", out_dir, e) from None


def _run(
    files: list[Path],
    tokenizer_path: str,
    out: Path,
    workers: int,
    text_field: str,
    dtype: np.dtype,
    settings: dict,
    state: dict,
    progress_bar: bool,
    chunk_bytes: int,
) -> dict[str, Any] | None:
    from tqdm import tqdm

    shards, position = list(state["shards"]), tuple(state["position"])
    kind = settings["kind"]
    writer = ShardWriter(out, dtype, settings["shard_tokens"], first_shard=len(shards), with_mask=kind != "text")
    total_bytes = sum(s["bytes"] for s in settings["sources"])
    bytes_done = state["bytes_done"]
    started, worker_rss, new_tokens, bad_utf8 = time.perf_counter(), 0, 0, {}
    bar = tqdm(
        total=total_bytes,
        initial=bytes_done,
        unit="B",
        unit_scale=True,
        desc="prepare",
        file=sys.stderr,
        disable=not progress_bar,
        dynamic_ncols=True,
    )
    pool = ProcessPoolExecutor(
        workers, mp_context=get_context("fork"), initializer=_init_worker, initargs=(tokenizer_path, text_field, kind)
    )
    chunks = iter_chunks(files, text_field if kind == "text" else None, position, chunk_bytes)
    stopped = None
    try:
        for chunk, (arrays, bad, rss) in _in_order(pool, chunks, dtype, 2 * workers):
            if (stopped := guard.stop_requested()) is not None:  # the finished shards are journaled already
                break
            writer.add(*arrays)
            new_tokens, worker_rss, bytes_done = (
                new_tokens + arrays[0].size,
                max(worker_rss, rss),
                bytes_done + chunk.size,
            )
            if bad:
                bad_utf8[chunk.path] = bad_utf8.get(chunk.path, 0) + bad
            bar.update(chunk.size)
            bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - started, 1e-9) / 1e6:.2f}M tokens/s")
            if writer.full:
                shards.append(writer.finish())
                write_json_atomic(
                    out / PROGRESS,
                    {
                        "settings": settings,
                        "shards": shards,
                        "position": [chunk.file, chunk.end],
                        "bytes_done": bytes_done,
                    },
                )
        if stopped is None and (record := writer.finish()) is not None:
            shards.append(record)
    except BaseException:
        writer.abandon()
        raise
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)  # the chunks already running finish: a few seconds at most
    if stopped is not None:
        writer.abandon()
        print(
            f"leantrain: prepare stopped by {signal.Signals(stopped).name}; {len(shards)} finished shard(s) are "
            f"kept in {out}. The same command resumes after them.",
            flush=True,
        )
        return None
    for path, n in bad_utf8.items():
        warnings.warn(f"Data file {path!r} is not valid UTF-8: {n} invalid byte sequence(s) were replaced with U+FFFD.")
    seconds = time.perf_counter() - started
    manifest = _manifest(out, shards, settings)
    manifest["run"] = {
        "seconds": seconds,
        "workers": workers,
        "mb_per_s": (bytes_done - state["bytes_done"]) / 1e6 / max(seconds, 1e-9),
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
        "peak_rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_worker": worker_rss,
    }
    write_json_atomic(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    print(
        f"leantrain: prepared {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
        f"({manifest['dtype']}, {len(shards)} shard(s)) in {out}; {manifest['eval_documents']} document(s) held out "
        f"for eval. {manifest['run']['mb_per_s']:.1f} MB/s, {manifest['run']['tokens_per_s'] / 1e6:.2f}M tokens/s.",
        flush=True,
    )
    return manifest


def _manifest(out: Path, shards: list[dict], settings: dict) -> dict[str, Any]:
    """The totals, and the train/eval cut: the last 5% of documents (at least one) are the eval split."""
    documents = sum(s["documents"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    if documents < 2:
        what = "document(s)" if settings["kind"] == "text" else "sample(s)"
        raise DataError(
            f"data.path={settings['source']!r} holds {documents} {what}; a prepared folder needs at "
            "least 2 (the last 5%, at least one, are the held-out eval split). Train on so little data "
            "directly, without prepare."
        )
    n_eval = eval_count(documents)
    first_eval, train_tokens, seen = documents - n_eval, 0, 0
    for s in shards:  # the token offset where the first eval document starts
        if seen + s["documents"] > first_eval:
            offsets = np.fromfile(out / s["index_file"], dtype="<i8")
            train_tokens += int(offsets[first_eval - seen])
            break
        seen, train_tokens = seen + s["documents"], train_tokens + s["tokens"]
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": settings["kind"],
        "dtype": settings["dtype"],
        "tokenizer": settings["tokenizer"],
        "tokens": tokens,
        "documents": documents,
        "train_tokens": train_tokens,
        "eval_documents": n_eval,
        "eval_fraction": EVAL_FRACTION,
        "text_field": settings["text_field"],
        "shards": shards,
        "sources": [{"path": s["path"], "bytes": s["bytes"]} for s in settings["sources"]],
        "settings": settings,
    }
