# emotr: `make demo` runs the whole job on the demo data set, `make test` runs lint and the tests.
# Both create or reuse .venv and install what they need first (pinned by requirements.lock).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= conf/demo.yaml

.PHONY: help install demo test test-fast lint format ui bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# PYTHONWARNINGS: setuptools' notice on every editable install (folders named like the package
# may shadow it on imports) is advice, not a problem of this layout: kept off the console.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' \
		$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install emotr with its pinned dependencies

demo: $(STAMP)  ## Run extract -> tune -> register on the synthetic demo set (offline weights)
	$(BIN)/emotr run -c $(CONFIG)

test: lint  ## Lint, then all tests (unit + integration with real Ray and mlflow server)
	$(BIN)/pytest -q -m "not gpu" --timeout 900

test-fast: $(STAMP)  ## The unit tests alone (no Ray, no servers): under a minute
	$(BIN)/pytest -q tests/unit -m "not slow and not gpu" --timeout 120

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: $(STAMP)  ## Open the MLflow UI on the local tracking store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///.emotr/mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)  ## Run the benchmark jobs into .emotr/bench/ (DOCS=1: append to docs/benchmarks.md too)
	$(BIN)/python jobs/bench_extract.py $(if $(DOCS),--docs)
	$(BIN)/python jobs/bench_startup.py $(if $(DOCS),--docs)
	$(BIN)/python jobs/bench_tune.py $(if $(DOCS),--docs)
	$(BIN)/python jobs/bench_predict.py $(if $(DOCS),--docs)
	$(BIN)/python jobs/bench_listing.py $(if $(DOCS),--docs)
	$(BIN)/python jobs/bench_scaling.py $(if $(DOCS),--docs)
	$(BIN)/python jobs/bench_taps.py $(if $(DOCS),--docs)

clean:  ## Delete local runs, caches and the demo data (.emotr/)
	rm -rf .emotr
