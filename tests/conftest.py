import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny, fast run: the debug flavor on the built-in corpus.
TINY = ["--model.flavor=debug", "--data.seq_len=64", "--data.local_batch_size=4", "--eval.steps=2",
        "--metrics.progress=false", "--lr_scheduler.warmup_steps=2"]


def run_leantrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m leantrain ARGS` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "leantrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture
def leantrain_cli():
    return run_leantrain
