# make run   — serve DNS on the bundled config.toml (127.0.0.1:5353)
# make test  — the whole test suite
# Both create and use .venv themselves.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# Two stamps: `run` installs the proxy with its runtime extras only; `test` (and lint,
# bench) add the test tools.
RUNTIME := $(VENV)/.installed-run
STAMP   := $(VENV)/.installed

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[doh,http]"
	touch $(RUNTIME)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,doh,http]"
	touch $(STAMP) $(RUNTIME)

run: $(RUNTIME)
	$(BIN)/dnsproxy run -c config.toml

test: $(STAMP)
	$(BIN)/ruff check dnsproxy plugins tests bench examples docs
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dnsproxy plugins tests bench examples docs
	$(BIN)/ruff format --check dnsproxy plugins tests bench examples docs

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
