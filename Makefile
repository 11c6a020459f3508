# `make train` and `make test` set up .venv on a fresh machine (Python 3.11, no torch), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the pinned CPU build of PyTorch; where CUDA is present the user's own torch is kept.
TORCH_CPU := torch==2.13.0

.PHONY: train test test-fast lint setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m leantrain train $(ARGS)

# The whole suite runs on 2 pytest-xdist workers, a test module per worker at a time (--dist loadscope: a module's
# shared fixtures, e.g. the distributed runs, are built once): 5.9 minutes against 8.0 in one process on the 2 cores
# here, as much of it waits on subprocesses (torchrun, the command line). The fast tier computes all the time, and
# runs faster in one process (1.8 minutes against 2.9 on 2 workers, which then share the 2 cores' threads).
XDIST := -n 2 --dist loadscope

# Everything: lint, then every test tier, with the 15 slowest tests listed (CI's output shows where time goes).
test: setup lint
	$(PY) -m pytest -q tests $(XDIST) --durations=15

# The inner loop (under 3 minutes on 2 cores): no torchrun, no compile, no fault injection.
test-fast: setup
	$(PY) -m pytest -q tests -m "not torchrun and not compile and not faults"

# ruff's lint rules and its formatter (pyproject.toml's [tool.ruff]); `ruff format leantrain tests benchmarks` fixes
# what the format check finds.
lint: setup
	$(PY) -m ruff check leantrain tests benchmarks
	$(PY) -m ruff format --check leantrain tests benchmarks

clean:
	rm -rf $(VENV) runs
