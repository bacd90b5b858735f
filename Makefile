# `make test` and `make demo` create .venv when there is none and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: install test test-fast lint demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration and not e2e"

lint: install
	$(BIN)/ruff check dydit_dist jobs tests benchmarks

clean:
	rm -rf outputs .pytest_cache
