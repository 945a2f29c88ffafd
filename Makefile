# make run   — serve DNS on the bundled config.toml (127.0.0.1:5353)
# make test  — the whole test suite
# Both create and use .venv themselves.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,doh,http]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dnsproxy run -c config.toml

test: $(STAMP)
	$(BIN)/ruff check dnsproxy plugins tests bench examples
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dnsproxy plugins tests bench examples
	$(BIN)/ruff format --check dnsproxy plugins tests bench examples

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
