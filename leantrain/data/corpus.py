"""Documents: ``builtin`` (CPython's pydoc texts), .txt, .jsonl or a folder of them; the eval split."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterator

from leantrain.errors import DataError

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
        raise DataError("There are no documents to split into train and eval; data.path must "
                        "hold some text.")
    if len(docs) == 1:
        text = docs[0]
        if len(text) < 2:
            raise DataError(f"The corpus is a single document of {len(text)} character(s); it "
                            "cannot be split into train and eval. Add more text.")
        cut = min(max(int(len(text) * (1.0 - eval_fraction)), 1), len(text) - 1)
        return [text[:cut]], [text[cut:]]
    n_eval = eval_count(len(docs), eval_fraction)
    return list(docs[:-n_eval]), list(docs[-n_eval:])
