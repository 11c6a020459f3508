"""What a run reports: metrics.jsonl, summary.json, loss.png, the progress bar, and measured memory."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from typing import Any, Iterable

import torch
from torch import nn

from .distributed import local
from .errors import storage_error
from .files import write_json_atomic


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        storage = local(t).untyped_storage()  # a DTensor's: this rank's shard
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the live training state, measured from tensor storages (each storage counted once)."""
    seen: set[int] = set()
    params = list(model.parameters())
    return {
        "params": _storage_bytes(params, seen),
        "grads": _storage_bytes([p.grad for p in params if p.grad is not None], seen),
        "optimizer": _storage_bytes(
            [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)], seen
        ),
    }


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl (flushed, so a crash loses at most a line)."""

    def __init__(self, folder: str, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = False):
        """``resume_step``: the run continues from its checkpoint of that step (0: from scratch, no checkpoint
        yet). The records up to that step are kept (and count in summary.json); those after it, logged by an
        interrupted attempt after its last checkpoint, are removed from the file, because this run logs those
        steps again. ``None`` (checkpointing off): the file is appended to as it is. ``tensorboard``: every
        record's numbers also go to TensorBoard event files in ``folder`` (those after resume_step purged)."""
        self.enabled = enabled
        self._tensorboard = _summary_writer(folder, resume_step) if enabled and tensorboard else None
        self.records: list[dict[str, Any]] = []
        self.path = os.path.join(folder, "metrics.jsonl")
        if enabled and resume_step is not None and os.path.exists(self.path):
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(tmp, self.path)
        elif enabled and os.path.exists(self.path):
            _drop_torn_last_line(self.path)  # appending after half a line would leave an invalid line inside
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._file:
            end = self._file.tell()
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:
                self._drop_partial_line(end)
                raise storage_error("a line of metrics.jsonl", self.path, e) from None
        if self._tensorboard:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, record["step"])
            self._tensorboard.flush()

    def _drop_partial_line(self, end: int) -> None:
        """After a failed write, cut what part of the line reached the file: it holds whole lines only."""
        self._file = None  # its buffer holds the unwritten rest; closing would try to write it again
        try:
            os.truncate(self.path, end)
        except OSError:
            pass  # the next start drops a torn last line (_drop_torn_last_line) or rewrites the file on resume

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tensorboard:
            self._tensorboard.close()
            self._tensorboard = None


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _summary_writer(folder: str, resume_step: int | None) -> Any:
    """torch's TensorBoard SummaryWriter on the run folder; a resumed run purges the events an interrupted attempt
    logged after its checkpoint, as metrics.jsonl drops those lines."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=folder, purge_step=None if resume_step is None else resume_step + 1)


def _drop_torn_last_line(path: str) -> None:
    """Cut a last line that has no newline (a process killed in the middle of writing it)."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def summarize(records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """summary.json: final_loss is the mean of the last 10% of logged train losses (skipped NaN/Inf steps,
    logged as null, do not count)."""
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    speeds = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    return {
        "final_loss": sum(tail) / len(tail) if tail else None,
        "final_eval_loss": evals[-1] if evals else None,
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
        **extra,
    }


def write_json(path: str, obj: Any) -> None:
    """A run's JSON file, written atomically; a full disk is a StorageError naming the file."""
    try:
        write_json_atomic(path, obj)
    except OSError as e:
        raise storage_error(os.path.basename(path), path, e) from None


def plot_losses(curves: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> None:
    """Train loss (lines) and eval loss (markers) against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (name, records) in enumerate(curves.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1.2, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=color, ls="--", marker="o", ms=5, label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 3 else 1)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        plt.close(fig)
        raise storage_error("loss.png", path, e) from None
    plt.close(fig)


class Progress:
    """A one-line progress bar on stderr (tqdm) that moves every step and shows loss, tokens/s and memory from the
    logged steps. While it is up, whatever the run prints (warnings, checkpoint messages) goes through tqdm,
    above the bar, instead of breaking its line."""

    def __init__(self, total: int, enabled: bool, desc: str = "train", initial: int = 0):
        from tqdm import tqdm

        self.enabled = enabled
        self._streams = sys.stdout, sys.stderr
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            unit="step",
        )
        if enabled:
            sys.stdout, sys.stderr = (_AboveBar(stream, self.bar) for stream in self._streams)

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def show(self, record: dict[str, Any]) -> None:
        loss = record["loss"]
        postfix = {
            "loss": "skipped" if loss is None else f"{loss:.3f}",
            "tok/s": f"{record['tokens_per_sec']:.0f}",
            "mem": f"{record['peak_memory_bytes'] / 2**30:.2f}GiB",
        }
        if "eval_loss" in record:
            postfix["eval"] = f"{record['eval_loss']:.3f}"
        if "compile_s" in record:  # (left out of tok/s)
            postfix["compiled in"] = f"{record['compile_s']:.0f}s"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def note(self, text: str) -> None:
        """A word on the bar until the first logged step replaces it (e.g. 'compiling')."""
        self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self.enabled:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _AboveBar):
                    stream.flush_line()
            sys.stdout, sys.stderr = self._streams
        self.bar.close()


class _AboveBar:
    """A stream whose whole lines are written above the progress bar (cleared, the line, the bar drawn again).

    tqdm's own DummyTqdmFile clears only bars on the stream it writes to once sys.stdout and sys.stderr are
    replaced, so a print to stdout under a bar on stderr would still break the bar's line."""

    def __init__(self, stream: Any, bar: Any):
        self._stream, self._bar, self._pending = stream, bar, ""

    def write(self, text: str) -> int:
        head, newline, self._pending = (self._pending + text).rpartition("\n")
        if newline:
            self._bar.clear()
            self._stream.write(head + newline)
            self._stream.flush()
            self._bar.refresh()
        return len(text)

    def flush_line(self) -> None:
        if self._pending:
            self.write("\n")

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding...: the real stream's
        return getattr(self._stream, name)
