# The README's two commands live here: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned here (not in pyproject) because 2.13.0 is the CPU wheel on this machine's disk;
# a bare `torch` requirement would pull a multi-GB CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"

demo: setup
	$(BIN)/edgeseg demo --work-dir work_dirs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) work_dirs
