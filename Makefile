# hvd-largebatch: `make run` (the demo job) and `make test` (installs everything, then the suite).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hvd-largebatch-installed
NATIVE_SOURCES := $(wildcard csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.cuh)
PYTEST_ARGS ?=

.PHONY: install test bench clean distclean

install: $(STAMP)

# the stamp is written by install.sh only after every step succeeded
$(STAMP): scripts/install.sh setup.py pyproject.toml $(NATIVE_SOURCES)
	bash scripts/install.sh

test: install
	$(PY) -m pytest -q --timeout=600 $(PYTEST_ARGS) tests

bench: install
	@for b in benchmarks/bench_*.py; do echo "=== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info hvd_largebatch/*.so .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
