# Every target CI and developers use. `make run` and `make test` install into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/medbatch.toml
PYTEST_ARGS ?=

.PHONY: install run once test test-unit test-system lint format bench clean

$(STAMP): pyproject.toml tests/plugins/example_processor/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e tests/plugins/example_processor
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/medbatch run --config $(CONFIG)

once: $(STAMP)
	$(BIN)/medbatch run --once --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-system: $(STAMP)
	$(BIN)/python -m pytest tests/system $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
