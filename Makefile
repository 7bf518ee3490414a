# One entry point for people and CI. Needs only python3 (3.11+) on the PATH.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test chaos check lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install  ## run the jobs against the simulator and a local PostgreSQL
	$(BIN)/ingest_admin demo

test: install  ## the test suite, against a real PostgreSQL
	$(BIN)/pytest

chaos: install  ## the chaos suite: both jobs killed, faulted and cut off, invariants checked
	$(BIN)/pytest -m chaos

lint: install
	$(BIN)/ruff format --check options cli tests benchmarks
	$(BIN)/ruff check options cli tests benchmarks
	$(BIN)/mypy

check: lint test chaos  ## what CI runs

bench: install  ## both benchmarks (see README); the snapshot baseline needs the official client
	$(BIN)/pip install --quiet --disable-pip-version-check massive==2.9.1
	$(BIN)/python benchmarks/bench_contracts.py
	$(BIN)/python benchmarks/bench_snapshots.py

clean:
	rm -rf $(VENV) .local
