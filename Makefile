# hvd-largebatch: `make run` (the demo job) and `make test` (installs everything, then the suite).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hvd-largebatch-installed
NATIVE_SOURCES := $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cuh csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp)
PYTEST_ARGS ?=
# check-gpu runs with the machine's own interpreter (a lent GPU machine has CUDA torch, no venv)
PYTHON ?= python3
CHECK_GPU_ARGS ?=

.PHONY: install run test bench check-gpu clean distclean

install: $(STAMP)

# the stamp is written by install.sh only after every step succeeded
$(STAMP): scripts/install.sh setup.py pyproject.toml $(NATIVE_SOURCES)
	bash scripts/install.sh

# the demo: Smith et al.'s schedules on scikit-learn's digits, 2 Horovod ranks (hvd_largebatch/training/demo.py)
run: install
	$(PY) -m hvd_largebatch.cli demo

test: install
	$(PY) -m pytest -q --timeout=600 $(PYTEST_ARGS) tests

bench: install
	@for b in benchmarks/bench_*.py; do echo "=== $$b"; $(PY) $$b || exit 1; done

# on a GPU machine, no install: build in place, CUDA tests, benchmarks, Horovod/DALI when present,
# one report (scripts/check_gpu.py); without a CUDA device it stops with one line saying why
check-gpu:
	$(PYTHON) scripts/check_gpu.py $(CHECK_GPU_ARGS)

clean:
	rm -rf build *.egg-info hvd_largebatch/*.so .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
