# loupe: every target that needs Python first makes sure the virtual environment is complete.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loupe-installed
PYTEST_ARGS ?=

.PHONY: setup chromium check lint format test test-all bench bench-gpu bench-peer bench-peer-ig bench-placement soak demo protos clean

setup: $(STAMP) chromium

# Debian's chromium for the explorer's browser tests (Playwright drives it; no browser download)
chromium:
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# pip at -qq prints errors only: package indexes configured on a machine that lack a package
# otherwise print one warning per package and index (over a hundred lines); errors still show and
# still stop the set-up.
PIP_ARGS := -m pip install --quiet --quiet --disable-pip-version-check
PIP_INSTALL := $(PY) $(PIP_ARGS)

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
	$(PY) -m pytest -q -m "not learning and not gpu and not slow" --durations=30 $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/loupe bench --out bench/results.json

# on a CUDA machine: end to end with central inference for 1..N actors, learner only (fp32 and bf16,
# 1..#GPUs learners), IG and evaluation levels/s, in about 6 minutes; without CUDA it says so, exit 2
bench-gpu: setup
	$(VENV)/bin/loupe bench --gpu --out bench/gpu.json

# loupe vs cleanrl's ppo_procgen.py at the same settings, alternated A B A B, plus IG vs Captum
# (2 x 2 runs of 32,768 steps: roughly 15-20 min on an idle 2-core machine; PEER_ARGS="--peer-steps
# 16384" halves it); cleanrl lives in its own environment, PEER_VENV
PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.peer-installed
PEER_ARGS ?=

# cleanrl 1.2.0 declares Python < 3.11 and pins wandb, stable-baselines3 and more that
# ppo_procgen.py does not import: its own imports are installed, then cleanrl without them
$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python $(PIP_ARGS) torch==2.13.0 gym==0.23.1 \
		procgen-mirror==0.10.7 tensorboard "numpy<2"
	$(PEER_VENV)/bin/python $(PIP_ARGS) --no-deps --ignore-requires-python cleanrl==1.2.0
	touch $(PEER_STAMP)

bench-peer: setup $(PEER_STAMP)
	$(VENV)/bin/loupe bench --only peer --only ig_captum --peer-python $(PEER_VENV)/bin/python \
		--out bench/peer.json $(PEER_ARGS)

# the IG part of bench-peer alone (loupe and Captum alternated at B = 16, 64, 256; no cleanrl
# needed): replaces bench/peer.json's ig_captum section and keeps the rest
bench-peer-ig: setup
	$(VENV)/bin/loupe bench --only ig_captum --merge --out bench/peer.json

# actor (lag 1) vs central inference, 5 seeds x 160k CoinRun steps each, classic PPO; then the actor
# placement again with decoupled PPO (about 70 min on 2 cores in all); resumable, finished runs are kept
bench-placement: setup
	$(VENV)/bin/loupe compare-placements --seeds 1 2 3 4 5 --proximal behaviour --out bench/placement
	$(VENV)/bin/loupe compare-placements --seeds 1 2 3 4 5 --proximal learner --placements actor \
		--out bench/placement-decoupled

# billion-step readiness: distributed CoinRun training with 2 rollout actors, a probe worker and the
# run's Redis for SOAK_MINUTES while a rollout actor, the probe worker, redis-server and the learner
# are SIGKILLed in turn; every process sampled. bench/soak.json + bench/soak.png (a benchmark, not a
# test: about SOAK_MINUTES + 3 minutes)
SOAK_MINUTES ?= 20
SOAK_ARGS ?=
soak: setup
	$(VENV)/bin/loupe soak --minutes $(SOAK_MINUTES) --out bench/soak.json --plot bench/soak.png \
		$(SOAK_ARGS)

demo: setup
	$(VENV)/bin/loupe demo

# regenerate the committed loupe.v1 gRPC stubs from loupe/service/proto/loupe/v1/*.proto
protos: setup
	$(PY) -m loupe.service.gen_protos

clean:
	rm -rf $(VENV) $(PEER_VENV) runs .pytest_cache .ruff_cache
