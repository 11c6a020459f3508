import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny, fast run: the debug flavor on the built-in corpus.
TINY = [
    "--model.flavor=debug",
    "--data.seq_len=64",
    "--data.local_batch_size=4",
    "--eval.steps=2",
    "--metrics.progress=false",
    "--lr_scheduler.warmup_steps=2",
    "--compile.enable=false",
]


def run_leantrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m leantrain ARGS` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, "-m", "leantrain", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def _to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`leantrain ARGS` called in this process (leantrain.cli.main, as the console script does) with its output
    captured, for the cases where a fresh process proves nothing more (bad input, the planner, state bytes).
    warn_once forgets what it warned about, so that each call warns as a fresh process would."""
    import contextlib
    import io

    from leantrain import config
    from leantrain.cli import main

    config._warned.clear()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # leantrain's warnings to stderr, as in a process of its own
        warnings.showwarning = _to_stderr  # (not to pytest's recorder)
        code = main(list(args))
    return subprocess.CompletedProcess(["leantrain", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def leantrain_cli():
    return run_leantrain


# ---- several processes: tests/test_distributed.py and tests/test_tensor_parallel.py ------------------------------

# 5 steps of the debug model at lr 3e-3, logged each step; every run of both modules starts from these arguments.
DIST_STEPS = 5
DIST_COMMON = [
    "--model.flavor=debug",
    "--compile.enable=false",
    "--data.seq_len=32",
    "--eval.steps=1",
    "--metrics.progress=false",
    "--lr_scheduler.warmup_steps=2",
    f"--training.steps={DIST_STEPS}",
    "--metrics.log_freq=1",
    "--eval.interval=0",
    "--optimizer.lr=3e-3",
]


def train_reference(*args: str) -> None:
    """A single-process reference run, in this process, on one thread as each torchrun worker runs:
    DIST_COMMON, then ``args``."""
    import torch

    from leantrain.config import load_config, parse_overrides
    from leantrain.runplan import resolve
    from leantrain.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(resolve(load_config(None, parse_overrides([*DIST_COMMON, *args]))))
    finally:
        torch.set_num_threads(threads)


def losses(folder) -> list[float]:
    """Every logged step's loss of a run."""
    from leantrain.metrics import read_metrics

    return [r["loss"] for r in read_metrics(os.path.join(folder, "metrics.jsonl"))]


def assert_losses_close(got: list[float], want: list[float], rel: float) -> None:
    """Step by step within a relative tolerance of the single-process run's."""
    assert len(got) == len(want), (got, want)
    worst = max(abs(g - w) / w for g, w in zip(got, want))
    assert worst <= rel, f"losses {got} vs one process {want}: relative difference {worst:.2e} > {rel:.0e}"


def torchrun_jobs(nproc: int, jobs: list[list[str]], path) -> None:
    """Train every job (a list of `--section.key=value` arguments) in one torchrun launch of `nproc` gloo ranks
    (tests/distributed_jobs.py: the process start-up is paid once); `path`: where the jobs' JSON goes."""
    import json

    with open(path, "w") as f:
        json.dump(jobs, f)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "tests", "distributed_jobs.py"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


# ---- the tiers: `make test-fast` runs what none of these markers names (pyproject.toml registers them) -------


@pytest.fixture(autouse=True)
def _compiles_only_where_marked(request):
    """A test that compiles in this process must carry the `compile` marker, so that the fast tier stays free of
    compiling (the trainer compiles by default: tests that do not mean to pass --compile.enable=false)."""
    from leantrain.parallel import compile_seconds

    before = compile_seconds()
    yield
    if compile_seconds() > before and request.node.get_closest_marker("compile") is None:
        pytest.fail(
            "this test ran torch.compile without the `compile` marker: mark it, or pass "
            "--compile.enable=false (compile.enable defaults to auto, which compiles)"
        )
