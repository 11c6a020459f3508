"""Tensor parallelism (parallelism.tp) in real processes on gloo (CPU), against a single process with the same global
batch and initial weights: 2 ranks of tp = 2, and 4 ranks of dp_shard = 2 x tp = 2; a checkpoint saved under 2 x 2
resumed on 1 process and on 4 ranks of FSDP2 alone; an HF folder loaded into the tensor-parallel model. Without
processes: every layout that cannot run is refused (ConfigError, exit 2) before anything starts.

Tolerances on every step's loss (relative), measured on these 5 steps (debug model, lr 3e-3) and kept with 10x or
more headroom, as tests/test_distributed.py's: fp32 1e-5 (measured 8.8e-8 under tp = 2, 9.9e-8 under 2 x 2: only the
order of fp32 sums differs); bf16-sr and bf16-kahan 1e-3 (2.8e-5 and 4.5e-5, 3.5e-5 under 2 x 2; compiled with full
checkpointing 8.0e-5; resumed on another layout 3.5e-5: bf16 partial sums of the row-wise matmuls and of the
data-parallel gradient reduction are rounded before they are added; every element draws the random bits it draws
in one process, randbits.ElementBox); bf16-int8 and bf16-int8-factored 3e-3 (3.1e-5 and 4.7e-5, 6.6e-5 under
2 x 2; with gradient release 3.5e-5 and 4.2e-5: the same, and int8 blocks cut from each rank's part). The 2 x 2
layout runs fp32, bf16-sr and bf16-int8 (4 processes on the suite's 2 cores); every recipe under 2 x 2 was measured
once by hand (BENCHMARKS.md).
"""

import json
import shutil

import pytest
import torch

from conftest import DIST_COMMON, assert_losses_close, losses, torchrun_jobs, train_reference
from leantrain.config import load_config, parse_overrides
from leantrain.errors import CheckpointError, ConfigError
from leantrain.metrics import read_metrics
from leantrain.runplan import parallel_plan

RECIPES = ["fp32", "bf16-sr", "bf16-kahan", "bf16-int8", "bf16-int8-factored"]
RECIPES_2X2 = ["fp32", "bf16-sr", "bf16-int8"]  # 4 processes on the suite's 2 cores: the three
TOLERANCE = {"fp32": 1e-5, "bf16-sr": 1e-3, "bf16-kahan": 1e-3, "bf16-int8": 3e-3, "bf16-int8-factored": 3e-3}
LAYOUTS = {  # name -> (processes, arguments); each data-parallel rank takes 8 / dp samples of the 8-sample batch
    "tp2": (2, ["--parallelism.tp=2", "--parallelism.dp_shard=1", "--data.local_batch_size=8"]),
    "dp2xtp2": (4, ["--parallelism.tp=2", "--parallelism.dp_shard=2", "--data.local_batch_size=4"]),
}
CHECKPOINTED = ["--checkpoint.enable=true", "--checkpoint.interval=3"]
# gradient release, against the normal step without clipping (release clips by its own rules)
NOCLIP = ["--recipe=bf16-int8", "--training.max_norm=0"]
RELEASE = ["--optimizer.in_backward=true", *NOCLIP]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face folder whose weights are not those the runs would draw (another seed): a run that trains from
    it starts from them only if they were loaded. Its embedding and output matrix are one (Llama 3.2's
    tie_word_embeddings), which tensor parallelism splits once, by vocabulary rows."""
    import dataclasses

    from leantrain.data import ByteTokenizer
    from leantrain.hf import save_hf
    from leantrain.model import FLAVORS, build_model_from_args

    folder = tmp_path_factory.mktemp("hf")
    tied = dataclasses.replace(FLAVORS["debug"], tie_embeddings=True)
    save_hf(build_model_from_args(tied, seed=123), folder, tokenizer=ByteTokenizer())
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_folder):
    """The single-process references here; every 2-rank run in one torchrun, every 4-rank run in another."""
    root = tmp_path_factory.mktemp("tp")
    for recipe in RECIPES:
        train_reference(
            f"--recipe={recipe}", "--data.local_batch_size=8", f"--job.dump_folder={root / f'single-{recipe}'}"
        )
    train_reference(
        "--recipe=fp32",
        "--data.local_batch_size=8",
        "--training.steps=1",
        "--lr_scheduler.warmup_steps=0",
        f"--job.dump_folder={root / 'single-step'}",
    )
    train_reference(*NOCLIP, "--data.local_batch_size=8", f"--job.dump_folder={root / 'single-noclip'}")
    hf = [f"--model.hf_checkpoint={hf_folder}", "--recipe=fp32"]
    train_reference(*hf, "--data.local_batch_size=8", f"--job.dump_folder={root / 'single-hf'}")
    for name, (nproc, layout) in LAYOUTS.items():
        recipes = RECIPES if name == "tp2" else RECIPES_2X2
        jobs = [[*DIST_COMMON, f"--recipe={r}", *layout, f"--job.dump_folder={root / f'{name}-{r}'}"] for r in recipes]
        step = [
            "--recipe=fp32",
            "--training.steps=1",
            "--lr_scheduler.warmup_steps=0",
            f"--job.dump_folder={root / f'{name}-step'}",
        ]
        jobs.append([*DIST_COMMON, *layout, *step])
        jobs.append([*DIST_COMMON, *RELEASE, *layout, f"--job.dump_folder={root / f'{name}-release'}"])
        if name == "tp2":
            jobs.append([*DIST_COMMON, *hf, *layout, f"--job.dump_folder={root / 'tp2-hf'}"])
            # compile with full activation checkpointing (the compiled block is checkpointed under tp)
            compiled = ["--compile.enable=true", "--activation_checkpoint.mode=full"]
            jobs.append(
                [*DIST_COMMON, "--recipe=bf16-sr", *layout, *compiled, f"--job.dump_folder={root / 'tp2-compile'}"]
            )
        else:
            # saved at step 3 under 2 x 2, then (next job) resumed on 4 ranks of FSDP2 alone for steps 4 and 5
            saved = root / "saved-2x2"
            jobs.append(
                [
                    *DIST_COMMON,
                    "--recipe=bf16-sr",
                    *layout,
                    *CHECKPOINTED,
                    "--training.steps=3",
                    f"--job.dump_folder={saved}",
                ]
            )
            jobs.append(
                [
                    *DIST_COMMON,
                    "--recipe=bf16-sr",
                    "--parallelism.dp_shard=4",
                    "--data.local_batch_size=2",
                    *CHECKPOINTED,
                    f"--job.dump_folder={root / 'resumed-fsdp4'}",
                ]
            )
        if name == "dp2xtp2":
            # the resumed run's folder starts as a copy of the saved one: made between the two jobs, so two launches
            torchrun_jobs(nproc, jobs[:-1], root / f"jobs-{nproc}.json")
            shutil.copytree(saved, root / "resumed-fsdp4")
            shutil.copytree(saved, root / "resumed-single")
            torchrun_jobs(nproc, jobs[-1:], root / f"jobs-{nproc}.json")
        else:
            torchrun_jobs(nproc, jobs, root / f"jobs-{nproc}.json")
    train_reference(
        "--recipe=bf16-sr", "--data.local_batch_size=8", *CHECKPOINTED, f"--job.dump_folder={root / 'resumed-single'}"
    )
    return root


LAYOUT_RECIPES = [(layout, r) for layout in LAYOUTS for r in (RECIPES if layout == "tp2" else RECIPES_2X2)]


@pytest.mark.torchrun
@pytest.mark.parametrize("layout, recipe", LAYOUT_RECIPES)
def test_tensor_parallel_runs_match_one_process(runs, layout, recipe):
    one, many = losses(runs / f"single-{recipe}"), losses(runs / f"{layout}-{recipe}")
    # the same initial weights and batch: in fp32 the same first loss up to the order of sums (in bf16 the row-wise
    # matmuls' partial sums are rounded before they are added)
    assert many[0] == pytest.approx(one[0], rel=1e-6 if recipe == "fp32" else TOLERANCE[recipe])
    assert_losses_close(many, one, TOLERANCE[recipe])


@pytest.mark.torchrun
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_tensor_parallel_step_is_the_single_process_step(runs, layout):
    """The weights after one fp32 step, saved sharded by the layout and read back whole in one process (DCP), against
    the single-process step's: the sharded forward, backward, clipping and update make the same step, to fp32
    rounding (measured as the norm of the steps' difference over the norm of the step: Adam's first step is about
    lr * sign(g), so an element whose gradient is within rounding of 0 may step the other way; a few do)."""
    from leantrain.checkpoint import load_model

    start, one, many = (load_model(str(runs / name))[0] for name in ("single-step", "single-step", f"{layout}-step"))
    start.init_weights(0)  # the initial weights (job.seed 0)
    step = torch.cat([(a - s).flatten() for a, s in zip(one.parameters(), start.parameters())])
    other = torch.cat([(b - s).flatten() for b, s in zip(many.parameters(), start.parameters())])
    assert (other - step).norm() <= 1e-2 * step.norm(), ((other - step).norm(), step.norm())


@pytest.mark.torchrun
@pytest.mark.parametrize("layout, recipe", LAYOUT_RECIPES)
def test_the_planner_counts_each_ranks_part_of_the_training_state(runs, layout, recipe):
    """summary.json: rank 0's measured state bytes beside the planner's for its layout (dp_shard x tp): the blocks'
    matrices split over both, the embedding, output and norms over dp_shard only. Within 1%: FSDP2 splits the
    259-row embedding and output 130 / 129."""
    summary = json.loads((runs / f"{layout}-{recipe}" / "summary.json").read_text())
    single = json.loads((runs / f"single-{recipe}" / "summary.json").read_text())["state_bytes"]
    for kind, planned in summary["planned_state_bytes"].items():
        assert summary["state_bytes"][kind] == pytest.approx(planned, rel=1e-2), kind
        assert summary["state_bytes"][kind] < 0.7 * single[kind]  # the blocks' share divided by tp at least


@pytest.mark.torchrun
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradient_release_under_tensor_parallelism_matches_one_process(runs, layout):
    """The updates inside the backward's hooks: on the tp-split matrices, on the norms (without FSDP2 their partial
    gradients summed in the hook), and the logged norm reduced per placement group."""
    released, normal = runs / f"{layout}-release", runs / "single-noclip"
    assert_losses_close(losses(released), losses(normal), TOLERANCE["bf16-int8"])
    norms = [[r["grad_norm"] for r in read_metrics(folder / "metrics.jsonl")] for folder in (released, normal)]
    assert_losses_close(*norms, TOLERANCE["bf16-int8"])


@pytest.mark.torchrun
def test_tensor_parallel_compiles_with_full_activation_checkpointing(runs):
    assert_losses_close(losses(runs / "tp2-compile"), losses(runs / "single-bf16-sr"), TOLERANCE["bf16-sr"])


@pytest.mark.torchrun
def test_hf_weights_load_into_the_tensor_parallel_model(runs):
    one, many = losses(runs / "single-hf"), losses(runs / "tp2-hf")
    assert many[0] == pytest.approx(one[0], rel=1e-6)
    assert many[0] != pytest.approx(losses(runs / "single-fp32")[0], rel=1e-3)  # not the run's own initial weights
    assert_losses_close(many, one, TOLERANCE["fp32"])


@pytest.mark.torchrun
@pytest.mark.parametrize("resumed", ["resumed-single", "resumed-fsdp4"])
def test_a_2x2_checkpoint_resumes_on_other_layouts(runs, resumed):
    """Saved at step 3 by dp_shard = 2 x tp = 2; resumed on 1 process, and on 4 ranks of dp_shard = 4: DCP reshards
    the weights and the moments, and steps 4 and 5 continue the single-process run."""
    saved, after = losses(runs / "saved-2x2"), losses(runs / resumed)
    assert after[:3] == saved  # the resumed run's metrics continue the saved run's
    assert_losses_close(after, losses(runs / "single-bf16-sr"), TOLERANCE["bf16-sr"])


# ---- without processes ------------------------------------------------------------------------------------


def _plan(world: int, *args: str):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world)}
    return parallel_plan(load_config(None, parse_overrides(list(args))), env)


def test_the_layout_names_its_degrees_and_the_data_parallel_ranks():
    plan = _plan(8, "--parallelism.tp=2", "--parallelism.dp_shard=2", "--parallelism.dp_replicate=-1")
    assert (plan.dp_replicate, plan.dp_shard, plan.tp, plan.dp_size) == (2, 2, 2, 4)
    plan = _plan(4, "--parallelism.tp=2")  # dp_shard -1: every rank tp leaves
    assert (plan.dp_shard, plan.tp, plan.dp_rank) == (2, 2, 0)
    env = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4"}
    assert parallel_plan(load_config(None, {"parallelism.tp": "2"}), env).dp_rank == 1  # tp innermost


@pytest.mark.parametrize(
    "world, args, message",
    [
        (3, ["--parallelism.tp=2"], "tp = 2 does not divide the 3 process"),
        (4, ["--parallelism.tp=2", "--parallelism.dp_shard=1", "--parallelism.dp_replicate=1"], "tp must equal"),
        (4, ["--parallelism.tp=2", "--parallelism.dp_shard=1", "--parallelism.dp_replicate=2"], "DDP does not take"),
        (2, ["--parallelism.tp=0"], "parallelism.tp"),
    ],
)
def test_layouts_that_cannot_run_are_refused_before_anything_starts(world, args, message):
    with pytest.raises(ConfigError, match=message):
        _plan(world, *args)


@pytest.mark.parametrize(
    "tp, seq, names",
    [(4, 32, ["2 key/value heads"]), (3, 32, ["4 attention heads", "2 key/value heads", "32 tokens"])],
)
def test_a_tp_that_does_not_divide_the_model_names_what_it_does_not_divide(tp, seq, names):
    from leantrain.model import model_args
    from leantrain.parallel import check_tensor_parallel

    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(model_args("debug"), tp, seq)
    for name in names:
        assert name in str(e.value)
    check_tensor_parallel(model_args("debug"), 2, seq)  # 4 heads, 2 kv heads, ffn 192, seq 32: all divisible by 2


def test_quantized_moments_resume_only_on_the_layout_that_cut_their_blocks():
    from leantrain.checkpoint import check_layout

    info = {"step": 3, "layout": {"dp_shard": 2, "tp": 2}}
    check_layout("ckpt", info, {"dp_shard": 2, "tp": 2}, "int8")
    check_layout("ckpt", info, {"dp_shard": 4, "tp": 1}, "bfloat16")  # not quantized: DCP reshards it
    with pytest.raises(CheckpointError, match="dp_shard=2 and tp=2"):
        check_layout("ckpt", info, {"dp_shard": 4, "tp": 1}, "int8")


def test_the_planner_divides_the_split_matrices_by_tp_and_the_norms_by_dp_shard_only():
    from leantrain.model import FLAVORS
    from leantrain.plan import plan

    cfg = load_config(None, {"model.flavor": "70B", "data.seq_len": "8192", "data.local_batch_size": "1"})
    by_tp = plan(cfg, ["bf16-sr"], dp_shard=1, gpu_memory=80 * 2**30, tp=8)["recipes"]
    by_fsdp = plan(cfg, ["bf16-sr"], dp_shard=8, gpu_memory=80 * 2**30)["recipes"]
    assert list(by_tp) == ["bf16-sr", "bf16-sr + in_backward"]
    a = FLAVORS["70B"]
    h_kv = a.n_kv_heads * a.dim // a.n_heads
    split = a.n_layers * (2 * a.dim * a.dim + 2 * h_kv * a.dim + 3 * a.dim * a.ffn_dim) + 2 * a.vocab_size * a.dim
    norms = (2 * a.n_layers + 1) * a.dim  # not split over tp
    assert by_tp["bf16-sr"]["state_bytes_per_gpu"]["params"] == 2 * (split // 8 + norms)
    assert by_fsdp["bf16-sr"]["state_bytes_per_gpu"]["params"] == -(-2 * (split + norms) // 8)
    # sequence parallelism: the blocks' activations by tp, but not the gathered inputs
    assert by_tp["bf16-sr"]["activation_bytes_per_gpu"] < by_fsdp["bf16-sr"]["activation_bytes_per_gpu"] / 4
