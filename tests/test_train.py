"""The trainer end to end, in real processes: files written, learning, measured state bytes, bad input."""

import json
import os

import pytest
import torch

from conftest import TINY, run_in_process, run_leantrain
from leantrain.config import load_config
from leantrain.metrics import read_metrics
from leantrain.plan import plan
from leantrain import parallel
from leantrain.data import ByteTokenizer, PackedDataset
from leantrain.runplan import resolve
from leantrain.step import train_step
from leantrain.train import build_state

SPEC_METRICS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s", "peak_memory_bytes"}
# summary.json's keys (the README's 'Training' section), plus the planner's prediction and the count of skipped
# NaN/Inf steps
SUMMARY_KEYS = {
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
    "skipped_nonfinite_steps",
    "small_updates",
}


def test_train_writes_the_run_files_and_learns(tmp_path):
    out = tmp_path / "run"
    r = run_leantrain(
        "train",
        *TINY,
        "--training.steps=60",
        "--optimizer.lr=3e-3",
        "--eval.interval=30",
        "--metrics.log_freq=10",
        f"--job.dump_folder={out}",
    )
    assert r.returncode == 0, r.stderr
    assert {"config.toml", "metrics.jsonl", "summary.json", "loss.png"} <= set(os.listdir(out))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40, 50, 60]
    assert all(SPEC_METRICS <= set(r) for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [30, 60]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["recipe"] == "bf16-sr" and summary["steps"] == 60 and summary["skipped_nonfinite_steps"] == 0
    # It learns: from ln(259) = 5.56 nats at init to well below.
    assert records[0]["loss"] > 5.0
    assert summary["final_eval_loss"] < 0.75 * records[0]["loss"]
    # The written config is the resolved one and loads back as the same run.
    assert load_config(str(out / "config.toml")).training.steps == 60


# The README's recipe table: bytes/param of training state (bf16-int8: 2 x (1 byte code + 4/256 scale) on large
# tensors, bf16 moments on the < 4096-element norms, so about 6.03 on small). bf16-int4-int8:
# bf16-int4's 5.06 with exp_avg_sq's 0.5 + 4/128 bytes per element replaced by int8's 1 + 4/256, about 5.54.
# The factored recipes on `small`: bf16-int8's 6.03 less exp_avg_sq's 1 + 4/256 bytes per element of the blocks'
# matrices (about 0.98 of small's parameters: 5.05), plus their fp32 row and column factors; bf16-int4-int8 likewise.
SPEC_BYTES = {
    "fp32": 16.0,
    "bf16-mixed": 16.0,
    "bf16": 8.0,
    "bf16-fp32state": 12.0,
    "bf16-sr": 8.0,
    "bf16-kahan": 10.0,
    "bf16-int8": 6.03,
    "bf16-int4": 5.06,
    "bf16-int4-int8": 5.55,
    "bf16-int8-factored": 5.05,
    "bf16-int4-int8-factored": 4.57,
}


@pytest.mark.parametrize("recipe", list(SPEC_BYTES))
def test_measured_state_bytes_match_spec_and_plan(tmp_path, recipe):
    out = tmp_path / recipe
    r = run_in_process(
        "train",
        "--model.flavor=small",
        "--compile.enable=false",
        "--data.seq_len=32",
        "--data.local_batch_size=1",
        "--training.steps=1",
        "--eval.steps=1",
        "--metrics.progress=false",
        "--lr_scheduler.warmup_steps=0",
        f"--recipe={recipe}",
        f"--job.dump_folder={out}",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == recipe
    measured = summary["state_bytes_per_param"]
    assert abs(measured - SPEC_BYTES[recipe]) / SPEC_BYTES[recipe] < 0.02
    param_bytes = 2 if recipe.startswith("bf16") and recipe != "bf16-mixed" else 4
    assert summary["state_bytes"]["params"] == summary["num_params"] * param_bytes
    # The planner's figure, from meta tensors, agrees with the live tensors' storage.
    cfg = load_config(None, {"model.flavor": "small", "compile.enable": "false", "data.seq_len": "32"})
    planned = plan(cfg, [recipe], dp_shard=1, gpu_memory=2**40)["recipes"][recipe]
    assert abs(planned["state_bytes_per_param"] - measured) / measured < 0.02
    assert summary["planned_state_bytes"] == planned["state_bytes_per_gpu"]


def test_full_bf16_keeps_every_tensor_of_the_training_state_in_bf16():
    cfg = load_config(None, {"recipe": "bf16", "model.flavor": "debug", "compile.enable": "false"})
    plan = resolve(cfg, env={})
    data = PackedDataset(["some text " * 20], ByteTokenizer(), 16, 2, 0)
    state = build_state(plan, parallel.Distributed(plan.parallel), data, ByteTokenizer())
    model, opt = state.model, state.optimizer
    model(torch.randint(0, 259, (2, 16))).float().mean().backward()
    opt.step()
    for p in model.parameters():
        assert p.dtype == p.grad.dtype == torch.bfloat16
        moments = [v for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
        assert len(moments) == 2 and all(m.dtype == torch.bfloat16 for m in moments)


def test_recipe_flag_and_explicit_keys_give_the_same_run(tmp_path):
    common = [*TINY, "--training.steps=4", "--metrics.log_freq=1", "--eval.interval=0"]
    a = run_in_process("train", *common, "--recipe=bf16-kahan", f"--job.dump_folder={tmp_path / 'a'}")
    b = run_in_process(
        "train",
        *common,
        "--training.dtype=bfloat16",
        "--optimizer.compensation=kahan",
        f"--job.dump_folder={tmp_path / 'b'}",
    )
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert la == lb


def test_help_lists_every_key():
    r = run_in_process("train", "--help")
    assert r.returncode == 0
    assert "--optimizer.compensation" in r.stdout and "stochastic rounding" in r.stdout


@pytest.mark.parametrize(
    "case",
    [
        "missing_data",
        "empty_data",
        "unknown_key",
        "bad_value",
        "contradiction",
        "unwritable_folder",
        "vocab_too_small",
        "missing_config",
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n  ")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = {
        "missing_data": (["--data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        "empty_data": ([f"--data.path={empty}"], "empty.txt"),
        "unknown_key": (["--training.setps=3"], "Did you mean 'training.steps'"),
        "bad_value": (["--training.dtype=fp16"], "training.dtype"),
        "contradiction": (["--recipe=fp32", "--training.dtype=bfloat16"], "recipe 'fp32'"),
        "unwritable_folder": ([f"--job.dump_folder={blocker}/run"], "job.dump_folder"),
        "vocab_too_small": (["--model.vocab_size=100"], "model.vocab_size"),
        "missing_config": (["--config", str(tmp_path / "nope.toml")], "nope.toml"),
    }[case]
    r = run_in_process("train", *TINY, "--training.steps=2", f"--job.dump_folder={tmp_path / 'run'}", *args[0])
    if case == "unwritable_folder":
        r = run_in_process("train", *TINY, "--training.steps=2", *args[0])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("leantrain: error:") and args[1] in r.stderr


def test_plain_bf16_at_low_lr_reports_and_warns_about_lost_updates(tmp_path):
    common = [*TINY, "--training.steps=3", "--metrics.log_freq=1", "--eval.interval=0", "--optimizer.lr=1e-5"]
    r = run_in_process("train", *common, "--recipe=bf16", f"--job.dump_folder={tmp_path / 'plain'}")
    assert r.returncode == 0, r.stderr
    records = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    # lr 1e-5 on weights of about 0.02 (bf16 ulp there: 1.2e-4): nearly every update is rounded away.
    assert all(rec["lost_update_fraction"] > 0.8 for rec in records)  # the rest: weights near 0
    assert r.stderr.count("nearest rounding threw it away") == 1 and "bf16-sr" in r.stderr
    # The compensated recipe reports the meter too, and does not warn.
    r = run_in_process("train", *common, "--recipe=bf16-kahan", f"--job.dump_folder={tmp_path / 'kahan'}")
    assert r.returncode == 0 and "threw it away" not in r.stderr
    records = read_metrics(tmp_path / "kahan" / "metrics.jsonl")
    assert all("compensated_fraction" in rec for rec in records)
    assert records[-1]["compensated_fraction"] > 0.5  # most of what nearest rounding loses, Kahan carries
    # Neither is called lost where nothing is lost, and summary.json says what each recipe does with them.
    assert not any("lost_update_fraction" in rec for rec in records) and "unchanged_update_fraction" in records[0]
    assert json.loads((tmp_path / "kahan" / "summary.json").read_text())["small_updates"].startswith("carried")
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["small_updates"].startswith("lost")


def test_train_step_in_process_and_a_skipped_step_changes_only_the_step_and_the_schedule():
    from leantrain import guard
    from leantrain.hooks import Hooks
    from leantrain.step import StepContext, train_step

    class InfOnStep2(Hooks):
        def grad_norm(self, step, norm):
            return torch.full_like(norm, float("inf")) if step == 2 else norm

    plan = resolve(
        load_config(
            None,
            {"recipe": "bf16-sr", "model.flavor": "debug", "compile.enable": "false", "lr_scheduler.warmup_steps": "1"},
        ),
        env={},
    )
    data = PackedDataset(["some text to train on, " * 40], ByteTokenizer(), 16, 2, 0)
    state = build_state(plan, parallel.Distributed(plan.parallel), data, ByteTokenizer())
    ctx = StepContext(
        plan.precision,
        parallel.Distributed(plan.parallel),
        max_norm=1.0,
        weigh_tokens=False,
        nonfinite=guard.NonFiniteGuard(3),
        hooks=InfOnStep2(),
    )
    first = train_step(state, [data.next_batch()], ctx, count_lost_updates=True)
    assert (first.step, first.finite, state.step) == (1, True, 1) and first.tokens == 2 * 16
    assert first.updates is not None and first.updates.tracked_elements > 0
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(state.optimizer.state.values())}
    second = train_step(state, [data.next_batch()], ctx, count_lost_updates=True)
    assert (second.step, second.finite, second.updates, state.step) == (2, False, None, 2)
    assert all(torch.equal(v, weights[k]) for k, v in state.model.state_dict().items())
    assert all(
        torch.equal(v, moments[i][k]) for i, s in enumerate(state.optimizer.state.values()) for k, v in s.items()
    )
    third = train_step(state, [data.next_batch()], ctx)
    assert third.finite and third.lr < second.lr  # the schedule moved on through the skipped step
    assert not all(torch.equal(v, weights[k]) for k, v in state.model.state_dict().items())


def test_a_run_without_checkpoints_keeps_its_final_weights_and_is_never_mixed_with_another(tmp_path, capsys):
    from leantrain.checkpoint import load_model
    from leantrain.cli import main

    run = tmp_path / "run"
    args = [*TINY, "--training.steps=3", "--eval.interval=0", f"--job.dump_folder={run}"]
    assert main(["train", *args]) == 0
    assert f"the final weights in {run / 'model'}" in capsys.readouterr().out
    model, info = load_model(run)  # the run folder: its final model/ (no checkpoints)
    assert info["step"] == 3 and info["model_only"] and info["path"] == str(run / "model")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for again in (args, [*args, "--training.steps=5"]):  # the same run again, or a longer one: nothing resumes
        assert main(["train", *again]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "already holds a run" in err and "another job.dump_folder" in err and "checkpoint.enable=true" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # export and eval take the run folder as it is
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    assert main(["eval", "--checkpoint", str(run), "--eval.steps=1"]) == 0
    assert json.loads((run / "eval-step-3.json").read_text())["step"] == 3


def test_tensorboard_events_hold_the_logged_numbers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from leantrain.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "--training.steps=3",
                "--metrics.log_freq=1",
                "--eval.interval=3",
                "--metrics.tensorboard=true",
                f"--job.dump_folder={run}",
            ]
        )
        == 0
    )
    events = EventAccumulator(str(run))
    events.Reload()
    records = read_metrics(run / "metrics.jsonl")
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == [
        (r["step"], r["loss"]) for r in records
    ]
    assert [e.step for e in events.Scalars("eval_loss")] == [3]


def test_the_progress_bar_moves_every_step_and_messages_print_above_it(monkeypatch):
    import io
    import sys

    from leantrain.metrics import Progress

    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    progress = Progress(10, enabled=True)
    progress.bar.mininterval = 0  # draw on every update, as a slow real step would
    for step in (1, 2, 3):
        progress.advance(step)
    assert progress.bar.n == 3 and "3/10" in err.getvalue()
    print("leantrain: saved checkpoint x")
    print("leantrain: warning: y", file=sys.stderr)
    progress.close()
    assert sys.stdout is out and sys.stderr is err  # the streams are given back
    assert "leantrain: saved checkpoint x\n" in out.getvalue()
    # every message line starts at the left margin: the bar was cleared first (carriage return, no bar text)
    line = err.getvalue().split("leantrain: warning: y")[0].rsplit("\r", 1)[-1]
    assert line.strip() == ""


def test_a_default_run_then_export_and_generate_on_its_folder_with_no_other_flag(tmp_path, capsys):
    """What the README's Quickstart shows after `make train`: the run folder is all the commands need."""
    from leantrain.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY, "--training.steps=2", "--eval.interval=0", f"--job.dump_folder={run}"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "The list"]) == 0
    assert capsys.readouterr().out.startswith("The list")


def test_top_level_help_version_and_the_name_of_an_hf_run(capsys):
    from leantrain.cli import main
    from leantrain.config import Model
    from leantrain.model import build_model
    from leantrain.loader import model_name as _model_name

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {command} " in out for command in ("train", "compare", "plan", "eval", "export", "generate"))
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("leantrain 0.")
    model = build_model("debug", torch.float32, "meta")
    assert _model_name(Model(hf_checkpoint="models/Qwen2.5-0.5B"), model) == "llama models/Qwen2.5-0.5B"
    assert _model_name(Model(flavor="small"), model) == "llama3 small"  # the title of loss.png and the start line


def _release_state(in_backward: bool, recipe: str = "bf16-sr"):
    """A debug model's TrainState and step context, with or without gradient release, from the same seed."""
    from leantrain import guard
    from leantrain.optim.release import GradientRelease
    from leantrain.step import StepContext

    plan = resolve(
        load_config(
            None,
            {
                "recipe": recipe,
                "model.flavor": "debug",
                "compile.enable": "false",
                "lr_scheduler.warmup_steps": "1",
                "training.max_norm": "0",
                "optimizer.in_backward": str(in_backward).lower(),
            },
        ),
        env={},
    )
    data = PackedDataset(["some text to train on, " * 40], ByteTokenizer(), 16, 2, 0)
    dist = parallel.Distributed(plan.parallel)
    state = build_state(plan, dist, data, ByteTokenizer())
    ctx = StepContext(
        plan.precision,
        dist,
        max_norm=0.0,
        weigh_tokens=False,
        nonfinite=guard.NonFiniteGuard(3),
        release=GradientRelease(state.optimizer) if in_backward else None,
    )
    return state, ctx, data


@pytest.mark.parametrize("recipe", ["bf16-sr", "bf16-int8", "fp32"])
def test_gradient_release_is_bitwise_the_normal_step_and_frees_the_gradients(recipe):
    """optimizer.in_backward with clipping off and no accumulation: the same losses, weights and optimizer state
    bit for bit as updating after the backward, and no gradient is left after a step."""
    results = []
    for in_backward in (False, True):
        state, ctx, data = _release_state(in_backward, recipe)
        losses = [train_step(state, [data.next_batch()], ctx, count_lost_updates=True) for _ in range(4)]
        grads = [p.grad for p in state.model.parameters()]
        results.append(
            (
                [s.loss.item() for s in losses],
                [s.updates for s in losses],
                state,
                grads,
                [s.grad_norm.item() for s in losses],
            )
        )
    (
        (losses, updates, normal, grads, norms),
        (released_losses, released_updates, released, released_grads, released_norms),
    ) = results
    assert released_losses == losses and released_updates == updates
    assert released_norms == pytest.approx(norms, rel=1e-5)  # the norm summed as the gradients are made
    for (name, a), b in zip(normal.model.state_dict().items(), released.model.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(normal.model.parameters(), released.model.parameters()):  # (released: in backward order)
        a, b = normal.optimizer.state[p], released.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(g is not None for g in grads) and all(g is None for g in released_grads)


@pytest.mark.parametrize("recipe", ["bf16-sr", "bf16-kahan", "bf16-int8", "fp32"])
def test_gradient_release_skips_a_nan_loss_and_a_nan_gradient_without_touching_their_weights(recipe):
    """A NaN loss skips the backward (no update at all); a NaN gradient with a finite loss skips that parameter's
    update (weights, moments and step count unchanged: decided on the device, the count taken back after the
    step's sync) while the others are taken; both steps count as skipped, and no NaN reaches any weight or
    moment."""
    state, ctx, data = _release_state(True, recipe)
    train_step(state, [data.next_batch()], ctx)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    moments = {p: {k: v.clone() for k, v in s.items()} for p, s in state.optimizer.state.items()}
    state.model.tok_embeddings.weight.data[0, 0] = float("nan")  # every loss that reads token 0 is NaN...
    nan_batch = (torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    stats = train_step(state, [nan_batch], ctx)
    state.model.tok_embeddings.weight.data[0, 0] = weights["tok_embeddings.weight"][0, 0]
    assert not stats.finite and ctx.nonfinite.total == 1
    assert same(state.model.state_dict(), weights) and all(
        same(s, moments[p]) for p, s in state.optimizer.state.items()
    )
    # A finite loss whose gradient of one matrix is NaN
    target = state.model.layers[0].attention.wq.weight
    handle = target.register_hook(lambda g: torch.full_like(g, float("nan")))
    stats = train_step(state, [data.next_batch()], ctx)
    handle.remove()
    assert torch.isfinite(stats.loss) and not stats.finite and ctx.nonfinite.total == 2
    after = state.model.state_dict()
    assert torch.equal(after["layers.0.attention.wq.weight"], weights["layers.0.attention.wq.weight"])
    assert same(state.optimizer.state[target], moments[target])
    assert not torch.equal(after["layers.0.attention.wk.weight"], weights["layers.0.attention.wk.weight"])
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.isfinite(t.float()).all() for s in state.optimizer.state.values() for t in s.values())
    assert train_step(state, [data.next_batch()], ctx).finite and ctx.nonfinite.consecutive == 0


def test_gradient_release_refuses_accumulation_and_says_what_to_do_instead():
    from leantrain.errors import ConfigError

    with pytest.raises(ConfigError, match="in_backward") as e:
        load_config(None, {"optimizer.in_backward": "true", "training.gradient_accumulation_steps": "2"})
    said = str(e.value)
    assert "training.gradient_accumulation_steps = 2" in said and "data.local_batch_size" in said
    load_config(None, {"optimizer.in_backward": "true", "training.max_norm": "1.0"})  # clipping: accepted


def test_gradient_release_refuses_ddp():
    from leantrain.errors import ConfigError
    from leantrain.runplan import parallel_plan

    cfg = load_config(
        None,
        {
            "optimizer.in_backward": "true",
            "training.max_norm": "0",
            "parallelism.dp_shard": "1",
            "parallelism.dp_replicate": "2",
        },
    )
    with pytest.raises(ConfigError, match="DDP"):
        parallel_plan(cfg, env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
