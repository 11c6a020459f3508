"""When things go wrong, in real `leantrain` processes: NaN/Inf steps, stop signals, kill -9 mid-save, bad input,
and files that would run code if they were unpickled.

The bad-input fault matrix. Every case runs `leantrain` as a subprocess and checks exit code 2, a message on
stderr that names the file or key, no traceback, and (the cases here) that nothing is written in the run's folder.
A train into a folder that holds another run is refused before any input is read, every file kept
(test_train.py::test_a_run_without_checkpoints_keeps_its_final_weights..., test_checkpoint.py::
test_a_finished_run_is_not_rewritten...); a write that fails mid-run (test_a_failed_write_stops_with_exit_2...)
stops with exit 2, the previous checkpoint resumable:

    case                                        test
    missing data file                           test_train.py::test_bad_input_exits_2...[missing_data]
    unreadable data file                        here, [unreadable_data]
    all-whitespace .txt corpus                  test_train.py::test_bad_input_exits_2...[empty_data]
    .jsonl of blank lines                       here, [empty_jsonl]
    invalid UTF-8                               here, test_invalid_utf8... (decoded with U+FFFD and a warning
                                                naming the file: a choice, documented in data.py; exit 0)
    .jsonl line that is not JSON                here, [jsonl_not_json]
    .jsonl line without "text"                  here, [jsonl_without_text]
    documents shorter than data.seq_len         here, [too_short]
    a tokenizer file that is not a tokenizer    here, [not_a_tokenizer]
    a vocab larger than the model's             test_train.py::test_bad_input_exits_2...[vocab_too_small]
    an HF folder with a missing shard           here, [hf_missing_shard]
    an HF folder with pickle (.bin) weights     here, test_pickle_payloads... (and test_hf.py for the hint)
    a dump folder that is not writable          test_train.py::test_bad_input_exits_2...[unwritable_folder]
    a checkpoint from another model or recipe   test_checkpoint.py::test_mismatched_or_damaged_checkpoint...
                                                (flavor, recipe; also truncated, deleted, incomplete files;
                                                through cli.main, with the folder snapshot compared)
    unknown key, bad value, contradiction,      test_train.py::test_bad_input_exits_2...;
    missing config file                         random keys and values: test_config_fuzz.py (hypothesis)
"""

import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_leantrain
from leantrain import checkpoint, guard
from leantrain.cli import main
from leantrain.errors import TrainingDiverged
from leantrain.metrics import MetricsLogger

pytestmark = pytest.mark.faults

STEPS = 30
# Checkpoints every 4 steps and at step 30; eval at 10, 20, 30; every step logged.
BASE = [
    *TINY,
    "--metrics.log_freq=1",
    "--eval.interval=10",
    "--checkpoint.enable=true",
    "--checkpoint.interval=4",
    f"--training.steps={STEPS}",
]


def _env(**extra: str) -> dict:
    # The thread count of run_leantrain, so that these runs and the reference compute the same bits.
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **extra}


FAULTS_RUNNER = os.path.join(ROOT, "tests", "faults_runner.py")


def start_leantrain(folder: Path, *args: str, faults: tuple[str, ...] = ()) -> subprocess.Popen:
    """`leantrain train` in the background (with ``faults``: tests/faults_runner.py's options), its stdout and
    stderr in files beside the run folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    out, err = open(f"{folder}.stdout", "w"), open(f"{folder}.stderr", "w")
    return subprocess.Popen(
        [sys.executable, FAULTS_RUNNER, *faults, "train", *args, f"--job.dump_folder={folder}"],
        stdout=out,
        stderr=err,
        env=_env(),
        cwd=ROOT,
    )


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None and not condition():  # (it may have exited right after meeting it)
            raise AssertionError(f"leantrain exited (code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def strict_jsonl(path: Path) -> list[dict]:
    """Every line is a JSON object (no torn line, no NaN/Infinity, which are not JSON)."""

    def no_constants(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def per_step(folder: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("eval_loss"))
        for r in strict_jsonl(folder / "metrics.jsonl")
    ]


def flat_tensors(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def same_weights(a: Path, b: Path) -> bool:
    (ma, _), (mb, _) = checkpoint.load_model(a), checkpoint.load_model(b)
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of BASE: what every interrupted and resumed run must reproduce bit for bit."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    r = run_leantrain("train", *BASE, f"--job.dump_folder={folder}")
    assert r.returncode == 0, r.stderr
    return folder


# ---- non-finite steps ------------------------------------------------------------------------------


def test_a_nonfinite_step_is_skipped_and_training_continues(tmp_path):
    folder = tmp_path / "run"
    args = [
        *TINY,
        "--metrics.log_freq=2",
        "--eval.interval=0",
        "--training.steps=5",
        "--checkpoint.enable=true",
        "--checkpoint.interval=1",
        f"--job.dump_folder={folder}",
    ]
    r = subprocess.run(
        [sys.executable, FAULTS_RUNNER, "--nonfinite-steps=3", "train", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "step 3: loss" in r.stderr and "gradient norm inf" in r.stderr and "skipped" in r.stderr
    records = {rec["step"]: rec for rec in strict_jsonl(folder / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3, 4, 5]  # a skipped step is logged whatever metrics.log_freq says
    assert records[3]["skipped"] is True and records[3]["grad_norm"] is None and records[3]["loss"] > 5
    assert [records[s].get("skipped_nonfinite") for s in (1, 2, 3, 4, 5)] == [None, None, 1, 1, 1]
    assert not any(records[s].get("skipped") for s in (1, 2, 4, 5))
    assert records[4]["lr"] < records[3]["lr"]  # the schedule moved on: skipped steps count
    # The skipped update changed nothing: the weights and every optimizer buffer (and its random generator)
    # after step 3 are those after step 2. Step 4 trained again.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = {}
    for step in (2, 3, 4):
        dcp_to_torch_save(folder / "checkpoints" / f"step-{step}", tmp_path / f"{step}.pt")
        states[step] = flat_tensors(torch.load(tmp_path / f"{step}.pt", weights_only=True))
    kept = [k for k in states[2] if k.startswith(("model.", "optimizer.state."))]
    assert len(kept) > 50 and any(k.endswith("exp_avg_sq") for k in kept)
    assert all(torch.equal(states[2][k], states[3][k]) for k in kept)
    assert not torch.equal(states[3]["model.output.weight"], states[4]["model.output.weight"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_loss"] > 0 and summary["skipped_nonfinite_steps"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop_with_exit_3(tmp_path):
    """No test hook: a learning rate of 1e30 makes the weights huge after step 1, and every later gradient NaN."""
    folder = tmp_path / "run"
    r = run_leantrain(
        "train",
        *TINY,
        "--lr_scheduler.warmup_steps=0",
        "--optimizer.lr=1e30",
        "--training.steps=20",
        "--training.max_nonfinite_steps=3",
        "--metrics.log_freq=5",
        f"--job.dump_folder={folder}",
    )
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    message = " ".join(r.stderr.split())
    assert "leantrain: error: Training diverged" in message and "steps 2 to 4" in message
    assert "training.max_nonfinite_steps = 3" in message and "optimizer.lr" in message
    assert "which already hold NaN/Inf" not in message  # huge (lr 1e30) but finite: the claim stays plain
    records = strict_jsonl(folder / "metrics.jsonl")
    assert [rec["step"] for rec in records] == [1, 2, 3, 4]
    assert [rec.get("skipped", False) for rec in records] == [False, True, True, True]
    assert not (folder / "summary.json").exists()


def test_no_checkpoint_is_written_from_nonfinite_weights(tmp_path):
    from test_checkpoint import checkpointer, make_state, tiny_config

    cfg = tiny_config(tmp_path)
    state, saver = make_state(cfg), checkpointer(cfg)
    state.step = 1
    saver.save(state)
    with torch.no_grad():
        state.model.layers[0].attention.wq.weight[0, 0] = float("nan")
    state.step = 2
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf after step 2.*latest complete checkpoint is .*step-1"):
        saver.save(state)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-1"]


def test_a_torn_last_metrics_line_is_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    logger = MetricsLogger(str(tmp_path))  # checkpointing off: appends to the file as it is
    logger.log({"step": 2, "loss": 4.0})
    logger.close()
    assert strict_jsonl(path) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]


# ---- stop signals and kill -9 ----------------------------------------------------------------------


def test_sigterm_saves_exits_0_and_the_run_resumes_exactly(tmp_path, reference):
    folder = tmp_path / "run"
    proc = start_leantrain(folder, *BASE)
    metrics = folder / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc, "3 logged steps")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # delivered twice at once (process group + torchrun): one request
    stdout = Path(f"{folder}.stdout")
    wait_for(lambda: "stopped by SIGTERM" in stdout.read_text(), proc, "the stop message")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # late copies, landing while Python shuts down:
        proc.send_signal(signal.SIGTERM)  # ignored too (this failed in CI)
        time.sleep(0.02)
    assert proc.wait(timeout=120) == 0, Path(f"{folder}.stderr").read_text()
    out = stdout.read_text()
    stopped = [r["step"] for r in strict_jsonl(metrics)][-1]
    assert 3 <= stopped < STEPS, "the run ended before the signal: make it longer"
    saved = folder / "checkpoints" / f"step-{stopped}"
    assert f"stopped by SIGTERM after step {stopped} of {STEPS}; saved checkpoint {saved}" in out
    assert "SIGTERM received" in Path(f"{folder}.stderr").read_text()
    assert (saved / "leantrain.json").exists() and not (folder / "summary.json").exists()
    # The same command again resumes from that checkpoint and ends where the uninterrupted run ended.
    r = run_leantrain("train", *BASE, f"--job.dump_folder={folder}")
    assert r.returncode == 0, r.stderr
    assert f"resuming from checkpoint {saved} at step {stopped}" in r.stdout
    assert per_step(folder) == per_step(reference)  # loss, grad norm, lr and eval loss, bit for bit
    assert same_weights(folder, reference)


def test_kill_9_mid_save_leaves_the_previous_checkpoint_and_resumes_exactly(tmp_path, reference):
    folder = tmp_path / "run"
    proc = start_leantrain(folder, *BASE, faults=("--pause-in-save=8",))
    tmp = folder / "checkpoints" / "step-8.tmp"
    wait_for(lambda: (tmp / ".metadata").exists(), proc, "the save of step 8")
    proc.kill()  # SIGKILL, while step-8.tmp holds DCP's files but no leantrain.json yet
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-4", "step-8.tmp"]
    assert [r["step"] for r in strict_jsonl(folder / "metrics.jsonl")] == list(range(1, 8))
    with open(folder / "metrics.jsonl", "a") as f:  # as if the kill had landed in the middle of a line
        f.write('{"step": 8, "loss": 5.2')
    r = run_leantrain("train", *BASE, f"--job.dump_folder={folder}")
    assert r.returncode == 0, r.stderr
    assert "ignoring incomplete checkpoint(s) step-8.tmp" in r.stdout and "step-4 at step 4" in r.stdout
    assert per_step(folder) == per_step(reference)  # strict JSON lines, and the same values
    assert sorted(os.listdir(folder / "checkpoints")) == sorted(os.listdir(reference / "checkpoints"))
    assert same_weights(folder, reference)


def test_a_second_signal_exits_at_once_and_damages_nothing(tmp_path):
    folder = tmp_path / "run"
    proc = start_leantrain(folder, *BASE, faults=("--pause-in-save=8",))
    wait_for(lambda: (folder / "checkpoints" / "step-8.tmp" / ".metadata").exists(), proc, "the save of step 8")
    proc.send_signal(signal.SIGTERM)  # the first: finish the step (here: the save in progress), then stop
    stderr = Path(f"{folder}.stderr")
    wait_for(lambda: "SIGTERM received" in stderr.read_text(), proc, "the first signal's message")
    time.sleep(guard.SAME_REQUEST_S + 0.2)  # closer to the first, it would be the same request delivered twice
    proc.send_signal(signal.SIGINT)  # the second: now
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    assert "SIGINT again: exiting now" in stderr.read_text() and "Traceback" not in stderr.read_text()
    assert sorted(os.listdir(folder / "checkpoints")) == ["step-4", "step-8.tmp"]
    assert [r["step"] for r in strict_jsonl(folder / "metrics.jsonl")] == list(range(1, 8))
    assert checkpoint.load_model(folder)[1]["step"] == 4  # the latest complete checkpoint loads


# ---- bad input -------------------------------------------------------------------------------------


def _write_case(case: str, tmp: Path) -> tuple[list[str], list[str]]:
    """(options that make the case, texts the error message must contain)."""
    if case == "unreadable_data":
        # chmod does not stop root; reading /proc/self/mem at offset 0 fails for everyone (EIO).
        (tmp / "locked.txt").symlink_to("/proc/self/mem")
        return [f"--data.path={tmp / 'locked.txt'}"], ["locked.txt", "cannot be read"]
    if case == "empty_jsonl":
        (tmp / "e.jsonl").write_text("\n  \n\n")
        return [f"--data.path={tmp / 'e.jsonl'}"], ["e.jsonl", "no text"]
    if case == "jsonl_not_json":
        (tmp / "d.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
        return [f"--data.path={tmp / 'd.jsonl'}"], ["d.jsonl:2", "not valid JSON"]
    if case == "jsonl_without_text":
        (tmp / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
        return [f"--data.path={tmp / 'd.jsonl'}"], ["d.jsonl:2", '"text"', "'body'"]
    if case == "too_short":
        (tmp / "short.txt").write_text("A corpus of a few words.\n\nAnd a second paragraph.\n")
        return [f"--data.path={tmp / 'short.txt'}"], ["data.seq_len", "tokens"]
    if case == "not_a_tokenizer":
        (tmp / "tokenizer.json").write_text('{"hello": "world"}')
        return [f"--tokenizer.path={tmp / 'tokenizer.json'}"], ["tokenizer.json"]
    if case == "hf_missing_shard":
        import leantrain

        model = leantrain.build_model("debug", dtype=torch.float32, vocab_size=300, max_seq_len=64)
        leantrain.save_hf(model, tmp / "hf", max_shard_bytes=40_000)
        shards = sorted((tmp / "hf").glob("model-*.safetensors"))
        assert len(shards) > 2
        shards[1].unlink()
        return [f"--model.hf_checkpoint={tmp / 'hf'}", "--tokenizer.path=byte"], [shards[1].name, "does not exist"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "unreadable_data",
        "empty_jsonl",
        "jsonl_not_json",
        "jsonl_without_text",
        "too_short",
        "not_a_tokenizer",
        "hf_missing_shard",
    ],
)
def test_bad_input_exits_2_names_the_file_and_writes_nothing(tmp_path, case):
    if case == "unreadable_data" and not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux /proc")
    args, expected = _write_case(case, tmp_path)
    # Into a new folder (a train into a finished run's folder is refused before any input is read:
    # test_train.py::test_a_run_without_checkpoints_keeps_its_final_weights...): the input's own error, and
    # nothing written there.
    fresh = tmp_path / "fresh"
    r = run_leantrain("train", *BASE, "--checkpoint.enable=false", *args, f"--job.dump_folder={fresh}")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("leantrain: error:") or "\nleantrain: error:" in r.stderr
    assert "Traceback" not in r.stderr
    message = " ".join(r.stderr.split())
    assert all(text in message for text in expected), message
    assert not any(p.is_file() for p in fresh.rglob("*"))


def test_invalid_utf8_is_replaced_with_a_warning_naming_the_file(tmp_path):
    data = tmp_path / "scraped.txt"
    data.write_bytes(b"Some text with a bad byte \xff here and a cut one \xc3" * 100)
    r = run_leantrain(
        "train",
        *TINY,
        "--training.steps=1",
        "--eval.interval=0",
        f"--data.path={data}",
        f"--job.dump_folder={tmp_path / 'run'}",
    )
    assert r.returncode == 0, r.stderr
    message = " ".join(r.stderr.split())
    assert "scraped.txt" in message and "not valid UTF-8" in message and "replaced with U+FFFD" in message


# ---- untrusted files -------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _replace_checkpoint(step_dir: Path, state: dict) -> None:
    """Rewrite a checkpoint's DCP files with ``state`` and list them in its leantrain.json as a real save does."""
    import torch.distributed.checkpoint as dcp

    info = json.loads((step_dir / "leantrain.json").read_text())
    for f in step_dir.iterdir():
        f.unlink()
    dcp.save(state, checkpoint_id=str(step_dir))
    info["files"] = {f.name: f.stat().st_size for f in step_dir.iterdir()}
    (step_dir / "leantrain.json").write_text(json.dumps(info))


def test_pickle_payloads_are_refused_without_running(tmp_path, reference):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import leantrain

    marker = tmp_path / "payload-ran"
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()  # the payload is real: plain unpickling runs it

    # 1. A Hugging Face folder with pickle weights (train and eval): refused, only safetensors are read.
    hf = tmp_path / "hf"
    leantrain.save_hf(leantrain.build_model("debug", vocab_size=300, max_seq_len=64), hf)
    (hf / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    r = run_leantrain(
        "train",
        *TINY,
        "--training.steps=1",
        f"--model.hf_checkpoint={hf}",
        "--tokenizer.path=byte",
        f"--job.dump_folder={tmp_path / 'hf-run'}",
    )
    assert r.returncode == 2 and "pytorch_model.bin" in r.stderr and "safetensors" in r.stderr, r.stderr
    assert main(["eval", f"--model.hf_checkpoint={hf}", "--tokenizer.path=byte"]) == 2

    # 2. A checkpoint whose DCP .metadata (a pickle) carries the payload: resume, eval and export refuse it.
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    latest = run / "checkpoints" / f"step-{STEPS}"
    (latest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    info = json.loads((latest / "leantrain.json").read_text())
    info["files"][".metadata"] = (latest / ".metadata").stat().st_size
    (latest / "leantrain.json").write_text(json.dumps(info))
    before = snapshot(run)
    r = run_leantrain("train", *BASE, f"--training.steps={STEPS + 1}", f"--job.dump_folder={run}")  # resumes
    assert r.returncode == 2, (r.stdout, r.stderr)
    message = " ".join(r.stderr.split())
    assert "not safe to load" in message and "posix.system" in message and "trust" in message, message
    assert main(["eval", "--checkpoint", str(latest)]) == 2
    assert main(["export", "--checkpoint", str(latest), "--out", str(tmp_path / "exported")]) == 2
    assert not (tmp_path / "exported" / "config.json").exists()
    assert snapshot(run) == before

    # 3. A checkpoint whose data file carries the payload in a non-tensor entry ("step"), which DCP's own
    # loader would unpickle with torch.load(weights_only=False).
    shutil.rmtree(run)
    shutil.copytree(reference, run)
    latest = run / "checkpoints" / f"step-{STEPS}"
    dcp_to_torch_save(latest, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["step"] = Payload(marker)
    _replace_checkpoint(latest, state)
    dcp.load({"step": 0}, checkpoint_id=str(latest))  # DCP itself runs it
    assert marker.exists()
    marker.unlink()
    before = snapshot(run)
    r = run_leantrain("train", *BASE, f"--training.steps={STEPS + 1}", f"--job.dump_folder={run}")  # resumes
    assert r.returncode == 2, (r.stdout, r.stderr)
    message = " ".join(r.stderr.split())
    assert "not safe to load" in message and "'step'" in message and "posix.system" in message, message
    assert snapshot(run) == before

    assert not marker.exists()  # leantrain never ran the payload


def test_the_package_unpickles_nothing_unrestricted():
    """Every torch.load passes weights_only=True; no pickle.load(s); one Unpickler, the restricted metadata one."""
    import ast

    unpicklers = []
    for path in Path(ROOT, "leantrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                unpicklers += [
                    f"{path.name}:{node.name}" for base in node.bases if ast.unparse(base).endswith("Unpickler")
                ]
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler"), f"{path.name}: {name}"
            if name == "torch.load":
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert flags.get("weights_only") == "True", f"{path.name}: {ast.unparse(node)}"
    assert unpicklers == ["reading.py:_MetadataUnpickler"]


# ---- failed writes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what, limit, first_missing",
    [
        ("checkpoint", "6:100000", 8),  # from step 6 no file may pass 100 kB: the 1 MiB step-8 checkpoint cannot
        ("metrics", "6:1500", None),  # ... or 1.5 kB: metrics.jsonl cannot take its next line
    ],
)
def test_a_failed_write_stops_with_exit_2_and_the_previous_checkpoint_resumes(
    tmp_path, reference, what, limit, first_missing
):
    folder = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, FAULTS_RUNNER, f"--file-size-limit={limit}", "train", *BASE, f"--job.dump_folder={folder}"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    message = " ".join(r.stderr.split())
    # The cause as the writer saw it: the OS's EFBIG for a plain write, or, when the limit is crossed inside one of
    # DCP's torch.save'd items, PyTorchStreamWriter's own check of the bytes it could not write
    cause = "File too large" in message or "unexpected pos" in message
    assert "leantrain: error: Writing" in message and cause and "Traceback" not in r.stderr
    assert "intact" in message and "run the same command again" in message
    checkpoints = sorted(os.listdir(folder / "checkpoints"))
    assert "step-4" in checkpoints and not any(name.endswith(".tmp") for name in checkpoints)
    if first_missing:
        assert f"step-{first_missing}" not in checkpoints
    strict_jsonl(folder / "metrics.jsonl")  # whole lines only
    assert checkpoint.load_model(folder / "checkpoints" / "step-4")[1]["step"] == 4
    # Space again: the same command resumes from the latest complete checkpoint and ends as if nothing happened.
    r = run_leantrain("train", *BASE, f"--job.dump_folder={folder}")
    assert r.returncode == 0, r.stderr
    assert per_step(folder) == per_step(reference)


def test_a_stop_message_names_a_command_that_really_resumes(tmp_path):
    """Without job.dump_folder the same command would start afresh in a new runs/<timestamp>: the message names
    the folder to pass instead of promising a resume that would not happen."""
    args = [*TINY, "--metrics.log_freq=1", "--checkpoint.enable=true", "--training.steps=40", "--eval.interval=0"]
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "leantrain", "train", *args], stdout=out, stderr=err, env=_env(), cwd=tmp_path
    )
    wait_for(
        lambda: (
            any(tmp_path.glob("runs/*/metrics.jsonl"))
            and len(next(tmp_path.glob("runs/*/metrics.jsonl")).read_text().splitlines()) >= 2
        ),
        proc,
        "2 logged steps",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "stderr").read_text()
    text = " ".join((tmp_path / "stdout").read_text().split())
    assert "stopped by SIGTERM" in text, "the run ended before the signal: make it longer"
    folder = next(tmp_path.glob("runs/*")).relative_to(tmp_path)
    assert f"To resume from it, run the same command with --job.dump_folder={folder}" in text
    assert "Run the same command again" not in text
    r = subprocess.run(
        [sys.executable, "-m", "leantrain", "train", *args, f"--job.dump_folder={folder}"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0 and "resuming from checkpoint" in r.stdout, r.stderr


def test_the_divergence_message_does_not_call_nan_weights_the_weights_of_a_good_step():
    nonfinite = guard.NonFiniteGuard(2)
    for step in (1, 2, 3):  # step 1 finite, then two NaN steps
        nonfinite.check(step, torch.tensor(float("nan") if step > 1 else 1.0), torch.tensor(1.0))
    with pytest.raises(TrainingDiverged, match=r"after step 1, which already hold NaN/Inf"):
        nonfinite.raise_diverged(weights_finite=False)
