"""Checkpoints that resume a run exactly, with torch.distributed.checkpoint (DCP).

A checkpoint is a folder ``<job.dump_folder>/<checkpoint.folder>/step-N/`` holding DCP's files
(``.metadata`` and one ``__R_S.distcp`` per writer) and ``leantrain.json`` (the config of the run that
wrote it, the model's dimensions, the step, and the size of every file). The DCP state dict is
:class:`leantrain.state.TrainState`'s (a DCP ``Stateful``; its docstring lists the keys).

Every rank writes its own shards and DCP records which slice each one holds, so a checkpoint saved by
N ranks loads on M ranks (DCP reshards on load). In one process no process group is needed.

**Atomic.** A checkpoint is written to ``step-N.tmp`` and renamed to ``step-N`` only after DCP has
written (and fsynced) every file and ``leantrain.json`` is in place, so a crash mid-save leaves the
previous checkpoint as the latest complete one. A leftover ``step-N.tmp`` is never read; the next save
of that step replaces it.

**Resume.** With ``checkpoint.enable``, a run started on a dump folder that has checkpoints loads the
latest complete one and continues from its step (:func:`find_resume` before any file is written,
:meth:`Checkpointer.load` once the training state exists). Settings that change what the run is
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from .. import distributed, guard
from ..config import Checkpoint, Config, load_config, warn_once
from ..errors import CheckpointError, TrainingDiverged, storage_error
from ..files import read_json
from ..hooks import Hooks
from ..model import ModelArgs, Transformer, build_model_from_args
from ..optim import quant
from ..precision import DTYPES
from ..runplan import RunPlan
from ..state import TrainState
from .reading import _check_model_args, _check_tensors, _dcp_load, _flatten, _quiet_dcp, _SafeReader

INFO_FILE = "leantrain.json"
FINAL_MODEL = "model"  # <job.dump_folder>/model/: the final weights of a run without checkpoints (model only)
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Config keys that may differ between a checkpoint and the run resuming from it (prefixes end with ".").
MAY_CHANGE = (
    "job.dump_folder",
    "training.steps",
    "eval.",
    "metrics.",
    "checkpoint.",
    "model.hf_checkpoint",
    "data.local_batch_size",
    "training.gradient_accumulation_steps",
    "parallelism.",
    "compile.",
    "activation_checkpoint.",
    "training.max_nonfinite_steps",
)


def _say(message: str) -> None:
    if distributed.is_main():
        print(f"leantrain: {message}", flush=True)


# ---- finding checkpoints -------------------------------------------------------------------------


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
        raise CheckpointError(
            f"The checkpoint '{path}' does not exist. Pass a step-N folder, the folder that "
            f"holds them, or a run's job.dump_folder."
        )
    if (p / INFO_FILE).exists() or _STEP_DIR.match(p.name):
        return p
    candidates = list_checkpoints(p)
    if not candidates and (p / "config.toml").exists():
        folder = load_config(str(p / "config.toml"), warn=False).checkpoint.folder
        candidates = list_checkpoints(p / folder)
    if not candidates and (p / FINAL_MODEL / INFO_FILE).exists():
        return p / FINAL_MODEL
    if not candidates:
        raise CheckpointError(
            f"'{path}' holds no checkpoint (no step-N folder with a {INFO_FILE}, and no final "
            f"'{FINAL_MODEL}' folder: the run did not finish). Pass a step-N folder, the folder "
            f"that holds them, or a run's job.dump_folder."
        )
    return candidates[-1][1]


def run_folder_of(path: Path, info: dict[str, Any]) -> Path:
    """The run folder (job.dump_folder) that holds a checkpoint or a final model."""
    if info.get("model_only"):
        return path.resolve().parent
    folder = info.get("config", {}).get("checkpoint", {}).get("folder", "checkpoints")
    return path.parent.joinpath(*[".."] * len(Path(folder).parts)).resolve()


def read_info(path: str | Path) -> dict[str, Any]:
    """leantrain.json of a checkpoint, after checking that every file it lists is there with its size."""
    path = Path(path)
    info_path = path / INFO_FILE
    if not info_path.exists():
        raise CheckpointError(
            f"The checkpoint {path} is incomplete: it has no {INFO_FILE} (written last, when a "
            f"save completes). It may be damaged or not a leantrain checkpoint. Move it away "
            f"or delete it to resume from an earlier checkpoint."
        )

    def damaged(reason: object) -> CheckpointError:
        return CheckpointError(
            f"The checkpoint {path} has an unreadable {INFO_FILE} ({reason}); it is damaged. Move "
            f"it away or delete it to resume from an earlier checkpoint."
        )

    info = read_json(info_path, damaged)
    try:
        files, step = info["files"], int(info["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise damaged(e) from None
    problems = []
    for name, size in sorted(files.items()):
        f = path / name
        if not f.exists():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes instead of {size} (truncated or overwritten)")
    if problems:
        raise CheckpointError(
            f"The checkpoint {path} (step {step}) is damaged: {'; '.join(problems)}. It cannot "
            f"be loaded. Restore the files, or move the folder away to use an earlier "
            f"checkpoint."
        )
    return info


def _flat_config(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in d.items() if isinstance(values, dict) for k, v in values.items()}


def find_resume(plan: RunPlan) -> Path | None:
    """The checkpoint this run resumes from (the latest complete one), checked against the run; or None.

    Called before the run writes anything, so a mismatch stops the run with every file as it was.
    """
    root = plan.paths.checkpoints
    found = list_checkpoints(root)
    if not plan.config.checkpoint.enable:
        if found:
            warn_once(
                f"{root} has {len(found)} checkpoint(s) but checkpoint.enable is false: this run starts from "
                f"step 0 and neither reads nor changes them. Set checkpoint.enable=true to resume."
            )
        return None
    incomplete = sorted(p.name for p in root.glob("step-*.tmp")) if root.is_dir() else []
    if incomplete:
        _say(f"ignoring incomplete checkpoint(s) {', '.join(incomplete)} in {root} (a save that did not finish).")
    if not found:
        return None
    path = found[-1][1]
    info = read_info(path)
    check_layout(path, info, layout_of(plan), plan.config.optimizer.state_dtype)
    check_config(path, info, plan.config_record, plan.recipe)
    return path


def layout_of(plan: RunPlan) -> dict[str, int]:
    """How a run cuts its model into parts: the FSDP2 and tensor-parallel degrees (replicas hold the same parts)."""
    return {"dp_shard": plan.parallel.dp_shard, "tp": plan.parallel.tp}


def check_layout(path: Path, info: dict[str, Any], layout: dict[str, int], state_dtype: str) -> None:
    """A checkpoint resumes on any layout (DCP reshards every tensor by its global position), except quantized
    moments: their blocks and scales are cut from each rank's part of a parameter (optim/sharding.py), so they mean
    their values only on the layout that wrote them. Refused there (CheckpointError), instead of read wrong."""
    theirs = info.get("layout")
    if state_dtype not in quant.STORAGES or theirs is None or theirs == layout:
        return
    raise CheckpointError(
        f"The checkpoint {path} (step {info['step']}) holds {state_dtype} Adam moments in blocks of each rank's part "
        f"of the parameters, cut by parallelism.dp_shard = {theirs['dp_shard']} and tp = {theirs['tp']}; this run "
        f"cuts them by dp_shard = {layout['dp_shard']} and tp = {layout['tp']}, so the blocks' scales would not "
        f"match their codes. Resume it with dp_shard={theirs['dp_shard']} and tp={theirs['tp']} (any dp_replicate), "
        f"or start a new run from its weights (`leantrain export` it and set model.hf_checkpoint). The other "
        f"recipes resume on any layout."
    )


def check_config(path: Path, info: dict[str, Any], record: dict[str, Any], recipe: str | None) -> None:
    """Raise CheckpointError if the run that wrote the checkpoint differs from this one (its config as plain
    values, ``record``, and its ``recipe``) in what it *is*."""
    saved = _flat_config(info.get("config", {}))
    ours = _flat_config(json.loads(json.dumps(record)))
    differ, notes = [], []
    for key in sorted(set(saved) & set(ours)):  # keys added or removed by a newer version are not compared
        if saved[key] == ours[key]:
            continue
        line = f"{key} is {saved[key]!r} in the checkpoint and {ours[key]!r} now"
        (notes if key.startswith(MAY_CHANGE) else differ).append(line)
    if differ:
        theirs = info.get("recipe")
        recipes = (
            f" The checkpoint was written by recipe {theirs or 'custom'}, this run is recipe {recipe or 'custom'}."
            if theirs != recipe
            else ""
        )
        raise CheckpointError(
            f"The checkpoint {path} (step {info['step']}) belongs to another run: {'; '.join(differ)}.{recipes} "
            f"A run resumes only from its own checkpoints: use the same settings, or another job.dump_folder to "
            f"start a new run (to start from its weights, `leantrain export` it and set model.hf_checkpoint)."
        )
    _check_moment_codes(path, info, ours.get("optimizer.state_dtype"))
    if notes:
        _say(f"resuming with changed settings: {'; '.join(notes)}.")


def _check_moment_codes(path: Path, info: dict[str, Any], state_dtype: str | None) -> None:
    """int8/int4/int4-int8 moments are codes of a map (optim/quant.py): a checkpoint whose codes mean other values (the
    dynamic maps of leantrain before "companded-1"; int4 codes paired differently before "companded-2") would
    resume with wrong moments, so it is refused."""
    theirs = info.get("moment_codes", "dynamic")
    if state_dtype in quant.STORAGES and theirs not in quant.READS[state_dtype]:
        raise CheckpointError(
            f"The checkpoint {path} (step {info['step']}) stores its {state_dtype} Adam moments as codes of the "
            f"{theirs!r} maps, and this leantrain reads {state_dtype} moments only as codes of "
            f"{' or '.join(map(repr, quant.READS[state_dtype]))}, so its moments would be read wrong. Resume it "
            f"with the leantrain that wrote it, or start a new run from its weights (`leantrain export` it and set "
            f"model.hf_checkpoint)."
        )


# ---- save and load during training -----------------------------------------------------------------


class Checkpointer:
    """Saves and loads one run's :class:`TrainState`; see the module docstring for what and how."""

    def __init__(
        self,
        root: Path,
        settings: Checkpoint,
        last_step: int,
        record: dict[str, Any],
        recipe: str | None,
        hooks: Hooks = Hooks(),
        layout: dict[str, int] | None = None,
    ):
        """``root``: the run's checkpoints folder; ``settings``: the checkpoint.* keys; ``last_step``:
        training.steps (always saved); ``record`` and ``recipe``: the run's config and recipe, and ``layout``
        (the parts the model is cut into: dp_shard and tp), written into each checkpoint's leantrain.json for a
        resume to compare."""
        self.root, self.settings, self.last_step = root, settings, last_step
        self.record, self.recipe, self.hooks = record, recipe, hooks
        self.layout = layout or {"dp_shard": 1, "tp": 1}

    # -- save

    def save_if_due(self, state: TrainState, elapsed_s: float = 0.0, force: bool = False) -> Path | None:
        """Save after the state's step when it is a multiple of checkpoint.interval or the last step, or with
        ``force`` (a stop signal) whatever the step; only with checkpoint.enable. Returns the checkpoint."""
        step = state.step
        if self.settings.enable and (force or step % self.settings.interval == 0 or step == self.last_step):
            return self.save(state, elapsed_s)
        return None

    def latest(self) -> Path | None:
        """The run's latest complete checkpoint, if any."""
        found = list_checkpoints(self.root)
        return found[-1][1] if found else None

    def save(self, state: TrainState, elapsed_s: float = 0.0) -> Path:
        """The full training state as checkpoint step-N (after checking that the weights are finite)."""
        self._refuse_nonfinite(state)
        saved = self._write(self.root / f"step-{state.step}", state.state_dict(), state, elapsed_s, model_only=False)
        if distributed.is_main():
            self._prune()
        return saved

    def save_final_model(self, folder: Path, state: TrainState) -> Path:
        """The weights alone, as ``folder``/model (what export, eval and generate read when a run kept no
        checkpoint); atomic like a checkpoint."""
        self._refuse_nonfinite(state)
        return self._write(
            folder / FINAL_MODEL, {"model": get_model_state_dict(state.model)}, state, elapsed_s=0.0, model_only=True
        )

    def _refuse_nonfinite(self, state: TrainState) -> None:
        if not guard.all_finite(state.model.parameters()):
            latest = self.latest()
            raise TrainingDiverged(
                f"The weights hold NaN/Inf after step {state.step}, so nothing is saved from "
                f"them; training diverged. The latest complete checkpoint is "
                f"{latest or 'none'}. Lower optimizer.lr or raise lr_scheduler.warmup_steps "
                f"(and use a new job.dump_folder, or the same settings resume into the same "
                f"divergence)."
            )

    def _write(self, final: Path, sd: dict[str, Any], state: TrainState, elapsed_s: float, model_only: bool) -> Path:
        """:meth:`_write_atomically`; a failed write (disk full, permissions) leaves no .tmp folder behind and
        stops the run with a StorageError (exit 2), every earlier checkpoint complete."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        if final.exists():
            raise CheckpointError(
                f"A checkpoint {final} already exists; leantrain never overwrites one. Move it "
                f"away, or use another job.dump_folder."
            )
        tmp = final.with_name(final.name + ".tmp")
        try:
            return self._write_atomically(final, tmp, sd, state, elapsed_s, model_only)
        except (OSError, CheckpointException) as e:
            if isinstance(e, CheckpointException) and e.failures:  # {rank: (exception, traceback)}
                e = next(iter(e.failures.values()))[0]
            if distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise storage_error(f"the checkpoint {final}", tmp, e) from None

    def _write_atomically(
        self, final: Path, tmp: Path, sd: dict[str, Any], state: TrainState, elapsed_s: float, model_only: bool
    ) -> Path:
        """DCP's files into final.tmp, then leantrain.json (written last: it lists the files and their sizes),
        then the rename that makes it complete; every rank writes its shards."""
        began, step = time.perf_counter(), state.step
        if distributed.is_main():
            if tmp.exists():
                shutil.rmtree(tmp)  # an earlier save of this step that did not finish
            tmp.mkdir(parents=True)
        distributed.barrier()
        with _quiet_dcp():
            dcp.save(sd, checkpoint_id=str(tmp))
        self.hooks.checkpoint_written(step)  # the data is written; leantrain.json and the rename are not
        if distributed.is_main():
            files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
            info = {
                "step": step,
                "elapsed_s": elapsed_s,
                "recipe": self.recipe,
                "model_only": model_only,
                "world_size": distributed.world_size(),
                "layout": self.layout,
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "torch_version": torch.__version__,
                "model_args": dataclasses.asdict(state.model.args),
                "config": self.record,
                "moment_codes": quant.CODES,
                "files": files,
            }
            with open(tmp / INFO_FILE, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            size = sum(files.values())
            _say(
                f"saved {'the final weights' if model_only else 'checkpoint'} {final} ({size / 2**20:.1f} MiB in "
                f"{time.perf_counter() - began:.1f}s)"
            )
        distributed.barrier()
        return final

    def _prune(self) -> None:
        k = self.settings.keep_latest_k
        if k:
            for _, old in list_checkpoints(self.root)[:-k]:
                shutil.rmtree(old)

    # -- load

    def load(self, state: TrainState, path: str | Path) -> float:
        """Load ``path`` into the training state; returns the run's elapsed seconds at that step.

        What DCP does for a Stateful (state_dict, load in place, load_state_dict), step by step, so that
        leantrain's checks run between: the stored tensors are compared with the state's before DCP reads any."""
        path = Path(path)
        info = read_info(path)
        _check_model_args(path, info, state.model.args)
        sd = state.state_dict()
        if "cuda" in sd["rng"] and not _has_key(path, "rng.cuda"):
            del sd["rng"]["cuda"]
        # Checkpoints written before the optimizer's random bits became a hash (optim/randbits.py) also hold its
        # old generator's state (optimizer.rng_state, or in param group 0): a key this state does not ask for,
        # which the load leaves unread.
        _check_tensors(path, _flatten(sd), info)
        _dcp_load(sd, path)
        try:
            state.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"The checkpoint {path} has training state this run cannot take ({e}); it was "
                f"written by another model, optimizer layout or recipe."
            ) from None
        _say(f"resuming from checkpoint {path} at step {state.step}")
        return float(info.get("elapsed_s", 0.0))


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
    known = {
        f"{f.name}.{g.name}"
        for f in dataclasses.fields(Config)
        if f.name != "recipe"
        for g in dataclasses.fields(getattr(Config(), f.name))
    }
    values: dict[str, Any] = {k: v for k, v in _flat_config(info.get("config", {})).items() if k in known}
    recipe = info.get("config", {}).get("recipe")
    if recipe:
        values["recipe"] = recipe
    return load_config(None, {**values, **(overrides or {})}, warn=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """The model of a checkpoint, in the storage dtype it was trained in, and the checkpoint's info."""
    path = resolve(path)
    info = read_info(path)
    try:
        args = ModelArgs(**info["model_args"])
        dtype = DTYPES[info["config"]["training"]["dtype"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"The checkpoint {path} has no usable model_args or training.dtype in {INFO_FILE} ({e})."
        ) from None
    model = build_model_from_args(args, dtype, device, seed=None)
    state = {"model": model.state_dict()}
    _check_tensors(path, _flatten(state), info)
    _dcp_load(state, path)
    info["path"] = str(path)
    return model, info
