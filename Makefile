# `make train` and `make test` set up .venv on a fresh machine (Python 3.11, no torch), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the pinned CPU build of PyTorch; where CUDA is present the user's own torch is kept.
TORCH_CPU := torch==2.13.0

.PHONY: train test setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m leantrain train $(ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
