# The README's two commands: `make run` and `make test`. Both create the virtualenv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/allocd demo

test: $(STAMP) lint tools
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check daemon tests
	$(BIN)/ruff format --check daemon tests
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m tests.bench

chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --minutes 10

clean:
	rm -rf $(VENV) .pytest_cache .tools

include mk/deploy.mk
