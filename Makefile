# `make demo` and `make test` do all the set-up on a fresh machine: venv, packages, then the job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# The PyTorch builds this project is tested with (CUDA builds, which also run on the CPU).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# FFCV compiles against these system libraries (found by pkg-config).
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: install install-all system-deps demo test test-fast check-loaders lint bench clean

# the core: enough for `ddmim train` on folders and the demo
$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PINS) -e '.[dev]'
	touch $@

# everything: FFCV (built from source) and DALI too, which the tests exercise
$(BIN)/.installed-all: $(BIN)/.installed
	$(MAKE) system-deps
	$(PIP) $(TORCH_PINS) -e '.[dev,ffcv,dali]'
	touch $@

system-deps:
	@if pkg-config --exists libturbojpeg opencv4 2>/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	else \
		echo "FFCV needs: $(APT_PACKAGES) (Debian names); install them as root, then run make again" >&2; exit 1; \
	fi

install: $(BIN)/.installed
install-all: $(BIN)/.installed-all

demo: install
	$(BIN)/ddmim demo

# one pytest-xdist worker per core (conftest gives each one core's threads); worksteal: the long tests end unevenly
PYTEST := $(BIN)/python -m pytest -q -n auto --dist worksteal

test: install-all
	$(PYTEST) tests

test-fast: install-all
	$(PYTEST) -m "not slow" tests

# each ddmim training loader against its plain library (torchvision, FFCV, DALI), each in its own processes,
# alternating rounds; fails when the median per-round ratio is below 0.85x (single rounds spread by about 20%
# on a 2-core machine)
check-loaders: install-all
	$(BIN)/python benchmarks/compare_loaders.py --images 1024 --rounds 5 --epochs 3 --guard 0.85 \
		--json $(or $(TMPDIR),/tmp)/ddmim-loader-guard.json

lint: install
	$(BIN)/ruff check .

bench: install-all
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/bench_loaders.py

clean:
	rm -rf $(VENV) runs
