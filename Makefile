# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH pins the local CPU build; override e.g. `make test TORCH=torch==2.14.1`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint pytest matrix bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when the venv has none, so an override or a CUDA build is kept.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test,plot,canary,train,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/densenet-debug diff --threads 1  # many small ops: one thread avoids OpenMP oversubscription

lint: setup
	$(VENV)/bin/ruff check densenet_debug tests scripts

# Test processes (pytest-xdist), one file per process at a time (a file's module fixtures are computed once);
# CI has 2 cores, and every test runs torch on one thread (tests/conftest.py). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
pytest: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: lint pytest

# The tests marked slow (the canary's full training, BC-100 diffs and fixtures), which make test deselects.
test-slow: setup
	$(PY) -m pytest -q -m slow -n $(PYTEST_WORKERS) --dist loadfile

# One virtualenv per torch release under .nox/ (~8 GB of disk for the two default releases); exits non-zero
# when any cell is not agree, and work/matrix.md marks the cells that changed between releases.
matrix: setup
	$(VENV)/bin/nox -f noxfile.py

bench: setup
	$(PY) scripts/bench.py all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
