"""A validated config resolved once into the frozen values the layers below take: the run plan.

Every command calls :func:`resolve` once, at its top. It is the only place where the run folder, the
devices and the parallel degrees are decided; the trainer, the checkpointer, evaluation and the planner
take the values (``Precision``, ``ParallelPlan``, ``RunPaths``, ``OptimizerSpec``, the config's own frozen
sections), never the whole config, the way torchtitan's ``parallelize_llama`` takes the sections it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Mapping

import torch

from . import distributed
from .config import Config
from .config import Optimizer as OptimizerConfig
from .config import data_parallel_degrees, recipe_of, suspicious_precision_settings, to_dict, warn_once
from .errors import ConfigError
from .optim import HYPERPARAMETERS
from .precision import DTYPES, Precision


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes (job.dump_folder) and its checkpoints."""

    folder: Path
    checkpoints: Path
    named: bool  # job.dump_folder was given, so the same command finds this folder (and its checkpoints) again


@dataclass(frozen=True)
class ParallelPlan:
    """This process in the run: torchrun's rank and world, its device, and the mesh's degrees, named as torchtitan's
    ParallelDims names them: ``dp_replicate`` x ``dp_shard`` x ``tp`` ranks, tp innermost (the ranks of one
    tensor-parallel group are consecutive, e.g. the GPUs of one node)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dp_replicate: int
    dp_shard: int
    tp: int = 1

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each takes its own part of every global batch (a tensor-parallel group shares one)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel ranks (the same for every rank of a tensor-parallel group)."""
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files and prints (distributed.is_main() says the same where no plan is at hand:
        the signal handler, the checkpointer's messages, the command line's warnings)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP2 DTensors (dp_shard > 1)."""
        return self.dp_shard > 1

    @property
    def distributed_model(self) -> bool:
        """Parameters are DTensors (FSDP2 and / or tensor parallelism): the model is built on the meta device and
        each rank allocates and initialises only its own parts."""
        return self.dp_shard > 1 or self.tp > 1


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of the run: the config's optimizer section (its rule, hyperparameters, the recipe's state and
    rounding, gradient release), the job's seed (the random bits' key), and whether its update is compiled."""

    config: OptimizerConfig
    seed: int
    compile: bool

    @property
    def in_backward(self) -> bool:
        """Gradient release (optim/release.py)."""
        return self.config.in_backward

    def build_kwargs(self) -> dict:
        """The keywords of `optim.build_optimizer`: the rule's name and every hyperparameter, named as in the config."""
        return {
            "name": self.config.name,
            "seed": self.seed,
            "compile": self.compile,
            **{name: getattr(self.config, name) for name in HYPERPARAMETERS},
        }

    def with_release(self, in_backward: bool) -> OptimizerSpec:
        return dataclasses.replace(self, config=dataclasses.replace(self.config, in_backward=in_backward))


@dataclass(frozen=True)
class RunPlan:
    """Everything a command needs to know before it builds anything."""

    config: Config  # frozen; written to config.toml and compared with a checkpoint's
    recipe: str | None  # the recipe whose keys the config matches, None for a custom set
    precision: Precision
    parallel: ParallelPlan
    paths: RunPaths
    optimizer: OptimizerSpec
    compile: bool  # compile.enable decided for this device: the blocks and (OptimizerSpec.compile) the update

    @property
    def config_record(self) -> dict:
        """The config as plain values (what a checkpoint stores and a resume compares)."""
        return to_dict(self.config)


def precision_of(cfg: Config) -> Precision:
    """Storage, compute and reduce dtypes from training.dtype and the mixed-precision keys."""
    t = cfg.training
    storage = DTYPES[t.dtype]
    compute = torch.bfloat16 if t.dtype == "bfloat16" else DTYPES[t.mixed_precision_param]
    return Precision(storage=storage, compute=compute, reduce=DTYPES[t.mixed_precision_reduce])


def optimizer_spec(cfg: Config, compile: bool = False) -> OptimizerSpec:
    return OptimizerSpec(cfg.optimizer, seed=cfg.job.seed, compile=compile)


@functools.cache
def why_no_compiler(device_type: str) -> str | None:
    """Why torch.compile cannot generate code for this kind of device here (None: it can). Checked by looking for
    the toolchain inductor needs, not by compiling, so that deciding costs nothing."""
    import sysconfig

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sysconfig.get_python_version()})"
    if device_type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:  # inductor's own search raises its own error type when it finds no compiler
            return "no C++ compiler was found (inductor's CPU code needs one: install g++ or clang, or set CXX)"
        if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
            return "Python's C headers (Python.h) are missing (inductor's CPU code needs them: install python3-dev)"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor's GPU code needs it: pip install triton)"
    return f"leantrain compiles for CPUs and CUDA GPUs only, not for {device_type}"


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """compile.enable with auto decided: on where a compiler works for the device (train warns where it does not,
    :func:`compile_off_warning`)."""
    return bool(setting) if setting != "auto" else why_no_compiler(device.type) is None


def compile_off_warning(setting: bool | str, device: torch.device) -> str | None:
    """What a run that compile.enable=auto leaves uncompiled says, once; None where nothing is to be said."""
    reason = why_no_compiler(device.type) if setting == "auto" else None
    return reason and (
        f"compile.enable=auto: {reason}, so this run is not compiled and runs eagerly (slower; the "
        f"results are the same to rounding). Set compile.enable=false to say so and silence this."
    )


def run_paths(cfg: Config, now: datetime | None = None) -> RunPaths:
    """job.dump_folder, or runs/<timestamp> when it is empty (decided here and nowhere else)."""
    named = bool(cfg.job.dump_folder)
    folder = Path(cfg.job.dump_folder or f"runs/{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}")
    return RunPaths(folder=folder, checkpoints=folder / cfg.checkpoint.folder, named=named)


def parallel_plan(cfg: Config, env: Mapping[str, str] = os.environ) -> ParallelPlan:
    """torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE; one process without it), the degrees checked against
    the world size (ConfigError before any process group), and this rank's device."""
    rank, local_rank, world_size = distributed.launch(env)
    replicate, shard = data_parallel_degrees(cfg, world_size)
    if cfg.optimizer.in_backward and replicate > 1 and shard == 1:
        raise ConfigError(
            f"optimizer.in_backward=true cannot run under DDP (parallelism.dp_replicate = {replicate}, "
            f"dp_shard = 1): DDP averages the gradients after the hooks that would update with them "
            f"have run. Shard instead (parallelism.dp_shard={world_size}: FSDP2 reduces each "
            f"gradient before its update), or leave optimizer.in_backward at false."
        )
    tp = cfg.parallelism.tp
    if tp > 1 and replicate > 1 and shard == 1:
        raise ConfigError(
            f"parallelism.tp = {tp} with parallelism.dp_replicate = {replicate} and dp_shard = 1 (DDP): DDP does "
            f"not take tensor-parallel (DTensor) parameters. Use FSDP2 for the data-parallel ranks instead "
            f"(parallelism.dp_shard={replicate} parallelism.dp_replicate=1), or HSDP (dp_shard > 1)."
        )
    return ParallelPlan(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=distributed.default_device(local_rank),
        dp_replicate=replicate,
        dp_shard=shard,
        tp=tp,
    )


def check_hf_model(cfg: Config) -> None:
    """A Hugging Face folder's config.json describes a model leantrain can represent (CheckpointError, exit 2,
    naming what is not supported); checked before anything else reads the folder."""
    if cfg.model.hf_checkpoint:
        from .hf import model_args_from_hf, read_config

        model_args_from_hf(
            read_config(cfg.model.hf_checkpoint),
            max_seq_len=cfg.data.seq_len,
            where=f"{cfg.model.hf_checkpoint}/config.json",
        )


def tokenizer_path(cfg: Config) -> str:
    """tokenizer.path with 'auto' decided: the HF folder's own tokenizer.json for an HF model (training its
    weights on byte ids would ruin them without a word), the byte tokenizer otherwise."""
    path, hf = cfg.tokenizer.path, cfg.model.hf_checkpoint
    if path != "auto":
        return path
    if not hf:
        return "byte"
    if not (Path(hf).expanduser() / "tokenizer.json").exists():
        raise ConfigError(
            f"model.hf_checkpoint='{hf}' has no tokenizer.json, so the model's tokenizer is unknown "
            f"(tokenizer.path=auto takes the HF folder's). Set tokenizer.path to the model's "
            f"tokenizer: 'byte' (256 byte ids plus BOS, EOS, PAD: what leantrain trains with by "
            f"default) or the path of its tokenizer.json; or copy the tokenizer.json into that folder."
        )
    return str(Path(hf).expanduser() / "tokenizer.json")


def resolve(cfg: Config, env: Mapping[str, str] = os.environ) -> RunPlan:
    """The run plan of a validated config; warns about precision settings that only the world size reveals.
    The plan's config has tokenizer.path decided (what config.toml and a checkpoint record)."""
    check_hf_model(cfg)
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=tokenizer_path(cfg)))
    parallel = parallel_plan(cfg, env)
    for message in suspicious_precision_settings(cfg, dp_shard=parallel.dp_shard):  # validate() did not know it
        warn_once(message)
    compile = compile_enabled(cfg.compile.enable, parallel.device)
    return RunPlan(
        config=cfg,
        recipe=recipe_of(cfg),
        precision=precision_of(cfg),
        parallel=parallel,
        paths=run_paths(cfg),
        optimizer=optimizer_spec(cfg, compile),
        compile=compile,
    )
