"""Gradient release under FSDP2 with a NaN in one rank's shard of a gradient, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/release_nan_job.py

Rank 0 makes the gradient of its first token's embedding output NaN, so after the reduce-scatter exactly one row
of the token embedding's gradient is NaN, in one rank's shard. The step must be skipped for that parameter on both
ranks (weights, moments and step count of both shards unchanged) while the other parameters are updated. Exits
non-zero with the failed check.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leantrain import guard, parallel  # noqa: E402
from leantrain.config import load_config  # noqa: E402
from leantrain.data import ByteTokenizer, PackedDataset  # noqa: E402
from leantrain.distributed import local as local_shard  # noqa: E402
from leantrain.optim.release import GradientRelease  # noqa: E402
from leantrain.runplan import resolve  # noqa: E402
from leantrain.step import StepContext, train_step  # noqa: E402
from leantrain.train import build_state  # noqa: E402


def nan_at_first_token(module, inputs, out):
    def poison(grad):
        grad = grad.clone()
        grad[0, 0, 0] = float("nan")
        return grad

    out.register_hook(poison)


def local(t):
    return local_shard(t).detach().clone()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plan = resolve(
        load_config(
            None,
            {
                "recipe": "bf16-int8",
                "model.flavor": "debug",
                "compile.enable": "false",
                "training.max_norm": "0",
                "optimizer.in_backward": "true",
                "parallelism.dp_shard": "2",
                "parallelism.dp_replicate": "1",
                "lr_scheduler.warmup_steps": "1",
            },
        )
    )
    d = parallel.init_distributed(plan.parallel)
    data = PackedDataset(["some text to train on, " * 80], ByteTokenizer(), 16, 2, 0, rank=rank, world_size=2)
    state = build_state(plan, d, data, ByteTokenizer())
    ctx = StepContext(
        plan.precision,
        d,
        max_norm=0.0,
        weigh_tokens=False,
        nonfinite=guard.NonFiniteGuard(3, 2),
        release=GradientRelease(state.optimizer),
    )
    assert train_step(state, [data.next_batch()], ctx).finite
    emb = state.model.tok_embeddings.weight
    before = {name: local(p) for name, p in state.model.named_parameters()}
    emb_state = {k: local(v) for k, v in state.optimizer.state[emb].items()}
    if rank == 0:
        handle = state.model.tok_embeddings.register_forward_hook(nan_at_first_token)
    stats = train_step(state, [data.next_batch()], ctx)
    if rank == 0:
        handle.remove()
    assert torch.isfinite(stats.loss) and not stats.finite, "the step should count as skipped on every rank"
    assert torch.equal(local(emb), before["tok_embeddings.weight"]), f"rank {rank}: its embedding shard moved"
    after = {k: local(v) for k, v in state.optimizer.state[emb].items()}
    assert all(torch.equal(after[k], emb_state[k]) for k in after), f"rank {rank}: the embedding's state moved"
    changed = [n for n, p in state.model.named_parameters() if not torch.equal(local(p), before[n])]
    assert len(changed) == len(before) - 1, f"rank {rank}: only {changed} were updated"
    assert train_step(state, [data.next_batch()], ctx).finite  # and training goes on
    dist.barrier()  # both ranks done with every collective before the group goes (a teardown race aborted one)
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
