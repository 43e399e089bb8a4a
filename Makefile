# emotr: `make demo` runs the whole job on the demo data set, `make test` runs lint and the tests.
# Both create or reuse .venv and install what they need first (pinned by requirements.lock).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= conf/demo.yaml

.PHONY: help install demo test lint format ui bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install emotr with its pinned dependencies

demo: $(STAMP)  ## Run extract -> tune -> register on the synthetic demo set (offline weights)
	$(BIN)/emotr run -c $(CONFIG)

test: lint  ## Lint, then all tests (unit + integration with real Ray and mlflow server)
	$(BIN)/pytest -q -m "not gpu" --timeout 900

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: $(STAMP)  ## Open the MLflow UI on the local tracking store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///.emotr/mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)  ## Run the benchmark jobs; results are appended to docs/benchmarks.md
	$(BIN)/python jobs/bench_extract.py
	$(BIN)/python jobs/bench_tune.py

clean:  ## Delete local runs, caches and the demo data (.emotr/)
	rm -rf .emotr
