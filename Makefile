# Every target CI and developers use. The venv is built on first use, in two parts:
#   `make run` / `make once` / `make install`: only what the service needs (pip install -e .);
#   `make dev` (and so test, lint, bench): adds the dev tools and the test plug-ins
#   (tests/plugins/example_processor, which registers the `linecount` and `faulty` kinds).
# Separate stamps, so `make test` after `make run` adds only the dev part.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# The benchmarks run the service as `make run` installs it, in a venv of their own without the
# dev tools (import-linter's `rich`, for one, is imported by structlog at every process start
# where it is installed), plus polars and Dask for the side-by-side runs and py-spy.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-bench
# -qq: no progress bars or notices; errors are still printed (and fail the target).
PIP := $(BIN)/python -m pip --quiet --quiet
CONFIG ?= config/medbatch.toml
PYTEST_ARGS ?=

.PHONY: install dev bytecode run once test test-unit test-system test-acceptance lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP) pyproject.toml tests/plugins/example_processor/pyproject.toml
	$(PIP) install -e '.[dev]' -e tests/plugins/example_processor
	touch $@

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip --quiet --quiet install --upgrade pip
	$(BENCH_VENV)/bin/python -m pip --quiet --quiet install -e '.[bench]'
	touch $@

install: $(RUN_STAMP)

# The package's bytecode, written ahead (an editable install writes none, and where
# PYTHONDONTWRITEBYTECODE is set, as in many container images, Python never writes it): every
# start of the service and of each worker process would otherwise compile ~100 modules again
# (~50 ms each). Up-to-date files are skipped, so this costs a few ms when nothing changed.
bytecode: $(RUN_STAMP)
	$(BIN)/python -m compileall -q daemon

dev: $(DEV_STAMP)

run: bytecode
	$(BIN)/medbatch run --config $(CONFIG)

once: bytecode
	$(BIN)/medbatch run --once --config $(CONFIG)

# Two processes (the machine's two cores); the acceptance tier's tests stay in one of them.
test: $(DEV_STAMP) bytecode
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-unit: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-system: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/system $(PYTEST_ARGS)

test-acceptance: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/acceptance $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(DEV_STAMP)
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

bench: $(BENCH_STAMP) bytecode
	$(BENCH_VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
