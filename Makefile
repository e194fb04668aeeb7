PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
# The torch build: empty (default) takes torch from pip's usual index (PyPI's Linux x86_64 wheel is the CUDA
# build); TORCH=cpu, TORCH=cu128, ... take it from that PyTorch index; TORCH_INDEX_URL=<url> any other index.
TORCH ?=
TORCH_INDEX_URL ?= $(if $(TORCH),https://download.pytorch.org/whl/$(TORCH))
INSTALL := PYTHON='$(PYTHON)' TORCH_INDEX_URL='$(TORCH_INDEX_URL)' scripts/install.sh '$(VENV)'
INSTALL_INPUTS := pyproject.toml client/pyproject.toml constraints.txt scripts/install.sh
# Stamps of the two install levels: the runtime (`make venv`, `make serve`) and the test tools on top of it
# (`make test`, `make lint`, ...); `make test` after `make serve` only adds the test extras.
RUNTIME := $(VENV)/.advserve-runtime
DEV := $(VENV)/.advserve-dev

.PHONY: venv dev serve test lint docs bench proto clean loadtest analysis

venv: $(RUNTIME)

dev: $(DEV)

$(RUNTIME): $(INSTALL_INPUTS)
	$(INSTALL) --editable
	touch $@

$(DEV): $(RUNTIME)
	$(INSTALL) --dev
	touch $@

serve: venv
	$(BIN)/advserve serve --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

test: dev lint
	$(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check service client bench tests scripts loadtest

# rewrites the generated numbers of docs/binary-framing.md (tests/test_docs.py fails when they drift)
docs: dev
	$(BIN)/python scripts/gen_docs.py --write

bench: dev
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_output_pool.py
	$(BIN)/python bench/bench_launches.py
	$(BIN)/python bench/bench_transport.py
	$(BIN)/python bench/bench_oip.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_shm.py
	$(BIN)/python bench/bench_serving.py
	$(BIN)/python bench/bench_ray.py

proto: dev
	$(BIN)/python scripts/gen_proto.py

# the exact-gradient study in full mode (minutes): regenerates the plots and numbers under docs/analysis/
analysis: dev
	$(BIN)/advserve analyze --full --out docs/analysis

clean:
	rm -rf $(VENV) build *.egg-info service/*.egg-info .pytest_cache .hypothesis

# load test: starts its own server on free loopback ports; reports in loadtest/results/ (loadtest/README.md)
USERS ?= 8
DURATION ?= 30
WORKLOAD ?= mix
TRANSPORT ?= all
MAX_P95_MS ?= 2000
LOADTEST_ARGS ?=
loadtest: dev
	$(BIN)/python loadtest/run.py --users '$(USERS)' --duration '$(DURATION)' --workload '$(WORKLOAD)' \
		--transport '$(TRANSPORT)' --max-p95-ms '$(MAX_P95_MS)' $(LOADTEST_ARGS)
