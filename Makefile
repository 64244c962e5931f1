# FinStack Tasks: `make run` serves the API, `make test` proves it on SQLite and PostgreSQL.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/test
PYTEST_ARGS ?=
OPENAPI_SERVER ?= http://127.0.0.1:5000

.PHONY: help install browser run lint format test test-sqlite test-postgres fuzz openapi db-upgrade db-check bench soak clean

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

browser:  ## Install Debian's Chromium and ChromeDriver for the browser tests (needs root or sudo)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "Chromium and ChromeDriver are installed"; \
	else SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get install -y --no-install-recommends chromium chromium-driver || \
		{ $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }; fi

run: $(VENV)/.installed  ## Serve the API on http://127.0.0.1:5000 (SQLite unless DATABASE_URL says otherwise)
	$(BIN)/python app.py

lint: $(VENV)/.dev-installed  ## Check style and common mistakes with ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev-installed  ## Rewrite the code in the project's style
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint test-sqlite test-postgres  ## Lint, then run the whole suite on SQLite and on PostgreSQL

test-sqlite: $(VENV)/.dev-installed  ## Run the suite on SQLite only
	env -u TEST_DATABASE_URL $(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: $(VENV)/.dev-installed  ## Run the suite on PostgreSQL only (TEST_DATABASE_URL)
	TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python -m pytest $(PYTEST_ARGS)

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
INSTALL_WRK = command -v wrk >/dev/null || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	$$SUDO apt-get install -y --no-install-recommends wrk || \
	{ $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends wrk; }; }

bench: $(VENV)/.bench-installed  ## Benchmark on PostgreSQL with gunicorn and wrk (~7 min): bench/results.md (BENCH_ARGS=--quick)
	@$(INSTALL_WRK)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

soak: $(VENV)/.bench-installed  ## Mixed traffic for 3 min: memory per worker flat, no errors (~4 min): bench/soak.md (SOAK_ARGS=--quick)
	@$(INSTALL_WRK)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:  ## Remove the virtualenv, caches and the development database
	rm -rf $(VENV) .pytest_cache instance
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
