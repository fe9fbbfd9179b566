# Influence search: the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast lint openapi client bench peer-venv bench-peer load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# PORT=N serves on another port (default 8000).
PORT ?= 8000
demo: $(STAMP)
	$(BIN)/influence demo --port $(PORT)

# System packages the tests drive for real: nginx (tests/deploy gateway) and chromium
# (tests/ui). CI runs as root on Debian; elsewhere, install them yourself.
system-deps:
	@missing=""; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	for dict in freedict-eng-deu freedict-eng-fra vera; do \
	  test -f /usr/share/dictd/$$dict.index || missing="$$missing dict-$$dict"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "system-deps: please install:$$missing"; fi; \
	fi

# Exit code 5 (no tests collected) is a failure of intent, not a pass.
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q --durations=25 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff format --check encoder indexer engine service api evaluation tests benchmarks deploy
	$(BIN)/ruff check encoder indexer engine service api evaluation tests benchmarks deploy
	$(BIN)/mypy

openapi: $(STAMP)
	$(BIN)/influence openapi --out api/openapi.json

# A typed Python client from api/openapi.json (openapi-python-client): an installable project
# in CLIENT_OUT (`pip install ./influence-client` wherever it is used). The venv's bin goes
# first on PATH: the generator formats its output with the venv's ruff.
CLIENT_OUT ?= influence-client
client: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/openapi-python-client generate --path api/openapi.json \
	  --config api/client-config.yaml --output-path $(CLIENT_OUT) --meta setup --overwrite

# Locust through the nginx gateway to 2 local replicas of the demo index (built and cached
# in .demo like `make demo`), at 1/8/32 users plus a failover run; writes
# benchmarks/results/load_gateway.{md,json}. LOAD_ARGS passes options (e.g. --quick).
load: $(STAMP) system-deps
	$(BIN)/python -m deploy.load $(LOAD_ARGS)

# Encoding (the default and the paper's fingerprint vs a plain training step), approximate
# search (IVF-PQ + exact re-rank vs Flat) and the service (local uvicorn on 127.0.0.1:
# latency split, QPS and p50/p99 at concurrency 1/4/16, batching on/off); writes
# benchmarks/results/bench_*.{md,json}. BENCH_ARGS passes options to each (e.g. --quick).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_encode $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.bench_search $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.bench_service $(BENCH_ARGS)

# The peer (bergson 2.5.1) for benchmarks/bench_peer.py only, in its own venv: the pinned CPU
# torch first, its other dependencies, then bergson without the ones it does not use here
# (torchvision, torchaudio, bitsandbytes). Never a test or runtime dependency.
PEER_VENV := .bench/bergson-venv
peer-venv:
	test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q "torch==2.13.0"
	$(PEER_VENV)/bin/pip install -q accelerate datasets jinja2 "jaxtyping>=0.3.3" ml_dtypes natsort numpy scipy \
		"peft>=0.17.0" petname pyarrow pyyaml simple-parsing torchopt "transformers>=5.0" "huggingface-hub>=1.13.0" safetensors
	$(PEER_VENV)/bin/pip install -q --no-deps "bergson==2.5.1"

bench-peer: $(STAMP)
	$(BIN)/python -m benchmarks.bench_peer $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .demo
