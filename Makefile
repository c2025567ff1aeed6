# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use, installing torch pinned *before* kvforge so
# pip never resolves torch itself (which would pull the CUDA wheels).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint format clean

$(BIN)/kvforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/kvforge
	$(BIN)/kvforge generate --prompt "def fibonacci(n):" --max-tokens 48

test: $(BIN)/kvforge
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(BIN)/kvforge
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
