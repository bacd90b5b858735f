# `make test` and `make demo` create .venv when there is none and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: install test test-fast lint demo clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml cluster/image/requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -c cluster/image/requirements.lock -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration and not e2e"

lint: install
	$(BIN)/ruff check dydit_dist jobs tests benchmarks cluster/image

clean:
	rm -rf outputs .pytest_cache

# The whole pipeline offline on a tiny model (scikit-learn digits, local Ray, ./outputs as object
# storage): prepare -> pretrain -> DyDiT fine-tune (2 workers, ZeRO-2) -> sample -> evaluate -> report.
# A second run skips every stage whose outputs exist; `make clean` starts over.
demo: install
	$(BIN)/python -m jobs.reproduce --config demo storage.root=file://$(CURDIR)/outputs

# One GPU check on a bare H100/H200 (README, "GPU check"): writes benchmarks/results/gpu_check.{json,md}.
# Uses the Python that is already there (no .venv, no Ray); `make gpu-check ARGS=--smoke` runs on CPU.
# DS_ACCELERATOR=cpu (exported above for the CPU tests) is removed: DeepSpeed must pick the GPU.
gpu-check:
	env -u DS_ACCELERATOR PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_check.py $(ARGS)
