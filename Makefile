# One entry point for people and CI. Needs only python3 (3.11+) on the PATH: poetry itself is
# installed into .local/poetry, and the project into .venv from poetry.lock (the locked versions).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
POETRY_VERSION := 2.5.1
POETRY := .local/poetry/bin/poetry
export POETRY_VIRTUALENVS_IN_PROJECT := true

.PHONY: install lock demo test chaos check lint bench clean

install: $(VENV)/.installed

$(POETRY):
	$(PYTHON) -m venv .local/poetry
	.local/poetry/bin/pip install --quiet --disable-pip-version-check poetry==$(POETRY_VERSION)

$(VENV)/.installed: pyproject.toml poetry.lock $(POETRY)
	$(POETRY) env use --quiet $(PYTHON)
	$(POETRY) sync --quiet --all-extras
	touch $@

lock: $(POETRY)  ## after changing dependencies in pyproject.toml: resolve them into poetry.lock
	$(POETRY) lock

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

clean:  ## removes the venv, poetry and the demo's database (.local)
	rm -rf $(VENV) .local
