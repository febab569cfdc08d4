# Two commands: `make run` and `make test`. Everything else here is what they are made of.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps test-deps protos check-protos lint typecheck pytest lock clean bench bench-writer loadtest

run: setup
	$(BIN)/python -m gateway.dev.run

test: setup test-deps check-protos lint typecheck pytest

setup: $(STAMP) system-deps

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

system-deps:
	@bash scripts/system_deps.sh

# What only the tests need besides: promtool (alert rules) and kubectl (kustomize).
test-deps:
	@bash scripts/system_deps.sh --tests

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest's exit code 5 ("no tests collected") is a failure here like any other non-zero code.
pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The ledger writer's throughput into Postgres (fsync on) and the drain time of a 100,000-event backlog.
# The side-by-side benchmark: ceiling, redeem, stream, peer (Postgres row locks), redis; see BENCHMARKS.md.
bench: setup
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

bench-writer: setup
	$(BIN)/python -m loadtest.bench_writer

# Issuance: codes generated and loaded per second end to end for 1,000,000 codes, and Redis bytes per code.
bench-issuance: setup
	$(BIN)/python -m loadtest.bench_issuance $(BENCH_ISSUANCE_ARGS)

# Inventory: secrets dispensed per second (1 and 10 per order), ours vs a Postgres SKIP LOCKED peer, duplicates checked.
bench-inventory: setup
	$(BIN)/python -m loadtest.bench_inventory --markdown $(BENCH_INVENTORY_ARGS)

# Locust scenarios (launch peak, hot codes, attacker, mixed) against a throw-away local stack, 30 s by default;
# CSV and HTML reports in loadtest/results/. E.g. LOADTEST_ARGS="--users 80 --duration 120 --scenarios LaunchPeak".
loadtest: setup
	$(BIN)/python -m loadtest.run_loadtest $(LOADTEST_ARGS)

# Regenerate the lock files after changing dependencies in pyproject.toml (needs network access to PyPI):
# requirements.lock (runtime + dev group: the venv `make setup` builds) and requirements-runtime.lock (the runtime
# dependencies only, at the very versions of requirements.lock: what the container image installs).
lock:
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv==0.13.8
	$(BIN)/uv pip compile pyproject.toml --group dev --generate-hashes --python-version 3.11 --no-header -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml -c requirements.lock --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header -o requirements-runtime.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
