# llmo — common tasks. `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/llmo/target
export CARGO_BUILD_JOBS ?= 2
export LLMO_CACHE ?= $(HOME)/.cache/llmo
CARGO ?= cargo

.PHONY: help build test fmt fmt-check clippy crds crd-check chart-check helm unit fetch-model python-deps k8s cluster-up cluster-down demo demo-down bench-serve bench-parallel bench-operator clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## Build every binary (release)
	$(CARGO) build --workspace --release

test: fmt-check clippy crd-check chart-check fetch-model python-deps k8s unit ## Everything CI checks: format, lints, CRD and chart drift, chart lint, all tests

fmt: ## Format the code
	$(CARGO) fmt --all

fmt-check: ## Fail when the code is not formatted
	$(CARGO) fmt --all --check

clippy: ## Lints, warnings are errors (also the CUDA build of llmo-serve, which needs no CUDA to compile)
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p llmo-serve --features cuda --all-targets -- -D warnings

crds: ## Regenerate crds/ from the API types, and the Helm chart's copies
	$(CARGO) run --quiet -p llmo-operator -- crdgen --dir crds
	bash scripts/chart-sync-crds.sh

crd-check: ## Fail when crds/ differs from the API types
	$(CARGO) run --quiet -p llmo-operator -- crdgen --dir crds --check

helm: ## Install helm (v3.17.2, cached in $(LLMO_CACHE)/helm) and print its path
	@bash scripts/helm.sh

chart-check: ## Helm chart: CRD drift, helm lint --strict, template assertions, offline validation
	bash scripts/chart-check.sh

fetch-model: ## Download the bundled model (SmolLM2-135M-Instruct GGUF) into $(LLMO_CACHE)/models
	bash scripts/fetch-model.sh

python-deps: ## The official openai SDK, which the API compatibility tests drive llmo-serve with
	@python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet 'openai>=1.40'

bench-serve: fetch-model python-deps ## llmo-serve against llama.cpp's llama-server at concurrency 1, 4, 16 (builds llama.cpp once, ~12 min)
	$(CARGO) build --release -p llmo-serve
	LLMO_SERVE=$(CARGO_TARGET_DIR)/release/llmo-serve bash serving/bench/bench-serve.sh

bench-parallel: fetch-model ## Tensor and pipeline parallel layouts over TCP: decode time per step and weights per rank against one process
	$(CARGO) run --release -p llmo-serve --example parallel_bench -- "$$(bash scripts/fetch-model.sh)" 1 8

bench-operator: k8s ## 500 ModelDeployments over 200 simulated GPU nodes: convergence time, memory, requests, idle writes
	$(CARGO) build --release -p llmo-operator
	$(CARGO) run --release -p llmo-e2e --example operator_scale

k8s: ## Build (once, cached) and install the Kubernetes v1.20.2 control plane the tests run against
	bash scripts/k8s-build.sh

demo: ## The whole job on a local cluster: control plane, Helm chart, the bundled model, a chat completion, load and autoscaling
	bash scripts/demo.sh up

demo-down: ## Stop the demo and remove its files
	bash scripts/demo.sh down

cluster-up: k8s ## Start a control plane on loopback (prints the KUBECONFIG to use)
	bash scripts/cluster.sh up

cluster-down: ## Stop it and remove its state
	bash scripts/cluster.sh down

unit: ## Run every test of the workspace
	$(CARGO) test --workspace --no-fail-fast
	$(CARGO) test -p llmo-serve --features cuda --lib dist::

clean: ## Remove build outputs (the model cache stays)
	$(CARGO) clean
