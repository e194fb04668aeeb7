PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001

.PHONY: venv serve test lint bench proto clean loadtest analysis

venv: $(BIN)/advserve

$(BIN)/advserve: pyproject.toml client/pyproject.toml constraints.txt scripts/install.sh
	PYTHON='$(PYTHON)' scripts/install.sh '$(VENV)' --dev
	touch $@

serve: venv
	$(BIN)/advserve serve --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

test: venv lint
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check service client bench tests scripts loadtest

bench: venv
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_transport.py
	$(BIN)/python bench/bench_oip.py

proto: venv
	$(BIN)/python scripts/gen_proto.py

# the exact-gradient study in full mode (minutes): regenerates the plots and numbers under docs/analysis/
analysis: venv
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
loadtest: venv
	$(BIN)/python loadtest/run.py --users '$(USERS)' --duration '$(DURATION)' --workload '$(WORKLOAD)' \
		--transport '$(TRANSPORT)' --max-p95-ms '$(MAX_P95_MS)' $(LOADTEST_ARGS)
