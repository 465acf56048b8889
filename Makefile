# `make demo` and `make test` do all the set-up on a fresh machine: venv, packages, then the job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch builds this project is tested with (CUDA builds, which also run on the CPU).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PINS) -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/ddmim train --no-progress

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs
