"""The trainer: :func:`build_run` assembles everything from the run plan, :func:`train` loops over
``train_step``, guard, log, eval and checkpoint, and writes the summary."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, guard, parallel
from .config import LRScheduler, to_toml, warn_once
from .data import build_datasets, build_tokenizer
from .data.tokenizer import Tokenizer
from .errors import ConfigError, storage_error
from .evaluation import evaluate
from .hf import load_hf_weights
from .hooks import Hooks
from .metrics import (
    MetricsLogger,
    Progress,
    peak_memory_bytes,
    plot_losses,
    state_bytes,
    summarize,
    tensorboard_available,
    write_json,
)
from .loader import build_model_for, model_name
from .model import Transformer, num_params
from .optim import LeanOptimizer, build_optimizer
from .optim.layout import rounds_moments_stochastically
from .optim.release import GradientRelease
from .plan import planned_state_bytes
from .runplan import OptimizerSpec, RunPlan, compile_off_warning
from .state import TrainState
from .step import StepContext, StepStats, train_step

# Share of bf16 weight elements whose update was rounded away above which plain bf16 warns.
LOST_UPDATE_WARN_FRACTION = 0.1


# ---- building blocks ------------------------------------------------------------------------------------


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRScheduler, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine / linear decay to min_lr_factor * peak at the last step."""
    s = schedule

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "none":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, steps - s.warmup_steps - 1))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
        return s.min_lr_factor + (1 - s.min_lr_factor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer_for(model: torch.nn.Module, spec: OptimizerSpec) -> LeanOptimizer:
    return build_optimizer(model, **spec.build_kwargs())


RUN_FILES = ("metrics.jsonl", "summary.json", "config.toml")  # a folder holding any of these holds a run


def check_run_folder(plan: RunPlan, resume_from: Path | None) -> None:
    """Refuse (exit 2, nothing written) a train that would mix two runs in one folder or rewrite a finished one.

    With checkpoints, an earlier run of the same settings resumes (find_resume has checked them); a checkpoint
    at or past training.steps means there is nothing left to train. Without checkpoints nothing can resume, so
    a folder that already holds a run's files belongs to that run."""
    folder, steps = plan.paths.folder, plan.config.training.steps
    if resume_from is not None:
        done = int(checkpoint.read_info(resume_from)["step"])
        if done >= steps:
            raise ConfigError(
                f"job.dump_folder '{folder}' holds a run that has trained {done} steps (checkpoint "
                f"{resume_from}), and training.steps = {steps}: there is nothing left to train, and "
                f"a finished run is not rewritten. To train it further, raise training.steps (it "
                f"resumes from step {done}); to use the model, `leantrain export` / `eval` / "
                f"`generate --checkpoint {folder}`; for a new run, choose another job.dump_folder."
            )
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    checkpoints = plan.config.checkpoint.enable and not (folder / "summary.json").exists()
    if found and not checkpoints:  # (checkpoints on and no summary: an attempt stopped before its first save)
        raise ConfigError(
            f"job.dump_folder '{folder}' already holds a run ({', '.join(found)}), which this run "
            f"would mix with its own. Without a checkpoint in it there is nothing to resume: choose "
            f"another job.dump_folder (or delete that folder). Runs with checkpoint.enable=true "
            f"resume from their latest checkpoint when started again on their folder."
        )


def _write_config(path: Path, cfg: Any) -> None:
    try:
        path.write_text(to_toml(cfg), encoding="utf-8")
    except OSError as e:
        raise storage_error("config.toml", path, e) from None


def prepare_run_folder(folder: Path) -> None:
    """Create the run folder and check that it can be written; nothing is written in it yet."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"job.dump_folder '{folder}' cannot be written ({e.strerror}). Choose a folder you can "
            f"write to with --job.dump_folder=PATH."
        ) from None


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A built run: the plan it follows and every object the loop uses."""

    plan: RunPlan
    dist: parallel.Distributed
    state: TrainState
    eval_data: Any
    checkpointer: checkpoint.Checkpointer
    logger: MetricsLogger
    ctx: StepContext
    started: float  # perf_counter of the run's start (a resumed run's: earlier, by the elapsed time it had)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def build_state(
    plan: RunPlan, dist: parallel.Distributed, train_data: Any, tokenizer: Tokenizer, hf_weights: bool = True
) -> TrainState:
    """Model (parallelized: activation checkpointing, compile, FSDP2 / DDP), optimizer, schedule and training
    data, at step 0. ``hf_weights=False``: the HF model's shapes only (a resume loads its own weights)."""
    cfg, device = plan.config, dist.device
    model = build_model_for(
        cfg.model,
        plan.precision.storage,
        cfg.data.seq_len,
        cfg.job.seed,
        tokenizer,
        cfg.tokenizer.path,
        "meta" if dist.plan.distributed_model else device,
        hf_weights=hf_weights and not dist.plan.distributed_model,
    )
    parallel.check_tensor_parallel(model.args, dist.plan.tp, cfg.data.seq_len)
    parallel.parallelize(model, dist, plan.precision, cfg.activation_checkpoint.mode, plan.compile)
    if dist.plan.distributed_model:  # FSDP2 / TP: shapes only until now; each rank fills only its own parts
        parallel.materialize(model, device, cfg.job.seed)
        if cfg.model.hf_checkpoint and hf_weights:
            load_hf_weights(model, cfg.model.hf_checkpoint)
    optimizer = build_optimizer_for(model, plan.optimizer)
    return TrainState(model, optimizer, build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.training.steps), train_data)


def build_checkpointer(plan: RunPlan, hooks: Hooks = Hooks()) -> checkpoint.Checkpointer:
    cfg = plan.config
    return checkpoint.Checkpointer(
        plan.paths.checkpoints,
        cfg.checkpoint,
        cfg.training.steps,
        plan.config_record,
        plan.recipe,
        hooks,
        checkpoint.layout_of(plan),
    )


def build_run(plan: RunPlan, hooks: Hooks = Hooks()) -> Run:
    """Everything the loop needs, in the order that keeps bad input harmless: every input is loaded and checked
    (data, model, the checkpoint to resume from) before the first file of the run is written."""
    dist = parallel.init_distributed(plan.parallel)  # torchrun's ranks (or one process), the mesh
    plan = dataclasses.replace(plan, paths=parallel.same_on_all_ranks(plan.paths, dist))  # rank 0's clock names it
    cfg, device = plan.config, dist.device
    torch.manual_seed(cfg.job.seed)
    resume_from = checkpoint.find_resume(plan)  # checked against this run before any file is written
    check_run_folder(plan, resume_from)
    # Every rank has looked at the folder before rank 0 writes into it: a rank that lagged (a loaded machine) would
    # otherwise find rank 0's config.toml there and refuse the folder as another run's.
    parallel.barrier(dist)
    if cfg.metrics.tensorboard and not tensorboard_available():
        raise ConfigError(
            "metrics.tensorboard=true needs the tensorboard package, which is not installed: pip "
            "install 'leantrain[tensorboard]' (or tensorboard), or leave metrics.tensorboard false."
        )
    message = compile_off_warning(cfg.compile.enable, device)
    if message:
        warn_once(message)
    if dist.is_main:
        prepare_run_folder(plan.paths.folder)
    tokenizer = build_tokenizer(cfg.tokenizer.path)
    train_data, eval_data = build_datasets(
        cfg.data,
        tokenizer,
        cfg.job.seed,
        rank=dist.plan.dp_rank,
        world_size=dist.dp_size,
        tokenizer_path=cfg.tokenizer.path,
    )  # each data-parallel rank: its slice of a global batch (a tensor-parallel group shares one)
    state = build_state(plan, dist, train_data, tokenizer, hf_weights=resume_from is None)
    if plan.optimizer.in_backward:
        state.release = GradientRelease(state.optimizer, cfg.training.max_norm, cfg.training.release_clipping)
    model, checkpointer = state.model, build_checkpointer(plan, hooks)
    resumed_elapsed = checkpointer.load(state, resume_from) if resume_from else 0.0
    if dist.is_main:
        print(
            f"leantrain: training {model_name(cfg.model, model)} "
            f"({num_params(model) / 1e6:.1f}M parameters), recipe {plan.recipe or 'custom'}, on "
            f"{dist.world_size} x {device.type}, {train_data.num_tokens:,} training tokens; writing "
            f"{plan.paths.folder}",
            flush=True,
        )
        if state.release is not None and cfg.training.max_norm > 0:
            print(
                f"leantrain: gradient release clips by training.release_clipping={cfg.training.release_clipping} "
                f"(max_norm {cfg.training.max_norm}; the logged grad_norm is the step's unclipped norm)",
                flush=True,
            )
        _write_config(plan.paths.folder / "config.toml", cfg)  # once every input has loaded
    logger = MetricsLogger(
        str(plan.paths.folder),
        enabled=dist.is_main,
        resume_step=state.step if cfg.checkpoint.enable else None,
        tensorboard=cfg.metrics.tensorboard,
    )
    nonfinite = guard.NonFiniteGuard(cfg.training.max_nonfinite_steps, dist.world_size, logger.records)
    ctx = StepContext(
        plan.precision,
        dist,
        cfg.training.max_norm,
        weigh_tokens=cfg.data.format != "text",
        nonfinite=nonfinite,
        hooks=hooks,
        release=state.release,
    )
    return Run(
        plan, dist, state, eval_data, checkpointer, logger, ctx, started=time.perf_counter() - resumed_elapsed
    )  # a resumed run continues the interrupted clock


def train(plan: RunPlan, hooks: Hooks = Hooks()) -> tuple[dict[str, Any] | None, Transformer]:
    """Train as planned; returns summary.json's contents (None when a stop signal ended the run early, see
    leantrain.guard) and the trained model. Raises TrainingDiverged after too many NaN/Inf steps in a row."""
    run = build_run(plan, hooks)
    cfg, state, dist = run.plan.config, run.state, run.dist
    progress = Progress(cfg.training.steps, cfg.metrics.progress and dist.is_main, initial=state.step)
    try:
        measured_state, stopped_at = _loop(run, progress)
    finally:  # the bar gives the terminal back, metrics.jsonl is closed, whatever ended the loop
        progress.close()
        run.logger.close()
    steps = cfg.training.steps
    if run.ctx.nonfinite.diverged:  # exit code 3
        run.ctx.nonfinite.raise_diverged(
            run.checkpointer.latest() if cfg.checkpoint.enable else None,
            cfg.checkpoint.enable,
            guard.all_finite(state.model.parameters()),
        )
    weights = stopped_at[1] if stopped_at else run.checkpointer.latest() if cfg.checkpoint.enable else None
    if weights is None:  # no checkpoint holds the final weights: keep them on their own
        weights = run.checkpointer.save_final_model(run.plan.paths.folder, state)
    if stopped_at is not None and stopped_at[0] < steps:
        _say_stopped(stopped_at[0], weights, run)
        parallel.shutdown(dist)
        return None, state.model
    summary = _summary(run, measured_state or state_bytes(state.model, state.optimizer), weights)
    parallel.shutdown(dist)
    return summary, state.model


def _loop(run: Run, progress: Progress) -> tuple[dict[str, int] | None, tuple[int, Path | None] | None]:
    """Step, guard, checkpoint, log and eval until training.steps, a stop signal or divergence. Returns the state
    bytes measured after the first update and, if a stop signal ended it, (step, checkpoint saved or None)."""
    cfg, state, dist = run.plan.config, run.state, run.dist
    steps, accum = cfg.training.steps, cfg.training.gradient_accumulation_steps
    measured_state, stopped_at, last_log = None, None, _clock(state.step)
    if run.plan.compile:
        progress.note("compiling")  # the first steps compile; the bar shows for how long once they have
    while state.step < steps and stopped_at is None and not run.ctx.nonfinite.diverged:
        batches = [[t.to(dist.device, non_blocking=True) for t in state.data.next_batch()] for _ in range(accum)]
        batches = run.ctx.hooks.batches(state.step + 1, batches)
        stats = train_step(state, batches, run.ctx, count_lost_updates=_log_due(state.step + 1, cfg))
        progress.advance(state.step)
        if measured_state is None and stats.finite:  # after the first update every state buffer exists
            measured_state = state_bytes(state.model, state.optimizer)
        saved = run.checkpointer.save_if_due(state, run.elapsed, force=stats.stop)
        if stats.stop:  # SIGTERM/SIGINT: this step is done and saved (checkpoint.enable); the loop ends after it
            stopped_at = (state.step, saved)
        eval_now = state.step == steps or (cfg.eval.interval and state.step % cfg.eval.interval == 0)
        if eval_now or not stats.finite or _log_due(state.step, cfg):
            record = _record(run, stats, last_log, eval_now)
            run.logger.log(run.ctx.nonfinite.annotate(record))
            progress.show(record)
            last_log = _clock(state.step)
    return measured_state, stopped_at


def _log_due(step: int, cfg: Any) -> bool:
    return step == 1 or step % cfg.metrics.log_freq == 0 or step == cfg.training.steps


def _clock(step: int) -> tuple[int, float, float]:
    """(step, wall time, seconds spent compiling so far): where a logging interval starts."""
    return step, time.perf_counter(), parallel.compile_seconds()


def _record(run: Run, stats: StepStats, last_log: tuple[int, float, float], eval_now: bool) -> dict[str, Any]:
    """The metrics.jsonl line of a step (the loss averaged over ranks: one collective, on logged steps only).
    tokens/s leaves out the time spent compiling in the interval; a compiled run logs compile_s, the seconds spent
    compiling so far."""
    (last_step, last_time, last_compile), (_, now, compiled) = last_log, _clock(stats.step)
    loss = parallel.mean_over_ranks(stats.loss, run.dist)  # each rank's loss on its part of the global batch
    record = {
        "step": stats.step,
        "loss": loss.item(),
        "lr": stats.lr,
        "grad_norm": stats.grad_norm.item(),
        "tokens_per_sec": (stats.step - last_step) * stats.tokens / (now - last_time - (compiled - last_compile)),
        "elapsed_s": now - run.started,
        "peak_memory_bytes": peak_memory_bytes(run.dist.device),
    }
    if run.plan.compile:
        record["compile_s"] = compiled
    if stats.updates is not None and stats.updates.tracked_elements:  # bf16 weights only: fp32 ones lose nothing
        record[unchanged_update_key(run.plan.optimizer)] = float(stats.updates.lost_update_fraction)
        if stats.updates.compensated_fraction is not None:
            record["compensated_fraction"] = float(stats.updates.compensated_fraction)
    if stats.updates is not None:
        for name in ("exp_avg", "exp_avg_sq"):  # the low-precision moments' share of stale writes (optim.UpdateStats)
            fraction = getattr(stats.updates, f"{name}_lost_fraction")
            if fraction is not None:
                record[moment_update_key(run.plan.optimizer, name)] = float(fraction)
    if eval_now:
        batches = run.eval_data.eval_batches(run.plan.config.eval.steps)
        record["eval_loss"] = evaluate(
            run.state.model, batches, run.plan.precision, run.dist.device, run.dist.sharded
        ).loss
    _warn_if_updates_lost(run.plan.optimizer, record)
    return record


def _summary(run: Run, measured_state: dict[str, int], weights: Path) -> dict[str, Any]:
    """summary.json (key order of the README's 'Training' section, then the planner's prediction beside the
    measurement), loss.png and the closing line, written by rank 0."""
    plan, model = run.plan, run.state.model
    summary = summarize(
        run.logger.records,
        recipe=plan.recipe,
        num_params=num_params(model),
        steps=plan.config.training.steps,
        peak_memory_bytes=peak_memory_bytes(run.dist.device),
        state_bytes=measured_state,
        state_bytes_per_param=sum(measured_state.values()) / parallel.local_numel(model),
        planned_state_bytes=planned_state_bytes(
            model, plan.precision, plan.optimizer, run.dist.plan.dp_shard, run.dist.plan.tp
        ),
    )
    summary = {
        k: summary[k]
        for k in (
            "recipe",
            "num_params",
            "steps",
            "final_loss",
            "final_eval_loss",
            "tokens_per_sec",
            "peak_memory_bytes",
            "state_bytes",
            "state_bytes_per_param",
            "planned_state_bytes",
        )
    }
    summary["skipped_nonfinite_steps"] = run.ctx.nonfinite.total  # steps whose NaN/Inf loss or norm was skipped
    summary["small_updates"] = (
        SMALL_UPDATES[plan.optimizer.config.compensation]
        if plan.precision.storage == torch.bfloat16
        else "applied: fp32 weights take every update"
    )
    if run.dist.world_size > 1:  # state_bytes are then rank 0's own (its shards); bytes/param per local parameter
        summary["world_size"] = run.dist.world_size
    if run.dist.is_main:
        folder = plan.paths.folder
        write_json(os.path.join(folder, "summary.json"), summary)
        plot_losses(
            {plan.recipe or "run": run.logger.records},
            os.path.join(folder, "loss.png"),
            title=f"{model_name(plan.config.model, run.state.model)}, recipe {plan.recipe or 'custom'}",
        )
        print(
            f"leantrain: done. final loss {summary['final_loss']:.4f}, eval loss "
            f"{summary['final_eval_loss']:.4f}, {summary['state_bytes_per_param']:.2f} bytes/param of training "
            f"state. Files in {folder}; the final weights in {weights} (`leantrain export|eval|generate "
            f"--checkpoint {folder}`)",
            flush=True,
        )
    return summary


def _say_stopped(step: int, weights: Path, run: Run) -> None:
    if not run.dist.is_main:
        return
    signal_name = guard.signal_name(guard.stop_requested())
    folder = run.plan.paths.folder
    if not run.plan.config.checkpoint.enable:
        where = (
            f"checkpoint.enable is false, so the run cannot resume (set checkpoint.enable=true to make runs "
            f"resumable); its weights are kept in {weights}."
        )
    elif run.plan.paths.named:
        where = f"saved checkpoint {weights}. Run the same command again to resume from it."
    else:  # the same command would pick a new runs/<timestamp> folder
        where = f"saved checkpoint {weights}. To resume from it, run the same command with --job.dump_folder={folder}."
    print(
        f"leantrain: stopped by {signal_name} after step {step} of {run.plan.config.training.steps}; {where}",
        flush=True,
    )


def unchanged_update_key(spec: OptimizerSpec) -> str:
    """What metrics.jsonl calls the share of bf16 weights whose nonzero update left them unchanged this step: lost
    under nearest rounding; under stochastic rounding (and Kahan's buffer) such an update is not lost, it is
    applied in expectation (or carried), so the name says only that the weight did not move."""
    return "lost_update_fraction" if spec.config.compensation == "none" else "unchanged_update_fraction"


def moment_update_key(spec: OptimizerSpec, name: str) -> str:
    """What metrics.jsonl calls the share of a low-precision moment's elements whose fp32 result changed while the
    stored bf16 value or int8 code did not: lost when rounded to nearest, unchanged (applied in expectation) when
    rounded stochastically, as for the weights."""
    stochastic = rounds_moments_stochastically(spec.config.compensation, spec.config.moments_rounding)
    return f"{name}_{'unchanged' if stochastic else 'lost'}_fraction"


SMALL_UPDATES = {  # summary.json's small_updates: what the recipe does with an update below half a bf16 ulp
    "none": "lost: nearest rounding gives the weight back unchanged (lost_update_fraction counts them)",
    "stochastic": "applied in expectation: stochastic rounding moves the weight one ulp with probability "
    "|update| / ulp (unchanged_update_fraction counts the steps it stayed)",
    "kahan": "carried: the Kahan buffer accumulates it until the weight moves (compensated_fraction counts them)",
}


def _warn_if_updates_lost(spec: OptimizerSpec, record: dict[str, Any]) -> None:
    lost = record.get("lost_update_fraction")
    if lost is None or spec.config.compensation != "none" or lost < LOST_UPDATE_WARN_FRACTION:
        return
    warn_once(
        f"At step {record['step']}, {lost:.0%} of the bfloat16 weights did not change although their update "
        f"was not zero: the update was smaller than half a bfloat16 step and nearest rounding threw it away. "
        f"Training is losing progress; optimizer.compensation=stochastic (recipe bf16-sr) or kahan "
        f"(bf16-kahan) keeps these updates.",
        key="lost-updates",
    )
