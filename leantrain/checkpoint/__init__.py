"""Checkpoints that resume a run exactly, with torch.distributed.checkpoint (DCP).

A checkpoint is a folder ``<job.dump_folder>/<checkpoint.folder>/step-N/`` holding DCP's files
(``.metadata`` and one ``__R_S.distcp`` per writer) and ``leantrain.json`` (the config of the run that
wrote it, the model's dimensions, the step, and the size of every file). The DCP state dict is:

    step                            optimizer steps taken
    model.<name>                    model.state_dict(), in the storage dtype
    optimizer.state.<param>.<buf>   every AdamW buffer: step, moments (fp32 / bf16, or int8 codes + fp32
                                    scales), kahan_comp; keyed by parameter name, not position
    optimizer.param_groups.<i>.*    hyperparameters, the recipe keys, and the parameter names of the group
    optimizer.rng_state             the optimizer's stochastic-rounding generator
    lr_scheduler.*                  LambdaLR.state_dict()
    data.*                          the position in the training data (epoch, position) and its identity
    rng.torch / rng.cuda            the global RNG state (leantrain seeds every rank the same, so one copy)

Every rank writes its own shards and DCP records which slice each one holds, so a checkpoint saved by
N ranks loads on M ranks (DCP reshards on load). In one process no process group is needed.

**Atomic.** A checkpoint is written to ``step-N.tmp`` and renamed to ``step-N`` only after DCP has
written (and fsynced) every file and ``leantrain.json`` is in place, so a crash mid-save leaves the
previous checkpoint as the latest complete one. A leftover ``step-N.tmp`` is never read; the next save
of that step replaces it.

**Resume.** With ``checkpoint.enable``, a run started on a dump folder that has checkpoints loads the
latest complete one and continues from its step (:func:`find_resume` before any file is written,
:meth:`Checkpointer.load` once the model and optimizer exist). Settings that change what the run is
(model, data, tokenizer, seed, precision recipe, optimizer and schedule hyperparameters) must equal
the checkpoint's; ``training.steps`` (to extend a run), ``eval.*``, ``metrics.*``, ``checkpoint.*``,
batch size and accumulation may change (a note lists what changed).

**Checked, never guessed.** A checkpoint from another model or recipe, a missing or truncated file, or
a tensor of another shape or dtype raises :class:`CheckpointError` naming what does not match (DCP
itself would cast a bf16 tensor into an fp32 one without a word). Nothing in the checkpoint is
changed, and an earlier checkpoint is not silently used instead.

**Finite.** A checkpoint is never written from weights that hold NaN/Inf: :meth:`Checkpointer.save` checks
them first and stops the run with :class:`TrainingDiverged` (exit code 3) instead.

**Untrusted files.** DCP's ``.metadata`` is a pickle, and DCP unpickles every non-tensor entry of the data
files with ``torch.load(weights_only=False)``: a crafted checkpoint could run code when loaded. leantrain
reads checkpoints only through :class:`_SafeReader` (``reading.py``) (``.metadata`` first unpickled by an unpickler that
allows only DCP's metadata classes, torch.Size and dtypes) and :class:`_SafeLoadPlanner` (every non-tensor
entry first loaded with ``weights_only=True``: plain Python values and tensors only); anything else is
refused with a :class:`CheckpointError` before it is unpickled for real. Checkpoints should still come
from sources you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .. import guard, precision
from ..config import Config, resolve_dump_folder, to_dict
from ..errors import CheckpointError, TrainingDiverged
from ..model import ModelArgs, Transformer, build_model_from_args
from .reading import _check_model_args, _check_tensors, _dcp_load, _quiet_dcp, _SafeReader

INFO_FILE = "leantrain.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Config keys that may differ between a checkpoint and the run resuming from it (prefixes end with ".").
MAY_CHANGE = ("job.dump_folder", "training.steps", "eval.", "metrics.", "checkpoint.", "model.hf_checkpoint",
              "data.local_batch_size", "training.gradient_accumulation_steps", "parallelism.", "compile.",
              "activation_checkpoint.", "training.max_nonfinite_steps")
# Test hooks: LEANTRAIN_TEST_CRASH_IN_SAVE=N kills the process in the middle of saving step N;
# LEANTRAIN_TEST_PAUSE_IN_SAVE=N sleeps there (an hour), for a test to signal or kill it mid-save.
CRASH_ENV = "LEANTRAIN_TEST_CRASH_IN_SAVE"
PAUSE_ENV = "LEANTRAIN_TEST_PAUSE_IN_SAVE"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _say(message: str) -> None:
    if _rank() == 0:
        print(f"leantrain: {message}", flush=True)


# ---- finding checkpoints -------------------------------------------------------------------------


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.job.dump_folder) / cfg.checkpoint.folder


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N`` folders; ``.tmp`` ones are incomplete) under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def resolve(path: str | Path) -> Path:
    """A ``step-N`` folder, or the latest checkpoint in a checkpoints folder or in a run folder (via its config)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"The checkpoint '{path}' does not exist. Pass a step-N folder, the folder that "
                              f"holds them, or a run's job.dump_folder.")
    if (p / INFO_FILE).exists() or _STEP_DIR.match(p.name):
        return p
    candidates = list_checkpoints(p)
    if not candidates and (p / "config.toml").exists():
        from ..config import load_config

        folder = load_config(str(p / "config.toml")).checkpoint.folder
        candidates = list_checkpoints(p / folder)
    if not candidates:
        raise CheckpointError(f"'{path}' holds no checkpoint (no step-N folder with a {INFO_FILE}). Pass a "
                              f"step-N folder, the folder that holds them, or a run's job.dump_folder.")
    return candidates[-1][1]


def read_info(path: str | Path) -> dict[str, Any]:
    """leantrain.json of a checkpoint, after checking that every file it lists is there with its size."""
    path = Path(path)
    info_path = path / INFO_FILE
    if not info_path.exists():
        raise CheckpointError(f"The checkpoint {path} is incomplete: it has no {INFO_FILE} (written last, when a "
                              f"save completes). It may be damaged or not a leantrain checkpoint. Move it away "
                              f"or delete it to resume from an earlier checkpoint.")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        files, step = info["files"], int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"The checkpoint {path} has an unreadable {INFO_FILE} ({e}); it is damaged. Move it "
                              f"away or delete it to resume from an earlier checkpoint.") from None
    problems = []
    for name, size in sorted(files.items()):
        f = path / name
        if not f.exists():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes instead of {size} (truncated or overwritten)")
    if problems:
        raise CheckpointError(f"The checkpoint {path} (step {step}) is damaged: {'; '.join(problems)}. It cannot "
                              f"be loaded. Restore the files, or move the folder away to use an earlier "
                              f"checkpoint.")
    return info


def _flat_config(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in d.items() if isinstance(values, dict) for k, v in values.items()}


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint this run resumes from (the latest complete one), checked against the config; or None.

    Called before the run writes anything, so a mismatch stops the run with every file as it was.
    """
    resolve_dump_folder(cfg)  # an empty job.dump_folder becomes runs/<timestamp> here, as in prepare_run_folder
    root = checkpoint_root(cfg)
    found = list_checkpoints(root)
    if not cfg.checkpoint.enable:
        if found:
            from ..config import warn_once

            warn_once(f"{root} has {len(found)} checkpoint(s) but checkpoint.enable is false: this run starts from "
                      f"step 0 and neither reads nor changes them. Set checkpoint.enable=true to resume.")
        return None
    incomplete = sorted(p.name for p in root.glob("step-*.tmp")) if root.is_dir() else []
    if incomplete:
        _say(f"ignoring incomplete checkpoint(s) {', '.join(incomplete)} in {root} (a save that did not finish).")
    if not found:
        return None
    path = found[-1][1]
    info = read_info(path)
    check_config(path, info, cfg)
    return path


def check_config(path: Path, info: dict[str, Any], cfg: Config) -> None:
    """Raise CheckpointError if the run that wrote the checkpoint differs from this one in what it *is*."""
    saved = _flat_config(info.get("config", {}))
    ours = _flat_config(json.loads(json.dumps(to_dict(cfg))))
    differ, notes = [], []
    for key in sorted(set(saved) & set(ours)):  # keys added or removed by a newer version are not compared
        if saved[key] == ours[key]:
            continue
        line = f"{key} is {saved[key]!r} in the checkpoint and {ours[key]!r} now"
        (notes if key.startswith(MAY_CHANGE) else differ).append(line)
    if differ:
        theirs, mine = info.get("recipe"), precision.recipe_of(cfg)
        recipes = (f" The checkpoint was written by recipe {theirs or 'custom'}, this run is recipe "
                   f"{mine or 'custom'}." if theirs != mine else "")
        raise CheckpointError(
            f"The checkpoint {path} (step {info['step']}) belongs to another run: {'; '.join(differ)}.{recipes} "
            f"A run resumes only from its own checkpoints: use the same settings, or another job.dump_folder to "
            f"start a new run (to start from its weights, `leantrain export` it and set model.hf_checkpoint).")
    if notes:
        _say(f"resuming with changed settings: {'; '.join(notes)}.")


# ---- the state dict ------------------------------------------------------------------------------


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}  # tied weights: the first name


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() keyed by parameter name (so it reshards and survives reordering), same tensors."""
    sd = optimizer.state_dict()
    names = _param_names(model)
    index_to_name = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[len(index_to_name)] = names[id(p)]
    groups, rng_state = {}, None
    for i, g in enumerate(sd["param_groups"]):
        g = dict(g)
        rng_state = g.pop("rng_state", rng_state)
        g["params"] = [index_to_name[j] for j in g["params"]]
        groups[str(i)] = g
    out = {"state": {index_to_name[j]: dict(bufs) for j, bufs in sd["state"].items()}, "param_groups": groups}
    if rng_state is not None:
        out["rng_state"] = rng_state
    return out


def _optimizer_load(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], path: Path) -> None:
    name_to_index = {}
    names = _param_names(model)
    for group in optimizer.param_groups:
        for p in group["params"]:
            name_to_index[names[id(p)]] = len(name_to_index)
    groups = []
    for i in range(len(optimizer.param_groups)):
        g = dict(saved["param_groups"][str(i)])
        ours = [names[id(p)] for p in optimizer.param_groups[i]["params"]]
        if g["params"] != ours:
            raise CheckpointError(f"The checkpoint {path} groups the optimizer's parameters differently (group {i}: "
                                  f"{len(g['params'])} parameters there, {len(ours)} here); it was written by "
                                  f"another model or optimizer layout.")
        g["params"] = [name_to_index[n] for n in g["params"]]
        groups.append(g)
    if "rng_state" in saved:
        groups[0]["rng_state"] = saved["rng_state"]
    state = {name_to_index[n]: bufs for n, bufs in saved["state"].items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except ValueError as e:
        raise CheckpointError(f"The checkpoint {path} has optimizer state this optimizer cannot take: {e}. It was "
                              f"written by another recipe.") from None


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _flatten(sd: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}, the keys DCP stores (lists of plain values are leaves)."""
    out = {}
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---- save and load during training -----------------------------------------------------------------


class Checkpointer:
    """Saves and loads one run's full training state; see the module docstring for what and how."""

    def __init__(self, cfg: Config, model: Transformer, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, data: Any):
        self.cfg, self.model, self.optimizer, self.scheduler, self.data = cfg, model, optimizer, scheduler, data
        self.root = checkpoint_root(cfg)

    def _state(self, step: int) -> dict[str, Any]:
        return {"step": step, "model": self.model.state_dict(),
                "optimizer": _optimizer_state(self.model, self.optimizer),
                "lr_scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(), "rng": _rng_state()}

    def _allocate_optimizer_state(self) -> None:
        """Every optimizer buffer, as the first step would create it (zeros, step 0), if not there yet."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.init_state(p)

    # -- save

    def save_if_due(self, step: int, elapsed_s: float = 0.0, force: bool = False) -> Path | None:
        """Save after optimizer step ``step`` when it is a multiple of checkpoint.interval or the last step, or
        with ``force`` (a stop signal) whatever the step; only with checkpoint.enable. Returns the checkpoint."""
        c = self.cfg.checkpoint
        if c.enable and (force or step % c.interval == 0 or step == self.cfg.training.steps):
            return self.save(step, elapsed_s)
        return None

    def latest(self) -> Path | None:
        """The run's latest complete checkpoint, if any."""
        found = list_checkpoints(self.root)
        return found[-1][1] if found else None

    def save(self, step: int, elapsed_s: float = 0.0) -> Path:
        began = time.perf_counter()
        final, tmp = self.root / f"step-{step}", self.root / f"step-{step}.tmp"
        if not guard.all_finite(self.model.parameters()):
            latest = self.latest()
            raise TrainingDiverged(f"The weights hold NaN/Inf after step {step}, so no checkpoint is written from "
                                   f"them; training diverged. The latest complete checkpoint is "
                                   f"{latest or 'none'}. Lower optimizer.lr or raise lr_scheduler.warmup_steps "
                                   f"(and use a new job.dump_folder, or the same settings resume into the same "
                                   f"divergence).")
        if final.exists():
            raise CheckpointError(f"A checkpoint {final} already exists; leantrain never overwrites one. Move it "
                                  f"away, or use another job.dump_folder.")
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # an earlier save of this step that did not finish
            tmp.mkdir(parents=True)
        _barrier()
        self._allocate_optimizer_state()  # all skipped so far (NaN/Inf steps): still save the full layout
        with _quiet_dcp():
            dcp.save(self._state(step), checkpoint_id=str(tmp))
        if os.environ.get(CRASH_ENV) == str(step):
            os._exit(1)  # test hook: the data is written, leantrain.json and the rename are not
        if os.environ.get(PAUSE_ENV) == str(step):
            time.sleep(3600)  # test hook: the same moment, held open for a signal or a kill -9
        if _rank() == 0:
            files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
            info = {"step": step, "elapsed_s": elapsed_s, "recipe": precision.recipe_of(self.cfg),
                    "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
                    "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "torch_version": torch.__version__, "model_args": dataclasses.asdict(self.model.args),
                    "config": to_dict(self.cfg), "files": files}
            with open(tmp / INFO_FILE, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
            size = sum(files.values())
            _say(f"saved checkpoint {final} ({size / 2**20:.1f} MiB in {time.perf_counter() - began:.1f}s)")
        _barrier()
        return final

    def _prune(self) -> None:
        k = self.cfg.checkpoint.keep_latest_k
        if k:
            for _, old in list_checkpoints(self.root)[:-k]:
                shutil.rmtree(old)

    # -- load

    def load(self, path: str | Path) -> tuple[int, float]:
        """Load everything from ``path`` into the run's objects; returns (step, elapsed seconds at that step)."""
        path = Path(path)
        info = read_info(path)
        _check_model_args(path, info, self.model.args)
        self._allocate_optimizer_state()  # the buffers the checkpoint is loaded into
        state = self._state(0)
        if "cuda" in state["rng"] and not _has_key(path, "rng.cuda"):
            del state["rng"]["cuda"]
        _check_tensors(path, _flatten(state), info)
        _dcp_load(state, path)
        _optimizer_load(self.model, self.optimizer, state["optimizer"], path)
        self.scheduler.load_state_dict(state["lr_scheduler"])
        # The learning rate of the next step, from this run's schedule (equal to the saved one unless
        # training.steps changed).
        lrs = [base * fn(self.scheduler.last_epoch) for fn, base in zip(self.scheduler.lr_lambdas,
                                                                          self.scheduler.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step = int(state["step"])
        _say(f"resuming from checkpoint {path} at step {step}")
        return step, float(info.get("elapsed_s", 0.0))


def _has_key(path: Path, key: str) -> bool:
    try:
        return key in _SafeReader(str(path)).read_metadata().state_dict_metadata
    except Exception:
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- the model alone (eval, export) -----------------------------------------------------------------


def saved_config(info: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """The config of the run that wrote a checkpoint, with ``overrides`` on top (validated as usual, without
    repeating the warnings the run already gave). Keys this version of leantrain does not know are dropped."""
    from ..config import load_config

    known = {f"{f.name}.{g.name}" for f in dataclasses.fields(Config) if f.name != "recipe"
             for g in dataclasses.fields(getattr(Config(), f.name))}
    values: dict[str, Any] = {k: v for k, v in _flat_config(info.get("config", {})).items() if k in known}
    recipe = info.get("config", {}).get("recipe")
    if recipe:
        values["recipe"] = recipe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_config(None, {**values, **(overrides or {})})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """The model of a checkpoint, in the storage dtype it was trained in, and the checkpoint's info."""
    path = resolve(path)
    info = read_info(path)
    try:
        args = ModelArgs(**info["model_args"])
        dtype = precision.DTYPES[info["config"]["training"]["dtype"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"The checkpoint {path} has no usable model_args or training.dtype in {INFO_FILE} "
                              f"({e}).") from None
    model = build_model_from_args(args, dtype, device, seed=None)
    state = {"model": model.state_dict()}
    _check_tensors(path, _flatten(state), info)
    _dcp_load(state, path)
    info["path"] = str(path)
    return model, info
