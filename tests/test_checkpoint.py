"""Checkpoints: exact resume (every recipe's state), crash mid-save, 2 ranks -> 1 rank, mismatched and damaged ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_leantrain
from leantrain import checkpoint
from leantrain.cli import main
from leantrain.config import load_config
from leantrain.data import ByteTokenizer, PackedDataset, load_documents
from leantrain.errors import CheckpointError
from leantrain.metrics import read_metrics
from leantrain import parallel
from leantrain.config import RECIPES
from leantrain.precision import cross_entropy
from leantrain.runplan import resolve
from leantrain.train import build_checkpointer, build_state

DOCS = load_documents("builtin")[:40]


def make_state(cfg, rank=0, world_size=1):
    """What train() builds (leantrain.train.build_state), on one device, with the training data of a small corpus
    (this rank's part of each global batch)."""
    plan = resolve(cfg, env={})
    data = PackedDataset(
        DOCS,
        ByteTokenizer(),
        cfg.data.seq_len,
        cfg.data.local_batch_size,
        cfg.job.seed,
        rank=rank,
        world_size=world_size,
    )
    return build_state(plan, parallel.Distributed(plan.parallel), data, ByteTokenizer())


def checkpointer(cfg):
    return build_checkpointer(resolve(cfg, env={}))


def train_steps(state, n, all_reduce=False):
    for _ in range(n):
        inputs, labels = state.data.next_batch()
        cross_entropy(state.model(inputs), labels).backward()
        if all_reduce:  # what DDP does: every rank steps with the mean gradient
            import torch.distributed as dist

            for p in state.model.parameters():
                g = p.grad.float()
                dist.all_reduce(g)
                p.grad.copy_(g / dist.get_world_size())
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1


def tiny_config(folder, recipe=None, **extra):
    keys = {
        "model.flavor": "debug",
        "compile.enable": "false",
        "data.seq_len": "32",
        "data.local_batch_size": "2",
        "lr_scheduler.warmup_steps": "1",
        "training.steps": "10",
        "job.dump_folder": str(folder),
        "checkpoint.enable": "true",
        **({"recipe": recipe} if recipe else {}),
        **extra,
    }
    return load_config(None, keys)


# Kahan-compensated bf16 weights with int8 moments (bf16 moments on the small norms): every kind of buffer at once.
KAHAN_INT8 = {"training.dtype": "bfloat16", "optimizer.compensation": "kahan", "optimizer.state_dtype": "int8"}


def assert_same_state(a, b):
    """Two TrainStates hold bitwise the same training state."""
    (ma, oa, sa, da), (mb, ob, sb, db) = [(x.model, x.optimizer, x.scheduler, x.data) for x in (a, b)]
    assert a.step == b.step
    for (name, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert x.dtype == y.dtype and torch.equal(x, y), name
    sda, sdb = oa.state_dict(), ob.state_dict()
    assert sda["param_groups"] == sdb["param_groups"]
    assert sda["state"].keys() == sdb["state"].keys()
    for pid in sda["state"]:
        assert sda["state"][pid].keys() == sdb["state"][pid].keys()
        for buf, x in sda["state"][pid].items():
            y = sdb["state"][pid][buf]
            assert x.dtype == y.dtype and torch.equal(x, y), (pid, buf)
    assert sa.get_last_lr() == sb.get_last_lr() and sa.last_epoch == sb.last_epoch
    assert da.state_dict() == db.state_dict()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_save_and_load_round_trip_every_buffer_of_every_recipe(tmp_path, recipe):
    cfg = tiny_config(tmp_path, recipe)
    a = make_state(cfg)
    train_steps(a, 2)
    path = checkpointer(cfg).save(a)
    assert path.name == "step-2" and not (tmp_path / "checkpoints" / "step-2.tmp").exists()
    b = make_state(cfg)
    checkpointer(cfg).load(b, path)
    assert b.step == 2
    assert_same_state(a, b)
    # and they keep training identically (stochastic rounding draws from the restored generator)
    train_steps(a, 2)
    train_steps(b, 2)
    assert_same_state(a, b)


def _losses(folder):
    records = read_metrics(Path(folder) / "metrics.jsonl")
    return [r["step"] for r in records], [(r["loss"], r["grad_norm"], r["lr"]) for r in records]


@pytest.mark.faults
@pytest.mark.parametrize(
    "recipe", ["fp32", "bf16-sr", "bf16-int8", "bf16-int4", "bf16-int4-int8", "bf16-int8-factored"]
)
def test_crash_mid_save_then_resume_is_bit_identical(tmp_path, recipe):
    args = [
        *TINY,
        f"--recipe={recipe}",
        "--training.steps=6",
        "--metrics.log_freq=1",
        "--eval.interval=3",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = run_leantrain("train", *args, f"--job.dump_folder={whole}")
    assert r.returncode == 0, r.stderr
    # The process dies in the middle of saving step 4: DCP's files are written, the rename is not.
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    crashed = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "faults_runner.py"),
            "--crash-in-save=4",
            "train",
            *args,
            f"--job.dump_folder={cut}",
        ],  # the thread count of run_leantrain
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert crashed.returncode == 1, crashed.stderr
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-2", "step-4.tmp"]
    assert _losses(cut)[0] == [1, 2, 3]  # step 3 was logged after the last complete checkpoint
    # The previous checkpoint is intact and loadable on its own.
    model, info = checkpoint.load_model(cut / "checkpoints" / "step-2")
    assert info["step"] == 2 and info["recipe"] == recipe
    # Started again on the same folder, the run resumes from step 2 by itself and finishes.
    r = run_leantrain("train", *args, f"--job.dump_folder={cut}")
    assert r.returncode == 0, r.stderr
    assert "resuming from checkpoint" in r.stdout and "step-2 at step 2" in r.stdout
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-2", "step-4", "step-6"]
    steps, values = _losses(cut)
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 of the crashed run was dropped, then logged again
    assert values == _losses(whole)[1]  # loss, grad norm and lr, bit for bit
    evals = [r.get("eval_loss") for r in read_metrics(cut / "metrics.jsonl")]
    assert evals == [r.get("eval_loss") for r in read_metrics(whole / "metrics.jsonl")]
    a, _ = checkpoint.load_model(whole)
    b, _ = checkpoint.load_model(cut)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


_WORKER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
import torch
from test_checkpoint import KAHAN_INT8, checkpointer, make_state, tiny_config, train_steps
cfg = tiny_config({folder!r}, **KAHAN_INT8)
state = make_state(cfg, rank=rank, world_size=2)
train_steps(state, 2, all_reduce=True)
checkpointer(cfg).save(state)
if rank == 0:
    model, optimizer, scheduler, data = state.model, state.optimizer, state.scheduler, state.data
    torch.save({{"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": scheduler.get_last_lr(),
                "data": data.state_dict()}}, {folder!r} + "/reference.pt")
dist.destroy_process_group()
"""


@pytest.mark.torchrun
def test_two_rank_save_loads_on_one_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        _WORKER.format(
            root=ROOT, tests=os.path.join(ROOT, "tests"), store=str(tmp_path / "store"), folder=str(tmp_path)
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    path = tmp_path / "checkpoints" / "step-2"
    assert json.loads((path / "leantrain.json").read_text())["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(path))  # both ranks wrote
    cfg = tiny_config(tmp_path, **KAHAN_INT8)
    state = make_state(cfg)  # one rank
    checkpointer(cfg).load(state, path)
    model, optimizer, scheduler, data = state.model, state.optimizer, state.scheduler, state.data
    ref = torch.load(tmp_path / "reference.pt", weights_only=False)
    for name, x in ref["model"].items():
        assert torch.equal(model.state_dict()[name], x), name
    ours = optimizer.state_dict()
    kinds = set()
    for pid, bufs in ref["optimizer"]["state"].items():
        for buf, x in bufs.items():
            kinds.add(buf)
            assert ours["state"][pid][buf].dtype == x.dtype and torch.equal(ours["state"][pid][buf], x), (pid, buf)
    assert {"exp_avg_codes", "exp_avg_sq_scale", "kahan_comp", "exp_avg"} <= kinds  # int8, bf16 and Kahan buffers
    assert scheduler.get_last_lr() == ref["lr"] and data.state_dict() == ref["data"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished bf16-sr run with checkpoints every 2 steps, the last 2 kept, and one at the last step."""
    folder = tmp_path_factory.mktemp("saved") / "run"
    args = [
        *TINY,
        "--recipe=bf16-sr",
        "--training.steps=5",
        "--eval.interval=0",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--checkpoint.keep_latest_k=2",
        f"--job.dump_folder={folder}",
    ]
    assert main(["train", *args]) == 0
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-4", "step-5"]
    return folder, args


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", ["flavor", "recipe", "truncated", "deleted", "no_info"])
def test_mismatched_or_damaged_checkpoint_stops_with_exit_2(saved_run, tmp_path, capsys, case):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(saved_run[0], folder)
    args = [a for a in saved_run[1] if not a.startswith("--job.dump_folder")] + [f"--job.dump_folder={folder}"]
    step5 = folder / "checkpoints" / "step-5"
    if case == "flavor":
        args += ["--model.flavor=small"]
    elif case == "recipe":
        args = [a.replace("bf16-sr", "bf16-int8") for a in args]
    elif case == "truncated":
        data_file = step5 / "__0_0.distcp"
        data_file.write_bytes(data_file.read_bytes()[:1000])
    elif case == "deleted":
        (step5 / "__0_0.distcp").unlink()
    elif case == "no_info":
        (step5 / "leantrain.json").unlink()
    before = _snapshot(folder)
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leantrain: error:") and "Traceback" not in err
    expected = {
        "flavor": ["model.flavor is 'debug' in the checkpoint and 'small' now"],
        "recipe": ["optimizer.state_dtype is 'auto' in the checkpoint and 'int8' now", "bf16-int8"],
        "truncated": ["__0_0.distcp has 1000 bytes instead of", "truncated"],
        "deleted": ["__0_0.distcp is missing"],
        "no_info": ["incomplete", "leantrain.json"],
    }[case]
    flat = " ".join(err.split())
    assert all(text in flat for text in expected), flat
    assert "step-5" in flat
    assert _snapshot(folder) == before  # nothing written, nothing overwritten


@pytest.mark.parametrize(
    "recipe, theirs, resumes",
    [
        ("bf16-int8", None, False),  # the dynamic maps (no "moment_codes" in leantrain.json)
        ("bf16-int8", "companded-1", True),  # int8 codes did not change with companded-2
        ("bf16-int4", "companded-1", False),  # int4 codes paired neighbours in a byte then
    ],
)
def test_quantized_moments_of_earlier_code_maps_are_refused(tmp_path, capsys, recipe, theirs, resumes):
    """A checkpoint whose codes mean other values (the dynamic maps; int4 codes paired differently) would resume
    with wrong moments: exit 2, naming the maps, nothing written. Codes that mean the same values resume."""
    folder = tmp_path / "run"
    args = [
        *TINY,
        f"--recipe={recipe}",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        f"--job.dump_folder={folder}",
    ]
    assert main(["train", *args, "--training.steps=2"]) == 0
    info_file = folder / "checkpoints" / "step-2" / "leantrain.json"
    info = json.loads(info_file.read_text())
    assert info.pop("moment_codes") == "companded-2"
    info_file.write_text(json.dumps(info if theirs is None else {**info, "moment_codes": theirs}))
    before = _snapshot(folder)
    capsys.readouterr()
    assert main(["train", *args, "--training.steps=4"]) == (0 if resumes else 2)
    if resumes:
        return
    flat = " ".join(capsys.readouterr().err.split())
    maps = repr(theirs or "dynamic")
    assert f"Adam moments as codes of the {maps} maps" in flat and "Traceback" not in flat, flat
    assert _snapshot(folder) == before


def test_another_recipes_optimizer_state_is_refused_tensor_by_tensor(saved_run):
    """Even past the config check (the Python API), the tensors themselves are compared before loading."""
    cfg = tiny_config(saved_run[0], "bf16-int8", **{"data.seq_len": "64", "data.local_batch_size": "4"})
    with pytest.raises(CheckpointError) as e:
        checkpointer(cfg).load(make_state(cfg), saved_run[0] / "checkpoints" / "step-5")
    message = str(e.value)
    assert "exp_avg_codes" in message and "not in it" in message and "recipe bf16-sr" in message
    fp32 = tiny_config(saved_run[0], "fp32", **{"data.seq_len": "64", "data.local_batch_size": "4"})
    with pytest.raises(CheckpointError, match=r"bfloat16\[259, 64\] there and float32\[259, 64\] here"):
        checkpointer(fp32).load(make_state(fp32), saved_run[0] / "checkpoints" / "step-5")


@pytest.mark.parametrize("steps", [5, 3])
def test_a_finished_run_is_not_rewritten_and_eval_reads_it(saved_run, tmp_path, capsys, steps):
    """Rerun as it was, or asked for fewer steps than it has: nothing to train, so exit 2 and every file kept."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(saved_run[0], folder)
    args = [a for a in saved_run[1] if not a.startswith(("--job.dump_folder", "--training.steps"))]
    before = _snapshot(folder)
    assert main(["train", *args, f"--training.steps={steps}", f"--job.dump_folder={folder}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has trained 5 steps" in err and f"training.steps = {steps}" in err and "raise training.steps" in err
    assert _snapshot(folder) == before  # summary.json, metrics.jsonl, config.toml and checkpoints as they were
    # leantrain eval on the run folder: its latest checkpoint, the held-out split, JSON in the run folder
    assert main(["eval", "--checkpoint", str(folder), "--eval.steps=3"]) == 0
    result = json.loads((folder / "eval-step-5.json").read_text())
    assert result["step"] == 5 and result["batches"] == 3 and result["tokens"] == 3 * 4 * 64
    assert abs(result["perplexity"] - torch.tensor(result["loss"]).exp().item()) < 1e-3
    assert main(["eval", "--checkpoint", str(folder), "--model.hf_checkpoint", str(folder)]) == 2


def test_extending_a_finished_run_says_what_changed(saved_run, tmp_path, capsys):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(saved_run[0], folder)
    args = [a for a in saved_run[1] if not a.startswith(("--job.dump_folder", "--training.steps"))]
    assert main(["train", *args, "--training.steps=7", f"--job.dump_folder={folder}"]) == 0
    out = capsys.readouterr().out
    assert "training.steps is 5 in the checkpoint and 7 now" in out and "step-5 at step 5" in out
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 5, 7]
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-6", "step-7"]  # interval 2, keep_latest_k=2


def test_a_run_without_a_complete_checkpoint_starts_over_without_duplicate_records(tmp_path, capsys):
    """An attempt that died before its first checkpoint completed: its records are dropped, its .tmp ignored."""
    folder = tmp_path / "run"
    (folder / "checkpoints" / "step-2.tmp").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2)))
    args = [
        *TINY,
        "--training.steps=3",
        "--metrics.log_freq=1",
        "--eval.interval=0",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        f"--job.dump_folder={folder}",
    ]
    assert main(["train", *args]) == 0
    assert "ignoring incomplete checkpoint(s) step-2.tmp" in capsys.readouterr().out
    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] != 9.0 for r in records)
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-2", "step-3"]


@pytest.mark.parametrize("where", ["optimizer", "param_group"])
def test_a_checkpoint_with_the_old_generator_state_still_resumes(tmp_path, where):
    """Checkpoints written before the random bits became a hash (randbits.py) hold the optimizer's generator state,
    at optimizer.rng_state (before TrainState) or in param group 0: such a save resumes into the same state."""
    cfg = tiny_config(tmp_path, "bf16-sr")
    a = make_state(cfg)
    train_steps(a, 2)
    legacy = a.state_dict()
    old_generator = torch.Generator().manual_seed(0).get_state()
    (legacy["optimizer"] if where == "optimizer" else legacy["optimizer"]["param_groups"][0])["rng_state"] = (
        old_generator
    )
    saver = checkpointer(cfg)
    path = saver._write(saver.root / "step-2", legacy, a, 0.0, model_only=False)
    b = make_state(cfg)
    checkpointer(cfg).load(b, path)
    assert_same_state(a, b)
