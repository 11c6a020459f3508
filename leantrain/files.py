"""The one JSON read and the one atomic JSON write (no torch here: leantrain prepare's workers import it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def read_json(path: str | Path, bad: Callable[[str], Exception], kind: type = dict) -> Any:
    """The JSON value in ``path``, of type ``kind``. ``bad(reason)`` is the error raised when the file cannot be
    read, is not JSON, or holds another type: each caller says in its own words what the file was for."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"{path} is not readable JSON ({e})") from None
    if not isinstance(value, kind):
        raise bad(f"{path} must hold a JSON {'object' if kind is dict else kind.__name__}, not {type(value).__name__}")
    return value


def write_json_atomic(path: str | Path, value: Any) -> None:
    """Write to ``path.tmp``, fsync, rename: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
