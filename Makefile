# The one way to build, test, demo and benchmark tcp-exporter.
# `make demo` and `make test` work on a fresh machine: they install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
export TCP_EXPORTER_CACHE ?= $(HOME)/.cache/tcp-exporter
LOCALKUBE := $(PY) -m harness.localkube
APT_PACKAGES := iptables nftables conntrack iproute2 openssl util-linux libseccomp-dev gcc buildah mmdebstrap
STAMP := $(VENV)/.installed

.PHONY: help deps venv tools lint test test-unit demo bench cluster-up cluster-down clean lock release set-version

help:
	@echo "make demo         run the whole thing on a local control plane"
	@echo "make test         all tests (installs what they need)"
	@echo "make test-unit    the fast tier: no Go build, no cluster, no root (seconds)"
	@echo "make lint         ruff, mypy, hadolint"
	@echo "make bench        benchmarks under bench/ (tables + JSON in bench/results/)"
	@echo "make release      dist/install.yaml and the packaged Helm chart, of this version"
	@echo "make set-version VERSION=x.y.z   the one version, written everywhere it is stated"
	@echo "make cluster-up   start the local control plane (.local/kubeconfig); NODE=1 adds a real node"
	@echo "make cluster-down stop it and remove its state"

# Debian packages the tests use; installed only when missing and when root.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "==> apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "==> not root: skipping apt packages:$$missing"; fi; \
	fi
	@command -v go >/dev/null || { echo "Go is needed to build the local control plane"; exit 1; }

$(STAMP): pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing tcp-exporter with pinned dependencies"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@PIP_CONSTRAINT=constraints.txt $(PIP) install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(STAMP)

lint: venv
	@echo "==> ruff"; $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	@echo "==> mypy"; $(VENV)/bin/mypy
	@echo "==> hadolint"; $(VENV)/bin/hadolint Dockerfile.operator Dockerfile.sidecar
	@echo "==> go vet (control-plane tooling)"; cd harness/localkube && CGO_ENABLED=0 go vet -trimpath . && test -z "$$(gofmt -l .)"
	@echo "==> actionlint (the release workflow, which cannot run here)"; \
	  $$($(PY) -c "from harness import helmtools; print(helmtools.actionlint())") .github/workflows/*.yaml

# Test tooling built from Go modules, cached under $(TCP_EXPORTER_CACHE): the control plane, Prometheus
# with Kubernetes discovery (Debian's package has none), KEDA, Argo Rollouts, Helm and the node.
tools: deps venv
	@echo "==> building (or reusing) the local control plane"
	@$(LOCALKUBE) build >/dev/null
	@echo "==> building (or reusing) Prometheus with Kubernetes discovery"
	@$(PY) -c "from harness import promstack; promstack.binaries()"
	@echo "==> building (or reusing) KEDA's operator and metrics adapter"
	@$(PY) -c "from harness import kedastack; kedastack.binaries()"
	@echo "==> building (or reusing) Argo Rollouts' controller"
	@$(PY) -c "from harness import rolloutstack; rolloutstack.binaries()"
	@echo "==> building (or reusing) Helm and actionlint"
	@$(PY) -c "from harness import helmtools; helmtools.binaries()"
	@echo "==> building (or reusing) the node: kubelet, kube-proxy, kube-scheduler, agnhost, containerd, runc, CNI"
	@$(PY) -c "from harness import nodebuild; nodebuild.all_binaries()"

test: tools
	@echo "==> pytest"
	@$(VENV)/bin/pytest -v --durations=25 $(PYTEST_ARGS)

# Seconds, with no Go build, no cluster, no root and no registry: the pure functions and the real CLIs.
test-unit: venv
	@$(VENV)/bin/pytest -q -m "not (cluster or netns or prometheus or keda or gobuild or install or load or node)" $(PYTEST_ARGS)

cluster-up: deps venv
	@$(LOCALKUBE) up $(if $(filter 1,$(NODE)),--node)

cluster-down: venv
	@$(LOCALKUBE) down

demo: tools
	@$(PY) -m harness.demo

bench: tools
	@$(PY) -m bench.sidecar
	@$(PY) -m bench.operator
	@$(PY) -m bench.signal
	@$(PY) -m bench.scalein
	@$(PY) -m bench.drain
	@$(PY) -m bench.webhook

VERSION_NOW = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' sidecar/tcp_exporter/__init__.py)

# One file with everything `kubectl apply -k manifests/` applies (images of this version), and the chart.
# kubectl is the one the tooling builds (of the control plane's version): a fresh machine has none on its PATH.
release: deps venv
	@echo "==> dist/install.yaml and the chart, version $(VERSION_NOW)"
	@mkdir -p dist
	@$$($(PY) -c "from harness.localkube.cluster import kubectl; print(kubectl())") kustomize manifests > dist/install.yaml
	@$$($(PY) -c "from harness import helmtools; print(helmtools.helm())") package charts/tcp-exporter -d dist >/dev/null
	@ls -l dist

# The version lives in sidecar/tcp_exporter/__init__.py; this writes it where else it is stated.
set-version:
	@test -n "$(VERSION)" || { echo "usage: make set-version VERSION=x.y.z"; exit 2; }
	@sed -i 's/^__version__ = ".*"/__version__ = "$(VERSION)"/' sidecar/tcp_exporter/__init__.py
	@sed -i 's/newTag: ".*"/newTag: "$(VERSION)"/' manifests/kustomization.yaml
	@sed -i 's|app.kubernetes.io/version: ".*"|app.kubernetes.io/version: "$(VERSION)"|' manifests/manager/deployment.yaml
	@sed -i 's/^version: .*/version: $(VERSION)/; s/^appVersion: .*/appVersion: "$(VERSION)"/' charts/tcp-exporter/Chart.yaml
	@sed -i -E 's/(--version )[0-9]+\.[0-9]+\.[0-9]+/\1$(VERSION)/; s#(releases/download/v)[0-9]+\.[0-9]+\.[0-9]+#\1$(VERSION)#; s#(REGISTRY/tcp-exporter(-operator)?:)[0-9]+\.[0-9]+\.[0-9]+#\1$(VERSION)#g' README.md
	@sed -i -E 's#(ghcr.io/tcp-exporter/tcp-exporter:)[0-9]+\.[0-9]+\.[0-9]+#\1$(VERSION)#' docs/operator.md
	@echo "version $(VERSION); add its CHANGELOG.md section, then run make test"

clean: cluster-down
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache

# Re-resolve every dependency to its newest version and pin the result.
lock:
	rm -rf /tmp/tcp-exporter-lock && $(PYTHON) -m venv /tmp/tcp-exporter-lock
	/tmp/tcp-exporter-lock/bin/pip install -q '.[dev]' setuptools
	{ echo "# Every dependency pinned, transitive ones included; used by the Makefile (PIP_CONSTRAINT). The images install"; \
	  echo "# requirements/{sidecar,operator}.txt instead: the same pins, with hashes."; \
	  echo "# Regenerate: make lock"; \
	  /tmp/tcp-exporter-lock/bin/pip freeze --all | grep -v -e '^tcp-exporter' -e '^pip==' | sort -f; } > constraints.txt
	@for extra in sidecar operator; do \
	  rm -rf /tmp/tcp-exporter-lock-$$extra && $(PYTHON) -m venv /tmp/tcp-exporter-lock-$$extra && \
	  PIP_CONSTRAINT=constraints.txt /tmp/tcp-exporter-lock-$$extra/bin/pip install -q ".[$$extra]" && \
	  $(PY) -m harness.lock /tmp/tcp-exporter-lock-$$extra/bin/python $$extra requirements/$$extra.txt || exit 1; \
	done

	@for extra in sidecar operator; do \
	  rm -rf /tmp/tcp-exporter-lock-$$extra && $(PYTHON) -m venv /tmp/tcp-exporter-lock-$$extra && \
	  PIP_CONSTRAINT=constraints.txt /tmp/tcp-exporter-lock-$$extra/bin/pip install -q ".[$$extra]" && \
	  $(PY) -m harness.lock /tmp/tcp-exporter-lock-$$extra/bin/python $$extra requirements/$$extra.txt || exit 1; \
	done