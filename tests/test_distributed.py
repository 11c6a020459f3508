"""Distributed training in real processes on gloo (CPU): FSDP2, DDP and HSDP with the precision recipes, against
a single-process run with the same global batch and the same initial weights.

One torchrun launch (tests/distributed_jobs.py) trains every 2-rank configuration in turn, so the process
start-up is paid once; the HSDP test launches two real `torchrun --nnodes=2 -m leantrain train` "nodes" on
loopback. Each 2-rank run has local_batch_size 4, the single-process reference local_batch_size 8: rank r
trains on samples [4r, 4r + 4) of the reference's batch.

Tolerance on every step's loss (relative, 2 ranks vs 1 process), set from the differences measured on these
5 steps (debug model, lr 3e-3) with 10x or more headroom:

* fp32: 1e-5. Only the order of fp32 sums differs (the gradient reduce-scatter / all-reduce adds two half
  batches instead of one matmul over the whole batch); measured 1.8e-7.
* bf16, bf16-kahan: 1e-3. The gradients are bf16: each rank's half-batch gradient is rounded to bf16
  (8 significant bits) before the reduction adds them, so a gradient element can differ by one bf16 ulp
  (0.4%) from the single-process one (each element draws the stochastic-rounding bits it draws in one process,
  randbits.ElementBox, so the bits add no difference of their own). The loss moves by far less; measured
  2.6e-5 (bf16), 1.2e-5 (bf16-kahan); HSDP 4.2e-5, compile 3.8e-5 (fused kernels round bf16 intermediates
  differently).
* bf16-int8: 3e-3. The same bf16 differences, amplified by the int8 moments: a tiny change of a moment can
  move it to the neighbouring code of the block-wise map (codes are 1-10% apart); measured 2.7e-4 (FSDP2),
  1.2e-5 (DDP, whose ranks quantize the same whole tensors as one process).
* bf16-int4: 3e-3, as int8 (16 codes: a neighbouring code is further away, but stochastic codes make the step's
  error random rather than systematic); measured 2.7e-4 (FSDP2). bf16-int4-int8 (4-bit exp_avg, 8-bit exp_avg_sq):
  the same bound.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import DIST_COMMON, DIST_STEPS, ROOT, assert_losses_close, losses, torchrun_jobs, train_reference
from leantrain.config import data_parallel_degrees, load_config, suspicious_precision_settings
from leantrain.runplan import parallel_plan, precision_of
from leantrain.errors import ConfigError
from leantrain.metrics import read_metrics

pytestmark = pytest.mark.torchrun

RECIPES = ["fp32", "bf16", "bf16-kahan", "bf16-int8", "bf16-int4", "bf16-int4-int8", "bf16-int8-factored"]
TOLERANCE = {
    "fp32": 1e-5,
    "bf16": 1e-3,
    "bf16-kahan": 1e-3,
    "bf16-int8": 3e-3,
    "bf16-int4": 3e-3,
    "bf16-int4-int8": 3e-3,
    "bf16-int8-factored": 3e-3,
}
MODES = {
    "fsdp": ["--parallelism.dp_shard=2", "--parallelism.dp_replicate=1"],
    "ddp": ["--parallelism.dp_shard=1", "--parallelism.dp_replicate=2"],
}
# Extra 2-rank runs: activation checkpointing under FSDP2, and compile (the blocks and the optimizer's update) with
# each checkpointing mode; name -> (recipe, arguments).
VARIANTS = {
    "ac-full": ("bf16", [*MODES["fsdp"], "--activation_checkpoint.mode=full"]),
    "ac-selective": ("bf16", [*MODES["fsdp"], "--activation_checkpoint.mode=selective"]),
    "compile-fsdp": ("bf16", [*MODES["fsdp"], "--compile.enable=true", "--activation_checkpoint.mode=full"]),
    "compile-ddp": ("bf16", [*MODES["ddp"], "--compile.enable=true", "--activation_checkpoint.mode=selective"]),
    # sharded int8 state through the compiled optimizer (shards whose size is no multiple of 256 stay eager)
    "compile-fsdp-int8": ("bf16-int8", [*MODES["fsdp"], "--compile.enable=true"]),
    # gradient release: FSDP2 calls each sharded parameter's hook after its reduce-scatter
    "release-fsdp": ("bf16-int8", [*MODES["fsdp"], "--optimizer.in_backward=true", "--training.max_norm=0"]),
    # the factored rule's column statistics all-reduced inside the backward's hooks
    "release-fsdp-factored": (
        "bf16-int8-factored",
        [*MODES["fsdp"], "--optimizer.in_backward=true", "--training.max_norm=0"],
    ),
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _assert_close(got: list[float], want: list[float], rel: float) -> None:
    assert len(got) == DIST_STEPS
    assert_losses_close(got, want, rel)


def _prepared_builtin(root) -> str:
    """The built-in corpus as a .jsonl, prepared: the same documents, so the same batches as data.path=builtin."""
    from leantrain.data import load_documents
    from leantrain.prepare import prepare

    (root / "builtin").mkdir()
    (root / "builtin" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in load_documents("builtin"))
    )
    prepare(str(root / "builtin"), "byte", str(root / "prepared"), workers=1, progress_bar=False)
    return str(root / "prepared")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train every configuration once: single-process references here, all 2-rank runs in one torchrun."""
    root = tmp_path_factory.mktemp("dist")
    chat = _chat_args(root)
    for recipe in RECIPES:
        train_reference(
            f"--recipe={recipe}", "--data.local_batch_size=8", f"--job.dump_folder={root / f'single-{recipe}'}"
        )
    for recipe in ("bf16-int8", "bf16-int8-factored"):  # the references of gradient release: no clipping
        train_reference(
            f"--recipe={recipe}",
            "--data.local_batch_size=8",
            "--training.max_norm=0",
            f"--job.dump_folder={root / f'single-noclip-{recipe}'}",
        )
    train_reference(*chat, "--data.local_batch_size=8", f"--job.dump_folder={root / 'single-chat'}")
    jobs = [
        [
            *DIST_COMMON,
            f"--recipe={recipe}",
            "--data.local_batch_size=4",
            *MODES[mode],
            f"--job.dump_folder={root / f'{mode}-{recipe}'}",
        ]
        for mode in MODES
        for recipe in RECIPES
    ]
    jobs += [
        [*DIST_COMMON, f"--recipe={recipe}", "--data.local_batch_size=4", *extra, f"--job.dump_folder={root / name}"]
        for name, (recipe, extra) in VARIANTS.items()
    ]
    # FSDP2 on a prepared folder of the same documents: each rank memory-maps its own windows.
    jobs.append(
        [
            *DIST_COMMON,
            "--recipe=fp32",
            "--data.local_batch_size=4",
            *MODES["fsdp"],
            f"--data.path={_prepared_builtin(root)}",
            f"--job.dump_folder={root / 'fsdp-prepared'}",
        ]
    )
    jobs += [
        [*DIST_COMMON, *chat, "--data.local_batch_size=4", *MODES[mode], f"--job.dump_folder={root / f'{mode}-chat'}"]
        for mode in MODES
    ]
    torchrun_jobs(2, jobs, root / "jobs.json")
    return root


def _chat_args(root) -> list[str]:
    """Packed chat SFT (fp32): conversations of very different lengths, so the ranks' rows hold different numbers
    of labelled tokens and the step's loss must weigh them as one global batch."""
    path = root / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(80):
            turns = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (1 + i % 7) * 5}]
            f.write(json.dumps({"messages": turns * (1 + i % 3)}) + "\n")
    return ["--recipe=fp32", "--data.format=chat", f"--data.path={path}", "--data.seq_len=256"]


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_chat_on_two_ranks_matches_one_process(runs, mode):
    assert losses(runs / f"{mode}-chat")[0] == pytest.approx(losses(runs / "single-chat")[0], rel=1e-6)
    _assert_close(losses(runs / f"{mode}-chat"), losses(runs / "single-chat"), TOLERANCE["fp32"])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, mode, recipe):
    one, two = runs / f"single-{recipe}", runs / f"{mode}-{recipe}"
    # The same initial weights and batch: the first loss is the same up to the order of fp32 sums.
    assert losses(two)[0] == pytest.approx(losses(one)[0], rel=1e-6)
    _assert_close(losses(two), losses(one), TOLERANCE[recipe])


def test_two_ranks_on_prepared_data_match_one_process_on_the_raw_corpus(runs):
    # Prepared shards give the same windows as the in-memory corpus, and the ranks' slices make up its batch.
    assert losses(runs / "fsdp-prepared")[0] == pytest.approx(losses(runs / "single-fp32")[0], rel=1e-6)
    _assert_close(losses(runs / "fsdp-prepared"), losses(runs / "single-fp32"), TOLERANCE["fp32"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_gives_each_rank_half_of_the_training_state(runs, recipe):
    single = json.loads((runs / f"single-{recipe}" / "summary.json").read_text())["state_bytes"]
    # FactoredAdamW's column factors are replicated (optim/factored.py): every rank holds them whole
    from leantrain.model import build_model

    replicated = (
        0
        if "factored" not in recipe
        else sum(4 * p.shape[1] for p in build_model("debug").layers.parameters() if p.ndim == 2)
    )
    for rank in (0, 1):
        mine = json.loads((runs / f"fsdp-{recipe}" / f"rank{rank}.json").read_text())["state_bytes"]
        for kind in ("params", "grads", "optimizer"):
            whole = replicated if kind == "optimizer" else 0
            # Shards are rows: the 259-row embedding and output split 130 / 129, hence "about".
            assert abs((mine[kind] - whole) / (single[kind] - whole) - 0.5) < 0.01, (rank, kind, mine, single)
    summary = json.loads((runs / f"fsdp-{recipe}" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["state_bytes"] == json.loads((runs / f"fsdp-{recipe}" / "rank0.json").read_text())["state_bytes"]
    # Bytes per parameter are per parameter held, so a recipe reads the same sharded or not (the replicated column
    # factors aside: 0.6% of the debug model's state per rank).
    assert summary["state_bytes_per_param"] == pytest.approx(
        json.loads((runs / f"single-{recipe}" / "summary.json").read_text())["state_bytes_per_param"],
        rel=1e-2 if replicated else 1e-3,
    )


def test_only_rank_0_writes_the_run_files(runs):
    folder = runs / "fsdp-bf16"
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == list(range(1, DIST_STEPS + 1))
    assert {"config.toml", "metrics.jsonl", "summary.json", "loss.png"} <= set(os.listdir(folder))


@pytest.mark.parametrize("recipe", RECIPES)
def test_ddp_replicas_stay_identical(runs, recipe):
    # Stochastic rounding too: replicas draw the same bits (only different shards draw different ones).
    ranks = [json.loads((runs / f"ddp-{recipe}" / f"rank{r}.json").read_text())["checksum"] for r in (0, 1)]
    assert ranks[0] == ranks[1]


@pytest.mark.parametrize("variant", ["ac-full", "ac-selective"])
def test_activation_checkpointing_leaves_the_loss_unchanged(runs, variant):
    # Recomputing the same ops on the same inputs gives the same values, so the runs are identical.
    assert losses(runs / variant) == losses(runs / "fsdp-bf16")


@pytest.mark.parametrize("variant", ["compile-fsdp", "compile-ddp", "compile-fsdp-int8"])
def test_compile_matches_one_process_within_the_recipe_tolerance(runs, variant):
    # Inductor fuses the elementwise ops, rounding some bf16 intermediates differently.
    recipe = VARIANTS[variant][0]
    _assert_close(losses(runs / variant), losses(runs / f"single-{recipe}"), TOLERANCE[recipe])


def test_gradient_release_under_fsdp_skips_a_parameter_on_every_rank_when_one_shard_is_nan():
    """One row of the token embedding's gradient NaN, in one rank's shard (tests/release_nan_job.py): both ranks
    skip the whole parameter (weights, moments and step count of both shards unchanged), update every other one,
    count the step as skipped, and train on."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(ROOT, "tests", "release_nan_job.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "rank 0: ok" in r.stdout and "rank 1: ok" in r.stdout


def test_gradient_release_under_fsdp_matches_one_process_without_it(runs):
    """optimizer.in_backward on 2 FSDP2 ranks (int8 moments, sharded scales) against the normal step of one process
    (both without clipping): the updates run in FSDP2's post-reduce-scatter hooks on each rank's shards."""
    _assert_close(losses(runs / "release-fsdp"), losses(runs / "single-noclip-bf16-int8"), TOLERANCE["bf16-int8"])
    _assert_close(
        losses(runs / "release-fsdp-factored"),
        losses(runs / "single-noclip-bf16-int8-factored"),
        TOLERANCE["bf16-int8-factored"],
    )
    assert json.loads((runs / "release-fsdp" / "summary.json").read_text())["state_bytes"]["grads"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hsdp_on_two_nodes_over_loopback_matches_one_process(runs):
    """Two `torchrun --nnodes=2 --nproc_per_node=2` launchers meet at a c10d rendezvous on 127.0.0.1; HSDP shards
    within each "node" (dp_shard=2) and replicates across them (dp_replicate=2). Global batch 4 x 2 = 8."""
    folder = runs / "hsdp-bf16"
    port = _free_port()
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=leantrain-test",
        "-m",
        "leantrain",
        "train",
        *DIST_COMMON,
        "--recipe=bf16",
        "--data.local_batch_size=2",
        "--parallelism.dp_replicate=2",
        "--parallelism.dp_shard=2",
        f"--job.dump_folder={folder}",
    ]
    nodes = [
        subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-4000:] for o in outputs)
    _assert_close(losses(folder), losses(runs / "single-bf16"), TOLERANCE["bf16"])
    assert json.loads((folder / "summary.json").read_text())["world_size"] == 4


# ---- without processes ------------------------------------------------------------------------------------


def test_degrees_resolve_against_the_world_size():
    cfg = load_config(None, {})
    assert data_parallel_degrees(cfg, 1) == (1, 1)
    assert data_parallel_degrees(cfg, 4) == (1, 4)  # default: FSDP2 over every rank
    cfg = load_config(None, {"parallelism.dp_replicate": "2"})
    assert data_parallel_degrees(cfg, 8) == (2, 4)
    cfg = load_config(None, {"parallelism.dp_replicate": "-1", "parallelism.dp_shard": "2"})
    assert data_parallel_degrees(cfg, 8) == (4, 2)


@pytest.mark.parametrize(
    "overrides, world",
    [({"parallelism.dp_shard": "2"}, 1), ({"parallelism.dp_shard": "3"}, 4), ({"parallelism.dp_replicate": "3"}, 4)],
)
def test_degrees_that_do_not_fit_the_world_size_are_a_config_error(overrides, world):
    with pytest.raises(ConfigError, match="dp_replicate \\* dp_shard \\* tp must equal the world size"):
        data_parallel_degrees(load_config(None, overrides), world)


def test_a_single_process_with_dp_shard_2_stops_before_any_work(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="parallelism.dp_shard = 2"):
        parallel_plan(load_config(None, {"parallelism.dp_shard": "2"}))


@pytest.mark.parametrize(
    "bad",
    [
        {"parallelism.dp_shard": "0"},
        {"parallelism.dp_replicate": "-2"},
        {"parallelism.dp_shard": "-1", "parallelism.dp_replicate": "-1"},
        {"activation_checkpoint.mode": "some"},
    ],
)
def test_bad_parallelism_keys_are_rejected(bad):
    with pytest.raises(ConfigError):
        load_config(None, bad)


def test_fsdp_mixed_precision_policy_per_recipe():
    def policy(recipe, **extra):
        return precision_of(load_config(None, {"recipe": recipe, **extra})).fsdp_policy()

    mixed = policy("bf16-mixed")
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy("bf16-mixed", **{"training.mixed_precision_reduce": "bfloat16"}).reduce_dtype == torch.bfloat16
    for recipe in ("bf16", "bf16-kahan", "bf16-int8"):  # full bf16: no policy, bf16 all the way
        assert (policy(recipe).param_dtype, policy(recipe).reduce_dtype) == (None, None)
    assert policy("fp32").param_dtype is None and policy("fp32").reduce_dtype == torch.float32


def test_reduce_dtype_without_effect_warns():
    cfg = load_config(None, {"recipe": "bf16-mixed", "training.mixed_precision_reduce": "bfloat16"})
    assert not suspicious_precision_settings(cfg, dp_shard=2)
    assert any("without FSDP2" in m for m in suspicious_precision_settings(cfg, dp_shard=1))
    cfg = load_config(None, {"recipe": "bf16", "training.mixed_precision_reduce": "bfloat16"})
    assert any("has no effect with training.dtype=bfloat16" in m for m in suspicious_precision_settings(cfg))


@pytest.fixture
def one_rank_group():
    """A real one-process gloo group, so DTensors exist without launching anything."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "recipe",
    ["fp32", "bf16", "bf16-sr", "bf16-kahan", "bf16-int8", "bf16-int4", "bf16-int4-int8", "bf16-int8-factored"],
)
def test_adamw_on_sharded_parameters_equals_adamw_on_plain_ones(one_rank_group, recipe):
    """Every state kind (fp32 / bf16 moments, Kahan buffer, int8 codes and scales) lives on the local shard of a
    DTensor parameter, and a one-shard DTensor steps exactly like a plain tensor (shard 0 keeps the seeds)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from leantrain.optim import OPTIMIZERS

    cfg = load_config(None, {"recipe": recipe})
    dtype, o = precision_of(cfg).storage, cfg.optimizer
    mesh = init_device_mesh("cpu", (1,))
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(96, 64, generator=gen).to(dtype), torch.randn(64, generator=gen).to(dtype)]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    sharded = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for v in values]
    opts = [
        OPTIMIZERS[o.name](
            [{"params": ps, **({"factored": True} if o.name == "FactoredAdamW" else {})}],
            lr=1e-2,
            state_dtype=o.state_dtype,
            compensation=o.compensation,
            seed=3,
        )
        for ps in (plain, sharded)
    ]
    for _ in range(3):
        grads = [torch.randn(v.shape, generator=gen).to(dtype) for v in values]
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        for p, g in zip(sharded, grads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        for opt in opts:
            opt.step()
    for p, q in zip(plain, sharded):
        assert torch.equal(p.detach(), q.to_local().detach())
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key]
            assert isinstance(other, DTensor) or key == "step"
            local = other.to_local() if isinstance(other, DTensor) else other
            assert torch.equal(value, local.reshape(value.shape)), key


def test_shards_draw_their_elements_bits_and_replicas_the_same():
    """A fake process group of 4 ranks (no processes). HSDP on 2 x 2: ranks 0 and 2 hold rows 0-4 of a [10, 64]
    parameter, ranks 1 and 3 rows 5-9; then FSDP2 rows x tensor-parallel columns on 2 x 2. Each rank's part knows
    where its elements lie in the whole parameter (randbits.ElementBox, whose bits test_randbits checks), so replicas
    draw the same bits and every element the bits it draws in one process; int8 scales and int4 codes are cut per
    part whatever the placement."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from leantrain.optim import quant
    from leantrain.optim.randbits import ElementBox
    from leantrain.optim.sharding import packed_codes, sharded_block_scales

    int8 = quant.FORMATS["int8"]
    hsdp, tp = [], []
    for rank in range(4):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
        try:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
            p = DTensor.from_local(
                torch.zeros(5, 64), mesh, [Replicate(), Shard(0)], shape=torch.Size((10, 64)), stride=(64, 1)
            )
            hsdp.append(ElementBox.of(p))
            scales = sharded_block_scales(p, int8)  # one row of block scales per shard
            assert tuple(scales.shape) == (2, 2) and tuple(scales.to_local().shape) == (1, 2)
            codes = packed_codes(p, 0)  # int4: the parameter's rows, half its columns, sharded like it
            assert tuple(codes.shape) == (10, 32) and tuple(codes.to_local().shape) == (5, 32)
            assert codes.placements == p.placements
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
            q = DTensor.from_local(
                torch.zeros(5, 32), mesh, [Shard(0), Shard(1)], shape=torch.Size((10, 64)), stride=(64, 1)
            )
            tp.append(ElementBox.of(q))
            scales = sharded_block_scales(q, int8)  # 4 parts of 160 elements: one block each
            assert tuple(scales.shape) == (4, 1) and tuple(scales.to_local().shape) == (1, 1)
            codes = packed_codes(q, 0)
            assert tuple(codes.shape) == (10, 32) and tuple(codes.to_local().shape) == (5, 16)
        finally:
            dist.destroy_process_group()
    assert [(b.row0, b.col0, b.strided) for b in hsdp] == [(0, 0, None), (5, 0, None)] * 2  # replicas: the same
    assert [(b.row0, b.col0, b.strided) for b in tp] == [
        (0, 0, (32, 64)),
        (0, 32, (32, 64)),
        (5, 0, (32, 64)),
        (5, 32, (32, 64)),
    ]
