"""Reading a checkpoint that may not be what it claims: safe unpickling, and checks against this run.

DCP's ``.metadata`` is a pickle, and DCP unpickles every non-tensor entry of the data files with
``torch.load(weights_only=False)``. :class:`_SafeReader` and :class:`_SafeLoadPlanner` refuse anything but
DCP's metadata classes and plain values before that happens; :func:`_check_tensors` and
:func:`_check_model_args` compare what is stored with what this run needs (see the package docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp

from ..errors import CheckpointError
from ..model import ModelArgs


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---- reading checkpoints that may not be what they claim ---------------------------------------------

# Globals a DCP .metadata pickle may name besides the dataclasses and enums of torch.distributed.checkpoint
# (and the torch dtypes): what torch writes for shapes, layouts and the checkpoint's path.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _Refused(pickle.UnpicklingError):
    """A pickle names a global that a leantrain checkpoint never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP .metadata building only DCP's own metadata classes, torch.Size and dtypes; any other
    global (``os.system``, ...) is refused before it is looked up, let alone called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            import enum

            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        raise _Refused(f"{module}.{name}")


def _refused(path: Path, what: str, name: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint {path} is not safe to load: its {what} names '{name}', which a "
        f"leantrain checkpoint never holds (unpickling it could run code). It was not loaded. "
        f"Load checkpoints only from sources you trust."
    )


class _SafeReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, but .metadata is first unpickled by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with open(Path(self.path) / name, "rb") as f:
            try:
                _MetadataUnpickler(f).load()
            except _Refused as e:
                raise _refused(Path(self.path), ".metadata (a pickle)", str(e)) from None
        return super().read_metadata(*args, **kwargs)


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner unpickles every non-tensor entry (step, hyperparameters, schedule and data
    position) with ``torch.load(weights_only=False)``; this one first loads it with ``weights_only=True``
    (plain Python values and tensors only) and refuses the checkpoint if that fails."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = path

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raw = value.read()
        try:
            torch.load(io.BytesIO(raw), weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise _refused(
                self._path,
                f"entry '{read_item.dest_index.fqn}'",
                found.group(1) if found else "an object that is not a plain value",
            ) from None
        super().load_bytes(read_item, io.BytesIO(raw))


def _flatten(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict under the keys DCP stores ('optimizer.state.<name>.exp_avg', 'optimizer.param_groups.0.lr'),
    flattened by DCP's own rule (dicts, and lists that hold tensors or dicts) so the checks see what DCP writes."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # the flattening DCP's planners use

    return flatten_state_dict(state)[0]


# Keys a checkpoint may hold or lack: the CUDA generator (a CPU run of a GPU checkpoint), and the stochastic-rounding
# generator of versions before the random bits became a hash (optim/randbits.py), which nothing reads any more.
_OPTIONAL_KEYS = ("rng.cuda", "optimizer.rng_state", "optimizer.param_groups.0.rng_state")


def _check_tensors(
    path: Path, expected: dict[str, Any], info: dict[str, Any], optional: tuple[str, ...] = _OPTIONAL_KEYS
) -> None:
    """Every key the load asks for is in the checkpoint with the same shape and dtype, and nothing is left over
    under the parts being loaded. DCP's own load would cast dtypes silently and ignore extra keys."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        stored = _SafeReader(str(path)).read_metadata().state_dict_metadata
    except CheckpointError:
        raise
    except Exception as e:  # a damaged .metadata raises anything from OSError to an unpickling error
        raise CheckpointError(
            f"The checkpoint {path} has an unreadable DCP .metadata file ({type(e).__name__}: {e}); it is damaged."
        ) from None
    parts = {k.split(".")[0] for k in expected}
    missing, wrong, extra = [], [], []
    for key, value in expected.items():
        meta = stored.get(key)
        if meta is None:
            if not key.startswith(optional):
                missing.append(key)
        elif isinstance(value, torch.Tensor):
            if not isinstance(meta, TensorStorageMetadata):
                wrong.append(f"{key} is not a tensor there")
            elif meta.properties.dtype != value.dtype or tuple(meta.size) != tuple(value.shape):
                wrong.append(
                    f"{key} is {str(meta.properties.dtype).replace('torch.', '')}{list(meta.size)} there "
                    f"and {str(value.dtype).replace('torch.', '')}{list(value.shape)} here"
                )
    for key in stored:
        if key.split(".")[0] in parts and key not in expected and not key.startswith(optional):
            extra.append(key)
    if not (missing or wrong or extra):
        return

    def some(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    details = []
    if wrong:
        details.append(f"{len(wrong)} tensor(s) differ: {some(wrong)}")
    if missing:
        details.append(f"{len(missing)} entr(ies) this run needs are not in it: {some(missing)}")
    if extra:
        details.append(f"{len(extra)} entr(ies) in it have no place in this run: {some(extra)}")
    saved_args = info.get("model_args", {})
    raise CheckpointError(
        f"The checkpoint {path} (step {info.get('step')}, recipe {info.get('recipe') or 'custom'}, "
        f"model dim={saved_args.get('dim')} n_layers={saved_args.get('n_layers')}) does not "
        f"match this model and optimizer: {'; '.join(details)}."
    )


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner(path))
    except (Exception, CheckpointException) as e:
        if isinstance(e, CheckpointException) and e.failures:  # {rank: (exception, traceback)}
            e = next(iter(e.failures.values()))[0]
        if isinstance(e, CheckpointError):
            raise e from None
        detail = (str(e).strip().splitlines() or ["no detail"])[0].split(". ")[0][:160]
        raise CheckpointError(
            f"The checkpoint {path} could not be read ({type(e).__name__}: {detail}); it is "
            f"damaged. Restore it, or move it away to use an earlier checkpoint."
        ) from None


def _check_model_args(path: Path, info: dict[str, Any], args: ModelArgs) -> None:
    saved = dict(info.get("model_args", {}))
    ours = json.loads(json.dumps(dataclasses.asdict(args)))
    differ = [
        f"{k} is {saved[k]!r} in the checkpoint and {ours[k]!r} now"
        for k in sorted(ours)
        if k != "max_seq_len" and k in saved and saved[k] != ours[k]
    ]
    if differ:
        raise CheckpointError(
            f"The checkpoint {path} holds another model: {'; '.join(differ)}. Use the model "
            f"settings it was trained with."
        )
