# taskmux: the one entry point for humans, CI and hooks. `make help` lists targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
MODEL_REPO ?= model-repo
SHARED_DATA ?= ../shared/data
# A sentence-transformers folder to build from instead of the packaged all-MiniLM-L6-v2.
ENCODER ?=
PROTO_SRC := protos/taskmux/v1/taskmux.proto
PROTO_OUT := client/taskmux_api/v1

.DEFAULT_GOAL := help
.PHONY: help venv proto proto-check client-sync model run test lint audit train-heads train-multitask eval bench bench-user-heads interop-deps \
	images images-smoke clean

help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

IMAGE_PINS := docker/requirements/gateway.txt docker/requirements/worker-cpu.txt
$(BIN)/.installed: pyproject.toml client/pyproject.toml $(IMAGE_PINS)
	@test -n "$(PYTHON)" || { echo "Python 3.11 is needed (python3.11 on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build; any other pin pulls a multi-GB CUDA build.
	# The images' pins constrain the venv too, so a fresh venv runs what the images run
	# (a new release of a dependency's dependency moves neither; tests/unit/test_k8s.py).
	$(BIN)/pip install -q $(IMAGE_PINS:%=-c %) -e ./client -e '.[export,dev]'
	touch $@

venv: $(BIN)/.installed ## Create .venv with every dependency

proto: $(BIN)/.installed ## Regenerate the Python code for protos/
	$(BIN)/python -m tools.protogen

proto-check: proto ## Fail if the committed generated code differs from `make proto`
	@git diff --exit-code -- $(PROTO_OUT) || { echo "generated code is stale: run make proto and commit"; exit 1; }

client-sync: $(BIN)/.installed ## Regenerate the blocking client (sync.py) from the asyncio one (aio.py)
	$(BIN)/python -m tools.unasync

$(MODEL_REPO)/manifest.json: $(BIN)/.installed
	$(BIN)/taskmux model build --out $(MODEL_REPO) $(if $(ENCODER),--encoder $(ENCODER) --data $(SHARED_DATA))

model: $(MODEL_REPO)/manifest.json ## Build the model repository (ONNX encoder + heads; ENCODER=PATH: your own)

train-multitask: ## Fine-tune the multi-task branch and its heads (CPU, about an hour); then make model
	$(BIN)/taskmux model train-multitask --data $(SHARED_DATA)

train-heads: $(MODEL_REPO)/manifest.json ## Retrain the committed heads from ../shared/data
	$(BIN)/taskmux model train-defaults --repo $(MODEL_REPO) --data $(SHARED_DATA)
	$(BIN)/taskmux model build --out $(MODEL_REPO) --force

eval: $(MODEL_REPO)/manifest.json ## Recompute each shipped head's held-out figure vs its floor
	$(BIN)/taskmux model eval --repo $(MODEL_REPO) --data $(SHARED_DATA)

run: $(MODEL_REPO)/manifest.json ## Start Valkey, a gateway and a worker (Ctrl-C stops all)
	$(BIN)/taskmux up --model-repo $(MODEL_REPO)

bench-user-heads: $(MODEL_REPO)/manifest.json ## head train on a 2,000-row SST-2 sample: embedding vs multitask features vs --fine-tune
	$(BIN)/python -m taskmux.modelrepo.user_heads_bench --repo $(MODEL_REPO) --data $(SHARED_DATA)

bench: $(MODEL_REPO)/manifest.json ## Full system vs raw ONNX Runtime vs one encoder per task
	$(BIN)/python -m bench.run --repo $(MODEL_REPO) --out bench

NODE_CLIENT := tests/interop/node
$(NODE_CLIENT)/node_modules/.package-lock.json: $(NODE_CLIENT)/package-lock.json
	@if command -v npm >/dev/null; then cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --silent; \
	elif [ -n "$(filter true 1,$(CI))" ]; then echo "npm not found: apt-get install nodejs npm (.ci/run does)"; exit 1; \
	else echo "npm not found: the grpc-js interop tests will be skipped"; fi

interop-deps: $(NODE_CLIENT)/node_modules/.package-lock.json ## Install the Node.js interop client (grpc-js)

# buf, pinned by tools/buf/package-lock.json. The baseline is the API as last recorded by
# `make proto-baseline`: a committed image, so the check needs no git history or branch.
BUF_DIR := tools/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf
PROTO_BASELINE := protos/taskmux.v1.binpb
.PHONY: proto-lint proto-baseline
$(BUF_DIR)/node_modules/.package-lock.json: $(BUF_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: apt-get install nodejs npm (.ci/run does)"; exit 1; }
	cd $(BUF_DIR) && npm ci --no-audit --no-fund --silent

proto-lint: $(BUF_DIR)/node_modules/.package-lock.json ## buf lint, and buf breaking against the recorded API
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_BASELINE)
	@$(BUF) build --exclude-source-info -o - | cmp -s - $(PROTO_BASELINE) || { \
		echo "protos/ changed compatibly since $(PROTO_BASELINE): run make proto-baseline and commit it"; exit 1; }

proto-baseline: $(BUF_DIR)/node_modules/.package-lock.json ## Record protos/ as the API baseline (after a compatible change)
	$(BUF) breaking --against $(PROTO_BASELINE)
	$(BUF) build --exclude-source-info -o $(PROTO_BASELINE)

test: proto-check $(MODEL_REPO)/manifest.json interop-deps $(BUF_DIR)/node_modules/.package-lock.json k8s-validate ## Unit and integration tests
	TASKMUX_TEST_MODEL_REPO=$(MODEL_REPO) $(BIN)/pytest

lint: $(BIN)/.installed ## ruff, mypy, the generated sync client, bandit and the dependency audit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m tools.unasync --check
	$(BIN)/bandit -q -c pyproject.toml -r .
	$(BIN)/python -m tools.dependency_audit
lint: proto-lint  # a line of its own: other checks join lint on theirs

audit: $(BIN)/.installed ## pip-audit, failing on anything it could not audit
	$(BIN)/python -m tools.dependency_audit --strict

# Images without a Docker engine: buildah as root (apt-get install buildah podman debootstrap).
images: ## Build the gateway and CPU worker images with buildah (README: Images)
	tools/images.sh build

images-smoke: ## Embed and Classify through the built images and a Valkey (needs make model)
	MODEL_REPO=$(MODEL_REPO) CLIENT_PYTHON=$(BIN)/python tools/images.sh smoke

clean: ## Remove the venv and the model repository
	rm -rf $(VENV) $(MODEL_REPO) .mypy_cache .ruff_cache .pytest_cache

# Kubernetes manifests: validation and the local cluster rehearsal.
-include k8s/k8s.mk
