PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001

.PHONY: venv serve test lint bench proto clean

venv: $(BIN)/advserve

$(BIN)/advserve: pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ./client -e '.[test]'
	touch $@

serve: venv
	$(BIN)/advserve serve --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

test: venv lint
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check service client bench tests scripts

bench: venv
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_transport.py

proto: venv
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info service/*.egg-info .pytest_cache .hypothesis
