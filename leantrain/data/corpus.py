"""Documents: ``builtin`` (CPython's pydoc texts), .txt, .jsonl, .parquet or a folder of them; the eval split.

Two readers share one rule for what a document is: :func:`load_documents` (every document in memory, for
small corpora) and :func:`iter_chunks` (the same documents as a stream of raw chunks with resume positions,
for ``leantrain prepare``, which never holds the whole corpus).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from leantrain.errors import DataError

# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
# A .txt file is cut into at most this many documents (see load_documents).
TXT_PIECES = 20
TXT_MIN_PIECE_CHARS = 4096
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_ALLOWED_PATHS = (
    'data.path must be "builtin", a .txt file, a .jsonl file (one JSON object per '
    'line with a "text" string, or the field data.text_field names), a .parquet file (a string '
    "column of that name), a folder containing such files, or a folder written by leantrain prepare"
)


def load_documents(path: str, text_field: str = "text") -> list[str]:
    """``data.path`` -> a list of documents (strings), in a deterministic order.

    * ``"builtin"``: the pydoc topic texts shipped with CPython (``pydoc_data.topics.topics``),
      one document per topic, in sorted topic order (~0.5 MB).
    * ``.jsonl``: one JSON object per line with a ``text_field`` string (``data.text_field``, default
      ``"text"``); blank lines are skipped, and so are records whose text is empty or only whitespace.
    * ``.parquet``: the string column ``text_field``, row by row (read with pyarrow); null and
      whitespace-only values are skipped.
    * ``.txt``: the file is one document unless it is long. **Rule:** a ``.txt`` file is cut
      into at most ``TXT_PIECES`` (20) documents of at least ``TXT_MIN_PIECE_CHARS`` (4096)
      characters each: a cut is made at the first blank line at or after every
      ``max(len/20, 4096)`` characters (at a plain newline when the remaining text has no blank
      line); the blank line itself is dropped. So a file under 8 KiB is one document, and in a
      long file the last 5% of documents (the eval split) is about the last 5% of its text.
    * a folder: every ``.txt``/``.jsonl``/``.parquet`` file under it, recursively, in sorted path
      order; files and folders whose name starts with ``.`` are skipped.

    Text that is not valid UTF-8 is decoded with ``errors="replace"`` (bad bytes become U+FFFD)
    and one ``UserWarning`` per file names the file and the first bad byte's offset: a few bad
    bytes in a large scraped corpus should not stop a run, but should not pass silently either.
    A leading UTF-8 byte-order mark is removed.

    Raises :class:`DataError` for a missing or unreadable path, a folder without data files,
    another file extension, a bad ``.jsonl`` line (file and line number named), a parquet file
    without the column, or a corpus that is empty or only whitespace.
    """
    if path == "builtin":
        return _builtin_documents()
    files = source_files(path)
    docs: list[str] = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(t for lineno, rec in _read_jsonl(f) if (t := record_text(rec, text_field, f, lineno)).strip())
        elif suffix == ".parquet":
            for batch in _parquet_batches(f, text_field, 0):
                docs.extend(t for t in batch if t is not None and t.strip())
        else:
            docs.extend(d for d in _split_txt(_read_text(f)) if d.strip())
    if not docs:
        what = "file" if len(files) == 1 and not Path(path).expanduser().is_dir() else "folder's data files"
        raise DataError(
            f"data.path={path!r}: the {what} contain(s) no text (empty or only "
            f"whitespace). Training needs a non-empty corpus. {_ALLOWED_PATHS}."
        )
    return docs


def source_files(path: str) -> list[Path]:
    """The data files of a raw ``data.path`` (a file, or a folder's .txt/.jsonl/.parquet files, recursively,
    in sorted path order, hidden ones skipped). DataError when there are none or the path is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist. {_ALLOWED_PATHS}.")
    if p.is_dir():
        files = sorted(
            (
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in DATA_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        if not files:
            raise DataError(
                f"data.path={path!r} is a folder with no .txt, .jsonl or .parquet files in it "
                f"(searched recursively, hidden files skipped). {_ALLOWED_PATHS}."
            )
        return files
    if p.suffix.lower() in DATA_SUFFIXES:
        return [p]
    raise DataError(
        f"data.path={path!r} has the extension {p.suffix or '(none)'!r}, which leantrain cannot read. {_ALLOWED_PATHS}."
    )


def record_text(rec: dict, field: str, f: Path | str, lineno: int) -> str:
    """The document text of one .jsonl record (DataError naming file and line when it has none)."""
    if field not in rec:
        keys = ", ".join(repr(k) for k in list(rec)[:10]) or "none"
        raise DataError(
            f'{f}:{lineno}: the JSON object has no "{field}" field (its keys: {keys}). Every line '
            f'of a .jsonl file for data.format=text must be an object with a "{field}" string '
            "(data.text_field names the field)."
        )
    text = rec[field]
    if not isinstance(text, str):
        raise DataError(
            f'{f}:{lineno}: "{field}" is a {type(text).__name__}, not a string. Every line of a '
            f'.jsonl file for data.format=text must be an object with a "{field}" string.'
        )
    return text


PARQUET_BATCH_ROWS = 4096  # rows per pyarrow record batch: bounds what a streaming read holds at once


def _parquet_file(f: Path, field: str | None):
    """The opened file, its column ``field`` checked to be strings (``None``: whole records, checked per record)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged or foreign file
        raise DataError(f"Data file {str(f)!r} is not a readable parquet file ({e}).") from e
    if field is None:
        return pf
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"Data file {str(f)!r} has no column {field!r} (its columns: "
            f"{', '.join(schema.names[:20]) or 'none'}). Set data.text_field to the text column."
        )
    import pyarrow as pa

    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(
            f"Data file {str(f)!r}: the column {field!r} holds {kind}, not strings. "
            "data.text_field must name a string column."
        )
    return pf


def _parquet_batches(f: Path, field: str | None, skip_rows: int) -> Iterator[list]:
    """The column ``field``'s values (or, ``field=None``, every row as a dict) in record batches, after the first
    ``skip_rows`` rows."""
    pf = _parquet_file(f, field) if field is not None else _parquet_file(f, None)
    seen = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=None if field is None else [field]):
        values = batch.to_pylist() if field is None else batch.column(0).to_pylist()
        if seen + len(values) > skip_rows:
            yield values[max(skip_rows - seen, 0) :]
        seen += len(values)


# --------------------------------------------------------------------------------------------
# The same documents as a stream of chunks (leantrain prepare)
# --------------------------------------------------------------------------------------------

CHUNK_BYTES = 4 << 20  # source bytes per chunk: what one worker tokenizes at a time
TXT_CHUNK_DOCS = 4  # .txt pieces per chunk (a piece is up to 1/20 of its file)


@dataclass(frozen=True)
class Chunk:
    """A piece of the corpus that one worker turns into documents (:func:`chunk_documents`).

    ``file`` indexes the source files; ``end`` is where reading resumes in that file after this chunk (a byte
    offset in a .jsonl, a row in a .parquet, a piece in a .txt); ``size`` the source bytes it covers."""

    file: int
    path: str
    end: int
    size: int
    lines: bytes = b""  # .jsonl: whole lines, undecoded (workers parse them)
    first_line: int = 0  # .jsonl: the 1-based number of its first line
    texts: tuple = ()  # .parquet values (None for null) or .txt documents


def iter_chunks(
    files: list[Path], text_field: str | None, start: tuple[int, int] = (0, 0), chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Chunk]:
    """Every document of ``files`` (the rule of :func:`load_documents`) in chunks of about ``chunk_bytes``, from
    ``start`` = (file index, position in it) on. Holds one chunk at a time, except a .txt file, which is read
    whole to cut it. ``text_field=None``: whole records (SFT), a .parquet chunk's ``texts`` then being row dicts."""
    first_file, first_pos = start
    for index in range(first_file, len(files)):
        f, pos = files[index], first_pos if index == first_file else 0
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_chunks(index, f, pos, chunk_bytes)
        elif suffix == ".parquet":
            yield from _parquet_chunks(index, f, text_field, pos)
        else:
            yield from _txt_chunks(index, f, pos)


def _jsonl_chunks(index: int, f: Path, offset: int, chunk_bytes: int) -> Iterator[Chunk]:
    try:
        handle = open(f, "rb")
    except OSError as e:
        raise DataError(
            f"Data file {str(f)!r} cannot be read ({e.strerror or e}). Check that it exists and that "
            "this user may read it."
        ) from e
    with handle:
        line = 1
        remaining = offset  # a resumed file: count the lines before its offset (a line boundary)
        while remaining > 0 and (block := handle.read(min(chunk_bytes, remaining))):
            line, remaining = line + block.count(b"\n"), remaining - len(block)
        rest = b""
        while True:
            block = handle.read(chunk_bytes)
            data = rest + block
            if not block:  # the end of the file: the last line may lack its newline
                if data:
                    yield Chunk(index, str(f), offset + len(data), len(data), lines=data, first_line=line)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a chunk: read on
                rest = data
                continue
            lines, rest = data[:cut], data[cut:]
            offset += cut
            yield Chunk(index, str(f), offset, cut, lines=lines, first_line=line)
            line += lines.count(b"\n")


def _parquet_chunks(index: int, f: Path, field: str | None, row: int) -> Iterator[Chunk]:
    pf = _parquet_file(f, field)
    rows = max(pf.metadata.num_rows, 1)
    per_row = f.stat().st_size / rows
    for values in _parquet_batches(f, field, row):
        row += len(values)
        yield Chunk(index, str(f), row, int(per_row * len(values)), texts=tuple(values))


def _txt_chunks(index: int, f: Path, piece: int) -> Iterator[Chunk]:
    pieces = _split_txt(_read_text(f))
    per_piece = f.stat().st_size / len(pieces)
    for a in range(piece, len(pieces), TXT_CHUNK_DOCS):
        b = min(a + TXT_CHUNK_DOCS, len(pieces))
        yield Chunk(index, str(f), b, int(per_piece * (b - a)), texts=tuple(pieces[a:b]))


def _chunk_lines(chunk: Chunk) -> Iterator[tuple[int, dict, int]]:
    """(line number, record, characters of it that were not UTF-8) for each non-blank line of a .jsonl chunk."""
    for n, raw in enumerate(chunk.lines.split(b"\n")):
        lineno, bad = chunk.first_line + n, 0
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            bad = line.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        if line.strip():
            yield lineno, _parse_json_line(line, chunk.path, lineno), bad


def chunk_documents(chunk: Chunk, text_field: str) -> tuple[list[str], int]:
    """(the chunk's documents, how many characters were not valid UTF-8): the rule of :func:`load_documents`."""
    if not chunk.lines:
        return [t for t in chunk.texts if t is not None and t.strip()], 0
    docs, bad = [], 0
    for lineno, rec, b in _chunk_lines(chunk):
        bad += b
        if (text := record_text(rec, text_field, chunk.path, lineno)).strip():
            docs.append(text)
    return docs, bad


def chunk_records(chunk: Chunk) -> tuple[list[tuple[str, dict]], int]:
    """(where, record) for each record of a chunk read with ``text_field=None`` (where: 'file:line' or
    'file:row N', as ``leantrain.data.chat.read_records`` names them), and the characters that were not UTF-8."""
    if not chunk.lines:
        first = chunk.end - len(chunk.texts) + 1
        return [(f"{chunk.path}:row {first + k}", rec) for k, rec in enumerate(chunk.texts)], 0
    out, bad = [], 0
    for lineno, rec, b in _chunk_lines(chunk):
        out.append((f"{chunk.path}:{lineno}", rec))
        bad += b
    return out, bad


def _builtin_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - some distributions strip pydoc_data
        raise DataError(
            "data.path=builtin needs the pydoc topic texts of the standard library "
            f"(pydoc_data.topics), which this Python lacks ({e}). Point data.path at "
            "a .txt/.jsonl file or folder instead."
        ) from e
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def _read_text(f: Path) -> str:
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise DataError(
            f"Data file {str(f)!r} cannot be read ({e.strerror or e}). Check that it "
            "exists and that this user may read it."
        ) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw.count(b"\xef\xbf\xbd")
        text = raw.decode("utf-8", errors="replace")
        n = text.count("\ufffd") - bad
        warnings.warn(
            f"Data file {str(f)!r} is not valid UTF-8 (first bad byte at offset "
            f"{e.start}); {n} invalid byte sequence(s) were replaced with U+FFFD.",
            UserWarning,
            stacklevel=3,
        )
    return text[1:] if text.startswith("\ufeff") else text


def _read_jsonl(f: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a .jsonl file."""
    for lineno, line in enumerate(_read_text(f).split("\n"), start=1):
        if line.strip():
            yield lineno, _parse_json_line(line, f, lineno)


def _parse_json_line(line: str, f: Path | str, lineno: int) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{f}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). A .jsonl "
            "file must hold one JSON object per line; blank lines are allowed."
        ) from e
    if not isinstance(rec, dict):
        raise DataError(
            f"{f}:{lineno}: expected a JSON object, got {type(rec).__name__}. A "
            ".jsonl file must hold one JSON object per line."
        )
    return rec


def _split_txt(text: str) -> list[str]:
    """Cut a .txt file's text into documents (the rule is in load_documents' docstring)."""
    target = max(math.ceil(len(text) / TXT_PIECES), TXT_MIN_PIECE_CHARS)
    docs: list[str] = []
    pos = 0
    while len(text) - pos >= 2 * target:
        m = _BLANK_LINE.search(text, pos + target)
        if m is not None:
            docs.append(text[pos : m.start()])
            pos = m.end()
            continue
        nl = text.find("\n", pos + target)
        if nl < 0:
            break
        docs.append(text[pos:nl])
        pos = nl + 1
    docs.append(text[pos:])
    return docs


EVAL_FRACTION = 0.05  # the last 5% of documents (text) or samples (SFT) are the held-out eval split


def eval_count(n: int, eval_fraction: float = EVAL_FRACTION) -> int:
    """How many of n documents or samples (n >= 2) the eval split takes: at least one, never all."""
    return min(max(1, round(n * eval_fraction)), n - 1)


def split_documents(docs: list[str], eval_fraction: float = EVAL_FRACTION) -> tuple[list[str], list[str]]:
    """(train, eval): the last ``eval_fraction`` of documents, at least one, are the eval split.

    The count is ``max(1, round(len(docs) * eval_fraction))``, never all of them; training never
    sees those documents. **With a single document** its text is cut instead: the first
    ``floor(len * (1 - eval_fraction))`` characters train, the rest is the eval split (so a
    single small .txt still has one). Both splits are non-empty.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"The eval fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}.")
    if not docs:
        raise DataError("There are no documents to split into train and eval; data.path must hold some text.")
    if len(docs) == 1:
        text = docs[0]
        if len(text) < 2:
            raise DataError(
                f"The corpus is a single document of {len(text)} character(s); it "
                "cannot be split into train and eval. Add more text."
            )
        cut = min(max(int(len(text) * (1.0 - eval_fraction)), 1), len(text) - 1)
        return [text[:cut]], [text[cut:]]
    n_eval = eval_count(len(docs), eval_fraction)
    return list(docs[:-n_eval]), list(docs[-n_eval:])
