"""`leantrain` with faults injected through leantrain.hooks, for the fault tests (a real process to kill or signal).

    python tests/faults_runner.py [--crash-in-save=N] [--pause-in-save=N] [--nonfinite-steps=3,5-7] train ARGS...

--crash-in-save=N   the process exits (code 1) in the middle of saving step N: DCP's files written, not the rest
--pause-in-save=N   it sleeps there (an hour), for a test to signal or kill it mid-save
--nonfinite-steps   the gradient norm of those steps is Inf, as if a gradient had overflowed (the gradients stay
                    finite, so an update that was not skipped would show)
--file-size-limit=STEP:BYTES
                    from step STEP on, no file may grow past BYTES (RLIMIT_FSIZE: a real failed write, EFBIG, as a
                    full disk gives ENOSPC; root is not exempt, unlike from permissions)
Everything else is `leantrain`'s command line, and the exit code is leantrain's.
"""

import math
import os
import resource
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leantrain.cli import main  # noqa: E402
from leantrain.hooks import Hooks  # noqa: E402


def parse_steps(spec: str) -> set[int]:
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


class InjectedFaults(Hooks):
    def __init__(
        self,
        crash_in_save: int | None,
        pause_in_save: int | None,
        nonfinite_steps: set[int],
        file_size_limit: tuple[int, int] | None = None,
    ):
        self.crash_in_save, self.pause_in_save, self.nonfinite_steps = crash_in_save, pause_in_save, nonfinite_steps
        self.file_size_limit = file_size_limit

    def checkpoint_written(self, step: int) -> None:
        if step == self.crash_in_save:
            os._exit(1)
        if step == self.pause_in_save:
            time.sleep(3600)

    def grad_norm(self, step: int, norm: torch.Tensor) -> torch.Tensor:
        if self.file_size_limit and step == self.file_size_limit[0]:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit[1], resource.RLIM_INFINITY))
        return torch.full_like(norm, math.inf) if step in self.nonfinite_steps else norm


def run(argv: list[str]) -> int:
    options = {"crash-in-save": None, "pause-in-save": None, "nonfinite-steps": "", "file-size-limit": ""}
    while argv and argv[0].startswith("--") and argv[0][2:].split("=")[0] in options:
        name, _, value = argv.pop(0)[2:].partition("=")
        options[name] = value
    hooks = InjectedFaults(
        int(options["crash-in-save"]) if options["crash-in-save"] else None,
        int(options["pause-in-save"]) if options["pause-in-save"] else None,
        parse_steps(options["nonfinite-steps"]),
        tuple(map(int, options["file-size-limit"].split(":"))) if options["file-size-limit"] else None,
    )
    return main(argv, hooks=hooks)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
