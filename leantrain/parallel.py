"""Several devices: torchrun, the device mesh, FSDP2 / HSDP / DDP, tensor parallelism, activation checkpointing
and compile.

All of it is applied *to* the model by the functions below; model.py knows nothing of it. The trainer
calls, in this order:

    dist = init_distributed(plan.parallel)       # the process group and mesh; one process: none
    model = ...built on the meta device...       # under FSDP2: shapes only, in the storage dtype
    parallelize(model, dist, precision, ac_mode, compile)  # tp; per block: checkpointing, compile, fully_shard;
                                                 # then the root (FSDP2 / HSDP), or DDP for a built model
    materialize(model, dist.device, seed)        # FSDP2: to_empty + init_weights, each rank fills its shards

The mesh has three named dimensions, ``(dp_replicate, dp_shard, tp)``, tp innermost (torchtitan's ParallelDims;
context parallelism would be a fourth, between dp_shard and tp). Data parallelism has two degrees:

* ``dp_shard`` (FSDP2): parameters, gradients and optimizer state split over dp_shard ranks, gathered one
  transformer block at a time for the forward and backward. Memory per rank falls as 1/dp_shard; each
  block costs an all-gather (forward and backward) and a reduce-scatter.
* ``dp_replicate`` alone (DDP): every rank holds the whole model; one all-reduce of the gradients per step.
* both (HSDP): sharded within groups of dp_shard ranks (a node, on its fast links), replicated across the
  groups (gradients all-reduced between them).

and ``tp`` (:func:`apply_tp`) splits each block's matrices over tp ranks, which see the same batch.

Each data-parallel rank (``dp_replicate * dp_shard`` of them; a tensor-parallel group is one) takes its own
``local_batch_size`` samples of each global batch, and DDP and FSDP2 average the gradients over them, which for
the equal-sized packed batches is the gradient of the mean loss over the global batch. The batch's sums (token
counts, the logged loss) run over the data-parallel ranks (``Distributed.dp_group``), never the world.

Precision (the decisions are leantrain.precision's): full bf16 shards bf16 parameters with no
MixedPrecisionPolicy; ``bf16-mixed`` under FSDP2 uses ``Precision.fsdp_policy`` instead of autocast.
Which ranks, devices and degrees: decided by leantrain.runplan (``ParallelPlan``); this module only acts on them.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import distributed
from .errors import ConfigError
from .precision import Precision
from .runplan import ParallelPlan


@dataclass(frozen=True)
class Distributed:
    """The plan of this process (rank, world, device, degrees) and what was started for it: the mesh."""

    plan: ParallelPlan
    mesh: DeviceMesh | None = None  # ("dp_replicate", "dp_shard", "tp"); None in a single process
    owns_process_group: bool = False  # started here (torchrun), so shutdown() ends it
    dp: DeviceMesh | None = None  # the data-parallel ranks as one dimension (dp_replicate x dp_shard, flattened)

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel ranks' mesh that FSDP2 shards over: (dp_replicate, dp_shard) for HSDP, else dp_shard."""
        return self.mesh["dp_replicate", "dp_shard"] if self.plan.dp_replicate > 1 else self.mesh["dp_shard"]

    @property
    def dp_group(self) -> Any:
        """The process group of this rank's data-parallel peers (the ranks of its tp position): the batch's
        token counts, the logged loss and the step's token count are summed over it, never over the world, whose
        tensor-parallel ranks hold the same batch."""
        return self.dp.get_group() if self.dp is not None else None

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def dp_size(self) -> int:
        return self.plan.dp_size

    @property
    def is_main(self) -> bool:
        return self.plan.is_main

    @property
    def sharded(self) -> bool:
        return self.plan.sharded


def backend(device: torch.device) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(plan: ParallelPlan) -> Distributed:
    """Start the process group (unless a caller did) and the mesh for the plan's degrees. A plain
    `leantrain train` is world size 1: no process group, and every function below leaves the model alone."""
    if plan.rank != 0:  # every rank would print the same warnings; rank 0 speaks for all
        warnings.filterwarnings("ignore", category=UserWarning)
    if plan.world_size == 1:
        return Distributed(plan)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    owns = not dist.is_initialized()  # a caller (e.g. a test running several trainings) may have started it
    if owns:
        dist.init_process_group(backend(plan.device), device_id=plan.device if plan.device.type == "cuda" else None)
    mesh = init_device_mesh(
        plan.device.type, (plan.dp_replicate, plan.dp_shard, plan.tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
    )
    # The data-parallel ranks as one dimension (torchtitan's flattened "dp"): what sums over the batch use.
    return Distributed(plan, mesh, owns, mesh["dp_replicate", "dp_shard"]._flatten("dp"))


def shutdown(d: Distributed) -> None:
    """End the process group if init_distributed started it."""
    if d.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


# ---- the model ------------------------------------------------------------------------------------


def parallelize(
    model: nn.Module, d: Distributed, precision: Precision, activation_checkpoint: str, compile: bool
) -> nn.Module:
    """Activation checkpointing (``none``, ``full``, ``selective``) and compile per block; then FSDP2 / HSDP per
    block and root (on a meta model, before :func:`materialize`), or DDP (on a materialized model). In place;
    returns the model."""
    if d.plan.tp > 1:
        apply_tp(model, d.mesh["tp"])
    if compile and d.plan.tp > 1 and activation_checkpoint == "full":
        # Under tensor parallelism torch 2.13 cannot compile a fully checkpointed block (AOT autograd finds the
        # DeviceMesh among the tensors saved for the backward and fails): the compiled block is checkpointed instead
        apply_compile(model)
        apply_activation_checkpointing(model, activation_checkpoint)
    else:
        apply_activation_checkpointing(model, activation_checkpoint)
        if compile:
            apply_compile(model)
    if d.sharded:
        apply_fsdp(model, d.dp_mesh, precision.fsdp_policy())
    elif d.plan.dp_replicate > 1:
        apply_ddp(model, d.mesh["dp_replicate"])
    return model


def check_tensor_parallel(args: Any, tp: int, seq_len: int) -> None:
    """The model splits over ``tp`` ranks: whole attention heads and key/value heads per rank, SwiGLU's hidden units
    and the sequence (sequence parallelism) in equal parts. ConfigError (exit 2) naming the numbers otherwise."""
    if tp == 1:
        return
    sizes = {
        "attention heads (model.n_heads)": args.n_heads,
        "key/value heads (model.n_kv_heads)": args.n_kv_heads,
        "SwiGLU hidden units (model.ffn_dim)": args.ffn_dim,
        "tokens of a sequence (data.seq_len)": seq_len,
    }
    bad = [f"{n} {what}" for what, n in sizes.items() if n % tp]
    if bad:
        raise ConfigError(
            f"parallelism.tp = {tp} does not divide the model's {', '.join(bad)}: tensor parallelism gives each "
            f"rank whole heads and an equal part of the hidden units and of the sequence. Choose a tp that divides "
            f"{', '.join(str(n) for n in sizes.values())} (e.g. "
            f"{max(t for t in range(1, tp) if all(n % t == 0 for n in sizes.values()))})."
        )


# The blocks' matrices tensor parallelism splits (module names within a block): column-wise (each rank its heads, its
# hidden units) and row-wise (their inputs split the same way; the outputs reduce-scattered along the sequence).
TP_COLUMNWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
TP_ROWWISE = ("attention.wo", "feed_forward.w2")
TP_VOCABULARY = ("tok_embeddings", "output")  # the model's own: split by vocabulary rows


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Tensor parallelism over ``mesh`` (1-D, "tp"), Megatron's layout with sequence parallelism, as torchtitan
    applies it to Llama: in each block, q/k/v and SwiGLU's w1/w3 column-wise (each rank its heads, its hidden
    units), wo and w2 row-wise, their outputs reduce-scattered along the sequence; the two norms and the residual
    stream between blocks hold 1/tp of the sequence (SequenceParallel), gathered before attention and the MLP.

    The embedding and the output projection are split by vocabulary rows (torchtitan's layout): the embedding's
    output is cut along the sequence for the first block; the last block's output is gathered whole for the final
    norm, and the chunked fp32 loss (precision.linear_cross_entropy) runs on each rank's vocabulary rows, the
    ranks combining their log-sum-exps. Heads stay whole, so RoPE, GQA and Qwen3's per-head norms run unchanged on
    each rank's heads."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    root = {
        # the vocabulary's rows split, each token's row all-reduced; the first block cuts it along the sequence (a
        # reduce-scatter straight into Shard(1), torchtitan's, fails torch 2.13's compiled block's backward)
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "layers.0": PrepareModuleInput(
            input_layouts=(Replicate(), *[None] * 3),
            desired_input_layouts=(Shard(1), *[None] * 3),
            use_local_output=True,
        ),
        "norm": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
    }
    if not model.args.tie_embeddings:  # (tied: the embedding's split rows are the output's)
        root["output"] = ColwiseParallel(output_layouts=Replicate())  # the logits' path (generation) gathers them
    parallelize_module(model, mesh, root)
    model.tie_weights()
    for block in model.layers:
        plan = {
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            # (x, cos, sin, mask, cache, start_pos): the block's call; only x is split
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), *[None] * 5), desired_input_layouts=(Replicate(), *[None] * 5)
            ),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            **{name: ColwiseParallel() for name in TP_COLUMNWISE},
            **{name: RowwiseParallel(output_layouts=Shard(1)) for name in TP_ROWWISE},
        }
        parallelize_module(block, mesh, plan)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, policy: Any) -> None:
    """fully_shard each transformer block, then the root (embedding, final norm, output). A 2-D mesh
    (dp_replicate, dp_shard) gives HSDP. The last block stays gathered after the forward: the backward
    needs it first."""
    from torch.distributed.fsdp import fully_shard

    for i, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> None:
    """DDP, applied in place (composable replicate): parameter names stay those of the model, so checkpoints
    move between one device, DDP and FSDP2. Rank 0's weights are broadcast to the others."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=mesh)


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta (sharded) model on ``device`` and initialise it: each rank allocates and fills only its
    own shards, with the values a single-process run would draw (precision.init_normal_)."""
    model.to_empty(device=device)
    model.init_weights(seed)


# ---- activation checkpointing and compile ----------------------------------------------------------

# Selective activation checkpointing keeps what is expensive to recompute (the matmuls and attention)
# and recomputes the rest (norms, RoPE, SwiGLU's activation and product, casts, residual adds).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,  # a projection with a bias (Qwen2's q/k/v)
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Per transformer block: ``full`` keeps only the block's input and recomputes the whole block in the
    backward; ``selective`` keeps the matmul and attention outputs and recomputes the cheap ops between them.

    The block's forward is wrapped in place (not the module), so parameter names and checkpoints do not
    change with the mode.
    """
    if mode == "none":
        return
    options: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":  # (full: no context_fn at all; torch.compile cannot trace the default one)
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for block in model.layers:
        block.forward = _checkpointed(block.forward, options)


def _checkpointed(forward: Any, options: dict[str, Any]) -> Any:
    @functools.wraps(forward)
    def run(*args: Any) -> Any:
        return checkpoint(forward, *args, **options)

    return run


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward (after activation checkpointing, which it then traces). The
    FSDP2 hooks run around the compiled forward, on the gathered parameters."""
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True)


# torch's own timings of each compile: dynamo's frames (with their forward graphs) and AOT autograd's backward
# graphs, which are compiled lazily at the first backward. Neither grows once everything is compiled.
_COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (0.0 where nothing was compiled)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(name, ())) for name in _COMPILE_TIMERS)


def reshard(model: nn.Module) -> None:
    """Shard the parameters that a forward without backward (evaluation) left gathered under FSDP2: the root
    and the last block keep theirs after the forward for the backward that usually follows."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---- collectives the loop needs ---------------------------------------------------------------------


def mean_over_ranks(value: torch.Tensor, d: Distributed) -> torch.Tensor:
    """The mean of a scalar over the data-parallel ranks (for logging: every rank's loss on its part of the batch)."""
    return sum_over_ranks(value, d) / d.dp_size  # SUM, then divide: gloo has no AVG


def sum_over_ranks(value: torch.Tensor, d: Distributed) -> torch.Tensor:
    """The sum of a tensor over the data-parallel ranks, each part of the batch once (a new tensor; the value itself
    where there is one data-parallel rank)."""
    if d.dp_size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, group=d.dp_group)
    return total


def barrier(d: Distributed) -> None:
    """Wait until every rank is here (nothing on one process)."""
    if d.world_size > 1:
        dist.barrier()


def same_on_all_ranks(obj: Any, d: Distributed) -> Any:
    """Rank 0's value of ``obj`` on every rank (e.g. a run folder named after rank 0's clock)."""
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_numel(model: nn.Module) -> int:
    """Parameters held by this rank (its shards under FSDP2)."""
    return sum(distributed.local(p).numel() for p in model.parameters())
