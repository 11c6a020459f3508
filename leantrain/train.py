"""The training loop, readable in one sitting: build everything from the config, then step."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from torch import nn

from . import checkpoint, guard, parallel, precision
from .config import Config, resolve_dump_folder, to_toml, warn_once
from .data import PackedDataset, build_datasets, build_tokenizer
from .data.datasets import IGNORE_INDEX
from .errors import ConfigError
from .metrics import MetricsLogger, Progress, peak_memory_bytes, plot_losses, state_bytes, summarize, write_json
from .model import Transformer, build_model, num_params
from .optim import build_optimizer
from .plan import planned_state_bytes

# Share of bf16 weight elements whose update was rounded away above which plain bf16 warns.
LOST_UPDATE_WARN_FRACTION = 0.1


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_model_from_config(cfg: Config, vocab_size: int, device: torch.device | str,
                            hf_weights: bool = True) -> Transformer:
    """The configured flavor and overrides, in the run's storage dtype, sized to the tokenizer for debug/small.
    With model.hf_checkpoint: the HF folder's model (its weights unless hf_weights=False, e.g. when resuming)."""
    m = cfg.model
    dims = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                                      "rope_theta", "norm_eps")}
    if m.hf_checkpoint:
        return _hf_model(cfg, dims, vocab_size, device, hf_weights)
    if not dims["vocab_size"] and m.flavor in ("debug", "small"):
        dims["vocab_size"] = vocab_size
    try:
        model = build_model(m.flavor, precision.storage_dtype(cfg), device, seed=cfg.job.seed,
                            max_seq_len=cfg.data.seq_len, **dims)
    except ValueError as e:
        raise ConfigError(f"The model dimensions are inconsistent: {e}. Fix the model.* keys.") from None
    _check_vocab(cfg, model, vocab_size)
    return model


def _hf_model(cfg: Config, dims: dict[str, Any], vocab_size: int, device: torch.device | str,
              weights: bool) -> Transformer:
    from .hf import load_hf

    model = load_hf(cfg.model.hf_checkpoint, precision.storage_dtype(cfg), device, max_seq_len=cfg.data.seq_len,
                    weights=weights)
    for key, value in dims.items():
        if value and getattr(model.args, key) != value:
            raise ConfigError(f"model.{key} = {value!r}, but the model in model.hf_checkpoint="
                              f"'{cfg.model.hf_checkpoint}' has {key} = {getattr(model.args, key)!r} (from its "
                              f"config.json). Leave model.{key} unset when loading a Hugging Face model.")
    _check_vocab(cfg, model, vocab_size)
    return model


def _check_vocab(cfg: Config, model: Transformer, vocab_size: int) -> None:
    if model.args.vocab_size < vocab_size:
        raise ConfigError(f"The tokenizer '{cfg.tokenizer.path}' has {vocab_size} tokens but the model's "
                          f"vocabulary (model.vocab_size) has only {model.args.vocab_size}. Set model.vocab_size "
                          f"to at least {vocab_size}, or use a smaller tokenizer.")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine / linear decay to min_lr_factor * peak at the last step."""
    s, steps = cfg.lr_scheduler, cfg.training.steps

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "none":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, steps - s.warmup_steps - 1))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
        return s.min_lr_factor + (1 - s.min_lr_factor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_run_folder(cfg: Config) -> str:
    """Create job.dump_folder and check that it can be written; nothing is written in it yet."""
    folder = resolve_dump_folder(cfg)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"job.dump_folder '{folder}' cannot be written ({e.strerror}). Choose a folder you can "
                          f"write to with --job.dump_folder=PATH.") from None
    return folder


def write_run_config(folder: str, cfg: Config) -> None:
    """config.toml, once every input has loaded: a run stopped by bad input leaves the folder as it was."""
    with open(os.path.join(folder, "config.toml"), "w", encoding="utf-8") as f:
        f.write(to_toml(cfg))


@torch.no_grad()
def evaluate(model: nn.Module, data: PackedDataset, cfg: Config, device: torch.device,
             sharded: bool = False) -> float:
    """Mean loss over the first eval.steps batches of the held-out split (the same batches every time, on
    every rank). ``sharded``: the model is under FSDP2."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for inputs, labels in data.eval_batches(cfg.eval.steps):
        with precision.autocast(cfg, device, sharded):
            logits = model(inputs.to(device))
        total += precision.cross_entropy(logits, labels.to(device))
        count += 1
    if sharded:
        parallel.reshard(model)
    model.train()
    return (total / count).item()


def token_weights(labels: list[torch.Tensor], dist: parallel.Distributed) -> list[torch.Tensor]:
    """Per micro-batch factors that turn the mean of its loss into its share of the global batch's token mean.

    The step's loss is the mean over every labelled token of the global batch (all micro-batches, all
    ranks), so a micro-batch's mean loss counts with weight n * accum * world_size / N (n its labelled tokens,
    N the global batch's), divided by accum below and averaged over ranks by DDP/FSDP. Packed data labels
    every token, so each weight would be exactly 1.0 there (the loop skips the call); SFT micro-batches differ
    in response tokens, and an unweighted mean would give a short response's tokens more say than a long one's.
    """
    counts = torch.stack([(x != IGNORE_INDEX).sum() for x in labels])
    total = parallel.sum_over_ranks(counts.sum(), dist)
    scale = len(labels) * dist.world_size
    return list(counts * scale / total)  # int64 / int64: fp32, and exactly 1.0 when the integers are equal


def train(cfg: Config) -> tuple[dict[str, Any] | None, Transformer]:
    """Train as configured; returns summary.json's contents (None when a stop signal ended the run early, see
    leantrain.guard) and the trained model. Raises TrainingDiverged after too many NaN/Inf steps in a row."""
    dist = parallel.init_distributed(cfg)  # torchrun's ranks (or one process), this rank's device, the mesh
    device = dist.device
    torch.manual_seed(cfg.job.seed)
    cfg.job.dump_folder = parallel.same_on_all_ranks(resolve_dump_folder(cfg), dist)
    resume_from = checkpoint.find_resume(cfg)  # checked against this config before any file is written
    folder = prepare_run_folder(cfg) if dist.is_main else cfg.job.dump_folder

    tokenizer = build_tokenizer(cfg.tokenizer.path)
    train_data, eval_data = build_datasets(cfg.data, tokenizer, cfg.job.seed, rank=dist.rank,
                                           world_size=dist.world_size)  # each rank: its slice of a global batch
    d = cfg.data
    model = build_model_from_config(cfg, tokenizer.vocab_size, "meta" if dist.sharded else device,
                                    hf_weights=resume_from is None)
    parallel.parallelize(model, cfg, dist)  # activation checkpointing, compile; FSDP2 / HSDP, or DDP
    if dist.sharded:  # FSDP2: shapes only until now; each rank allocates and initialises only its shards
        parallel.materialize(model, device, cfg.job.seed)
    params = list(model.parameters())
    o = cfg.optimizer
    optimizer = build_optimizer(model, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                state_dtype=o.state_dtype, compensation=o.compensation,
                                moments_rounding=o.moments_rounding, seed=cfg.job.seed,
                                compile=cfg.compile.enable)
    scheduler = build_lr_scheduler(optimizer, cfg)
    checkpointer = checkpoint.Checkpointer(cfg, model, optimizer, scheduler, train_data)
    start_step, resumed_elapsed = checkpointer.load(resume_from) if resume_from else (0, 0.0)
    recipe = precision.recipe_of(cfg)
    n_params = num_params(model)
    model_name = cfg.model.hf_checkpoint or cfg.model.flavor
    if dist.is_main:
        print(f"leantrain: training llama3 {model_name} ({n_params / 1e6:.1f}M parameters), recipe "
              f"{recipe or 'custom'}, on {dist.world_size} x {device.type}, {train_data.num_tokens:,} training "
              f"tokens; writing {folder}", flush=True)

    if dist.is_main:
        write_run_config(folder, cfg)
    logger = MetricsLogger(folder, enabled=dist.is_main, resume_step=start_step if cfg.checkpoint.enable else None)
    nonfinite = guard.NonFiniteGuard(cfg.training.max_nonfinite_steps, dist.world_size, logger.records)
    progress = Progress(cfg.training.steps, cfg.metrics.progress and dist.is_main)
    steps, accum = cfg.training.steps, cfg.training.gradient_accumulation_steps
    tokens_per_step = d.seq_len * d.local_batch_size * accum * dist.world_size  # the global batch
    start = last_log_time = time.perf_counter()
    start -= resumed_elapsed  # a resumed run continues the interrupted run's clock
    last_log_step, measured_state, stopped_at, stop_checkpoint = start_step, None, None, None
    for step in range(start_step + 1, steps + 1):
        if stopped_at is not None or nonfinite.diverged:  # a stop signal or too many NaN/Inf steps: stop here
            break
        loss_sum = torch.zeros((), device=device)
        batches = [[t.to(device, non_blocking=True) for t in train_data.next_batch()] for _ in range(accum)]
        # Packed text labels every token, so its weights are all exactly 1: no counting, no collective.
        weights = (token_weights([labels for _, labels in batches], dist) if cfg.data.format == "sft"
                   else [1.0] * accum)
        for (inputs, labels), weight in zip(batches, weights):
            with precision.autocast(cfg, device, dist.sharded):
                logits = model(inputs)
            loss = precision.cross_entropy(logits, labels) * weight / accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = precision.clip_grad_norm_(params, cfg.training.max_norm)
        finite, stop = nonfinite.check(step, loss_sum, grad_norm)  # one host sync; the same on every rank
        log_now = not finite or step == 1 or step % cfg.metrics.log_freq == 0 or step == steps
        optimizer.track_lost_updates = log_now
        lr = scheduler.get_last_lr()[0]
        if finite:  # a NaN/Inf step changes neither the weights nor the optimizer state
            optimizer.step()
        guard.advance_schedule(scheduler)  # skipped steps count too: the schedule follows the step number
        if measured_state is None and finite:  # after the first step every state buffer exists; it never grows
            measured_state = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        saved = checkpointer.save_if_due(step, elapsed_s=time.perf_counter() - start, force=stop)
        if stop:  # SIGTERM/SIGINT: this step is done and saved (checkpoint.enable); the loop ends after it
            stopped_at, stop_checkpoint = step, saved

        eval_now = step == steps or (cfg.eval.interval and step % cfg.eval.interval == 0)
        if not (log_now or eval_now):
            continue
        now = time.perf_counter()
        loss_sum = parallel.mean_over_ranks(loss_sum, dist)  # each rank's loss on its part of the global batch
        record = {"step": step, "loss": loss_sum.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_sec": (step - last_log_step) * tokens_per_step / (now - last_log_time),
                  "elapsed_s": now - start, "peak_memory_bytes": peak_memory_bytes(device)}
        stats = optimizer.last_update_stats if finite else {}  # a skipped step updated nothing
        if stats.get("tracked_elements"):  # bf16 weights only: fp32 weights lose nothing to rounding
            record["lost_update_fraction"] = float(stats["lost_update_fraction"])
            if cfg.optimizer.compensation == "kahan":
                record["compensated_fraction"] = float(stats["compensated_fraction"])
        if eval_now:
            record["eval_loss"] = evaluate(model, eval_data, cfg, device, dist.sharded)
        _warn_if_updates_lost(cfg, record)
        logger.log(nonfinite.annotate(record))
        progress.update(step, record)
        last_log_time, last_log_step = time.perf_counter(), step
    progress.close()
    logger.close()
    if nonfinite.diverged:  # exit code 3
        nonfinite.raise_diverged(checkpointer.latest() if cfg.checkpoint.enable else None, cfg.checkpoint.enable)
    if stopped_at is not None and stopped_at < steps:
        _say_stopped(stopped_at, stop_checkpoint, cfg, dist.is_main)
        parallel.shutdown(dist)
        return None, model
    if measured_state is None:  # resumed at or past training.steps: nothing was trained in this process
        measured_state = state_bytes(model, optimizer)

    summary = summarize(logger.records, recipe=recipe, num_params=n_params, steps=steps,
                        peak_memory_bytes=peak_memory_bytes(device), state_bytes=measured_state,
                        state_bytes_per_param=sum(measured_state.values()) / parallel.local_numel(model),
                        planned_state_bytes=planned_state_bytes(model, cfg, dist.dp_shard))
    # Key order of SPEC.md section 5, then the planner's prediction beside the measurement.
    summary = {k: summary[k] for k in ("recipe", "num_params", "steps", "final_loss", "final_eval_loss",
                                       "tokens_per_sec", "peak_memory_bytes", "state_bytes",
                                       "state_bytes_per_param", "planned_state_bytes")}
    summary["skipped_nonfinite_steps"] = nonfinite.total  # steps whose NaN/Inf loss or grad norm was skipped
    if dist.world_size > 1:  # state_bytes are then rank 0's own (its shards); bytes/param per local parameter
        summary["world_size"] = dist.world_size
    if dist.is_main:
        write_json(os.path.join(folder, "summary.json"), summary)
        plot_losses({recipe or "run": logger.records}, os.path.join(folder, "loss.png"),
                    title=f"llama3 {cfg.model.flavor}, recipe {recipe or 'custom'}")
        print(f"leantrain: done. final loss {summary['final_loss']:.4f}, eval loss "
              f"{summary['final_eval_loss']:.4f}, {summary['state_bytes_per_param']:.2f} bytes/param of training "
              f"state. Files in {folder}", flush=True)
    parallel.shutdown(dist)
    return summary, model


def _say_stopped(step: int, saved: Any, cfg: Config, is_main: bool) -> None:
    if not is_main:
        return
    signal_name = guard.signal_name(guard.stop_requested())
    if saved:
        where = f"saved checkpoint {saved}. Run the same command again to resume from it."
    else:
        where = ("checkpoint.enable is false, so nothing was saved and the run cannot resume (set "
                 "checkpoint.enable=true to make runs resumable).")
    print(f"leantrain: stopped by {signal_name} after step {step} of {cfg.training.steps}; {where}", flush=True)


def _warn_if_updates_lost(cfg: Config, record: dict[str, Any]) -> None:
    lost = record.get("lost_update_fraction")
    if lost is None or cfg.optimizer.compensation != "none" or lost < LOST_UPDATE_WARN_FRACTION:
        return
    warn_once(f"At step {record['step']}, {lost:.0%} of the bfloat16 weights did not change although their update "
              f"was not zero: the update was smaller than half a bfloat16 step and nearest rounding threw it away. "
              f"Training is losing progress; optimizer.compensation=stochastic (recipe bf16-sr) or kahan "
              f"(bf16-kahan) keeps these updates.", key="lost-updates")
