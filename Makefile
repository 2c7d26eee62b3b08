# loupe: every target that needs Python first makes sure the virtual environment is complete.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loupe-installed
PYTEST_ARGS ?=

.PHONY: setup check lint format test test-all bench bench-gpu bench-placement demo protos clean

setup: $(STAMP)

# pip at -qq prints errors only: package indexes configured on a machine that lack a package
# otherwise print one warning per package and index (over a hundred lines); errors still show and
# still stop the set-up.
PIP_INSTALL := $(PY) -m pip install --quiet --quiet --disable-pip-version-check

# torch first, pinned, so that pip takes the CPU build on disk instead of a CUDA download.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
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

# on a CUDA machine: end to end with central inference for 1..N actors, learner only (fp32 and bf16,
# 1..#GPUs learners), IG and evaluation levels/s, in about 6 minutes; without CUDA it says so, exit 2
bench-gpu: setup
	$(VENV)/bin/loupe bench --gpu --out bench/gpu.json

# actor (lag 1) vs central inference, 5 seeds x 160k CoinRun steps each, classic PPO; then the actor
# placement again with decoupled PPO (about 70 min on 2 cores in all); resumable, finished runs are kept
bench-placement: setup
	$(VENV)/bin/loupe compare-placements --seeds 1 2 3 4 5 --proximal behaviour --out bench/placement
	$(VENV)/bin/loupe compare-placements --seeds 1 2 3 4 5 --proximal learner --placements actor \
		--out bench/placement-decoupled

demo: setup
	$(VENV)/bin/loupe demo

# regenerate the committed loupe.v1 gRPC stubs from loupe/service/proto/loupe/v1/*.proto
protos: setup
	$(PY) -m loupe.service.gen_protos

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
