# FinStack Tasks: `make run` serves the API, `make test` proves it on SQLite and PostgreSQL, `make check` is the quick loop.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=
OPENAPI_SERVER ?= http://127.0.0.1:5000

.PHONY: help install browser run lint format test test-sqlite test-postgres check fuzz openapi db-upgrade db-check bench bench-outbox soak clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "Python 3.11 or newer is needed: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed  ## Create .venv and install the runtime requirements

# `apt-get install` of Debian packages, as root or through sudo; the package lists are refreshed only when needed.
APT_INSTALL = SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1) || \
	{ $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1); }

browser:  ## Install Debian's Chromium and ChromeDriver for the browser tests, when missing (`make test` does)
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { $(call APT_INSTALL,chromium chromium-driver); }

run: $(VENV)/.installed  ## Serve the API on http://127.0.0.1:5000 (SQLite unless DATABASE_URL says otherwise)
	$(BIN)/python app.py

lint: $(VENV)/.dev-installed  ## Check style and common mistakes with ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev-installed  ## Rewrite the code in the project's style
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A selection that only one database runs (PYTEST_ARGS="-k query_plans": PostgreSQL only) leaves the other run
# with pytest's exit code 5, no tests collected: no failure then. Without a selection, a run that collects nothing fails.
PYTEST = $(BIN)/python -m pytest $(PYTEST_ARGS)$(if $(strip $(PYTEST_ARGS)), || [ $$? -eq 5 ])

test: lint browser  ## Lint, then the whole suite on SQLite and on PostgreSQL at once (under 8 min on 2 cores)
	@echo "The suite on SQLite and on PostgreSQL at once: each run's output follows when it ends."
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-sqlite test-postgres

test-sqlite: $(VENV)/.dev-installed browser  ## Run the suite on SQLite only
	env -u TEST_DATABASE_URL $(PYTEST)

test-postgres: $(VENV)/.dev-installed browser  ## Run the suite on PostgreSQL only (TEST_DATABASE_URL)
	TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(PYTEST)

check: lint  ## Lint, then the fast in-process tests on SQLite (no servers, no processes, nothing slow): under 90 s
	env -u TEST_DATABASE_URL $(BIN)/python -m pytest -n auto -m "not slow" $(PYTEST_ARGS)

fuzz: $(VENV)/.dev-installed  ## A longer schemathesis campaign: 300 examples per operation, a new seed each run
	@seed=$${FUZZ_SEED:-$$(date +%s)}; echo "FUZZ_SEED=$$seed"; \
	FUZZ_SEED=$$seed FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} env -u TEST_DATABASE_URL \
		$(BIN)/python -m pytest tests/test_fuzz.py $(PYTEST_ARGS)

openapi: $(VENV)/.installed  ## Write the OpenAPI document to openapi.json (for Postman and other tools)
	@scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
		DATABASE_URL="sqlite:///$$scratch/openapi.db" INSTANCE_PATH="$$scratch" FLASK_SKIP_DOTENV=1 \
		$(BIN)/flask openapi --server $(OPENAPI_SERVER) > "$$scratch/openapi.json" && \
		mv "$$scratch/openapi.json" openapi.json && echo "Wrote openapi.json"

db-upgrade: $(VENV)/.installed  ## Apply migrations to DATABASE_URL (what production runs before gunicorn)
	$(BIN)/flask db upgrade

db-check: $(VENV)/.installed  ## Fail if the models and the migrations disagree (checked on a scratch database)
	@scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
		export DATABASE_URL="sqlite:///$$scratch/check.db" INSTANCE_PATH="$$scratch" FLASK_SKIP_DOTENV=1 && \
		$(BIN)/flask db upgrade && $(BIN)/flask db check

$(VENV)/.bench-installed: requirements.txt requirements-bench.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	@touch $@ $(VENV)/.installed

# Debian's wrk, the load generator of `make bench` and `make soak`: installed when missing.
INSTALL_WRK = command -v wrk >/dev/null || { $(call APT_INSTALL,wrk); }

bench: $(VENV)/.bench-installed  ## Benchmark beside a minimal app, targets as ratios, then the outbox (~15 min): bench/results.md, bench/profile.md, bench/outbox.md (BENCH_ARGS=--quick)
	@$(INSTALL_WRK)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/outbox.py $(OUTBOX_ARGS)

bench-outbox: $(VENV)/.bench-installed  ## The outbox on PostgreSQL, Redis, 2 Celery workers and an SMTP sink (~3 min): bench/outbox.md (OUTBOX_ARGS=--messages 1000)
	$(BIN)/python bench/outbox.py $(OUTBOX_ARGS)

soak: $(VENV)/.bench-installed  ## Mixed traffic for 3 min: memory per worker flat, no errors (~4 min): bench/soak.md (SOAK_ARGS=--quick)
	@$(INSTALL_WRK)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:  ## Remove the virtualenv, caches and the development database
	rm -rf $(VENV) .pytest_cache instance
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
