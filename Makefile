# Every target sets itself up: a fresh clone needs nothing but Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench base clean

# uv installs the same pinned set as pip in 75-95 s instead of about 3 minutes (measured on
# 2 cores, bytecode compilation included); it reads pip's find-links (where this machine keeps its CPU torch wheel) from
# UV_FIND_LINKS. --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (it is on
# this machine), nothing else writes .pyc files, and every process (each test's subprocesses,
# the servers) would compile torch, diffusers and mlflow again: 20 s of imports instead of 8.
# Where uv cannot be installed, pip does the same job.
UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
export UV_FIND_LINKS
REQUIREMENTS := -c constraints.txt -e ".[dev,server]"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	( $(BIN)/python -m pip install --quiet "uv>=0.5,<1" \
	    && $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(REQUIREMENTS) ) \
	  || $(BIN)/python -m pip install --quiet $(REQUIREMENTS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fairdiffusion demo

# pytest-xdist: one worker per core (at most 4); a test file stays on one worker, since some
# files' tests build on each other's state. `pytest` alone runs the same tests in one process.
test: $(STAMP)
	$(BIN)/python -m pytest --numprocesses auto --maxprocesses 4 --dist loadfile

# Developers only, once per base-model change: pretrain, then version it next to the data.
base: $(STAMP)
	$(BIN)/fairdiffusion base build --out base-model
	$(BIN)/dvc add base-model
	$(BIN)/dvc push base-model.dvc

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_demo.py

clean:
	rm -rf outputs .pytest_cache
