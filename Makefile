# The toolkit's entry points. `make serve` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime

.PHONY: help venv java nginx tools containers image archive serve stop test test-unit test-integration docs-check bench soak lint format \
	check clean monitor-demo explain-demo \
	status register promote rollback canary shadow proxy bundle monitor

help:
	@echo "make serve    build the archives and start TorchServe in the background (make stop)"
	@echo "make monitor  Prometheus with the alert rules on 127.0.0.1:9090, scraping make serve (make stop)"
	@echo "make test     set up, build, and run every test against a real TorchServe"
	@echo "make docs-check  run every command README.md and docs/ show, or the tests that run them (docs/tests.md)"
	@echo "make archive  build model_store/*.mar from models.yaml"
	@echo "make bench    served vs stock vs in-process benchmark -> results/bench/"
	@echo "make soak     10-minute soak with scaling in the middle -> results/soak/"
	@echo "make check    format check, lint and unit tests"
	@echo "make bundle   image, Kubernetes and KServe manifests -> bundle/ (docs/kubernetes.md)"
	@echo "make image    build bundle/'s Dockerfile with buildah -> build/image/*.oci.tar, sizes layer by layer"

# TorchServe's frontend needs a Java 17+ runtime.
java:
	@if java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])'; then \
		echo "java: $$(java -version 2>&1 | head -1)"; \
	else \
		echo "java 17 missing: installing openjdk-17-jre-headless"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; \
	fi

# nginx: the guard in front of the management API (make serve), the canary/shadow proxy and the OIP front.
nginx:
	@if ! { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; \
	fi

# hey: a compiled load generator, so the benchmark's client steals little CPU from the server.
# prometheus (with promtool): make monitor, and the rule tests (monitoring/).
tools: nginx
	@if ! command -v hey >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey; \
	fi
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	fi

# buildah and mmdebstrap: make image builds the bundle's Dockerfile without a daemon, on a Debian base made from
# Debian's packages (no registry serves base images here), and the container tests run its filesystem.
containers:
	@if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap; \
	fi

# pip (not uv or poetry): torch and torchvision install from this machine's local wheel cache.
# make serve needs only the runtime ($(RUNTIME)); tests, lint and the benchmark add the dev and bench extras.
$(RUNTIME): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[runtimes]'  # runtime: openvino | onnxruntime versions (docs/spec.md)
	@touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $(STAMP)

venv: java $(STAMP)

archive: venv
	$(PY) build_mar.py

# Builds what is missing and starts TorchServe as soon as the first model is built; each further model
# is registered the moment its archive is written (servekit/serve.py; docs/operating.md). Restores the
# versions registered at runtime from the last snapshot (FRESH=1 ignores it); checks every archive
# against model_store/manifest.json first; nginx guards the management API (servekit/serving/guard.py).
serve: java $(RUNTIME) nginx
	$(PY) -m servekit.serve $(if $(FRESH),--fresh)

stop:
	-@if test -x $(PY); then $(PY) -m servekit.serving.monitor stop; fi
	@if test -x $(PY); then $(PY) -m servekit.serving.server stop; else echo "nothing to stop"; fi

# Prometheus on 127.0.0.1:9090 with monitoring/rules, scraping make serve's metrics (docs/monitoring.md, "Rules").
monitor: venv tools
	$(PY) -m servekit.serving.monitor start

# The suite in 3 processes (pytest-xdist, one module per process at a time, the longest first:
# tests/conftest.py): on 2 cores the integration tests spend much of their time waiting on servers.
# A short temporary root: TorchServe's management socket path must stay under 100 bytes.
PYTEST := $(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder
test: archive tools containers
	@tmp=$$(mktemp -d /tmp/sk.XXXXXX); $(PYTEST) --basetemp=$$tmp tests; rc=$$?; \
		if test $$rc -eq 0; then rm -rf $$tmp; else echo "test files kept in $$tmp"; fi; exit $$rc

test-unit: archive tools
	$(PY) -m pytest tests/unit -m unit

test-integration: archive tools containers
	$(PY) -m pytest tests/integration -m integration

# Every command README.md and docs/*.md show (docs/tests.md, "The docs check"): the blocks the check runs or
# checks without running, and the tests that their <!-- docs-check: test FILE --> markers name.
DOCS_TESTS = $(sort $(shell sed -n 's/^<!-- docs-check: test \([^ ]*\) -->$$/\1/p' README.md docs/*.md))
docs-check: archive tools
	$(PY) -m pytest tests/integration/test_docs_commands.py $(DOCS_TESTS)

bench: venv tools
	$(PY) -m servekit.perf.bench $(BENCH_ARGS)

# Real explanations for README.md's figure and results/explain/ (docs/explanations.md); LOAD=1 adds the
# prediction p99 at c=16 beside one explanation client (also in make bench).
explain-demo: archive tools
	$(PY) -m servekit.perf.explain_demo $(if $(filter 1 yes true,$(LOAD)),--load)

# A real run for the figure in docs/monitoring.md ("In practice"): two versions, then drift, watched by Prometheus (~4 min).
monitor-demo: archive tools
	$(PY) -m servekit.perf.monitoring_demo

# 10 minutes at 70 % of measured capacity with a scale-up and scale-down in the middle (loopback only).
soak: archive
	$(PY) -m servekit.perf.soak --minutes 10 --rate-fraction 0.7

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

check: lint test-unit

# Deployment shortcuts over the servekit command line (docs/operating.md, "Deploying versions"):
#   make register NAME=digits VERSION=2.0; make promote ...; make rollback NAME=digits
#   make proxy; make canary NAME=digits VERSION=2.0 PERCENT=20; make shadow NAME=digits VERSION=2.0
SERVEKIT := $(VENV)/bin/servekit
status: venv
	$(SERVEKIT) status
register promote: venv
	$(SERVEKIT) $@ $(NAME) $(VERSION)
rollback: venv
	$(SERVEKIT) rollback $(NAME)
proxy: venv tools
	$(SERVEKIT) proxy start
canary: venv
	$(SERVEKIT) canary $(NAME) $(VERSION) --percent $(PERCENT)
shadow: venv
	$(SERVEKIT) shadow $(NAME) $(VERSION)

# The image and manifests for a cluster (docs/kubernetes.md, "Deploy on Kubernetes"), from the archives just built:
#   make bundle [MODELS=digits:1.0,2.0] [DEFAULT=digits:2.0] [IMAGE=registry.example.com/servekit:0.1.0]
#               [REPLICAS=2] [MAX_REPLICAS=4] [CPU=2] [MEMORY=4Gi] [NAMESPACE=servekit] [OUT=bundle]
#               [PUBLIC=1]   (the KServe InferenceService through the ingress gateway; default: cluster-local)
#               [OTLP=http://COLLECTOR:4318/v1/traces]   (the pods export traces there; default: off)
#               [KSERVE_MODE=standard|knative] [AUTOSCALER=keda|hpa] [PROMETHEUS_URL=http://HOST:9090]
bundle: archive
	$(SERVEKIT) bundle $(if $(MODELS),--models $(MODELS)) $(if $(DEFAULT),--default $(DEFAULT)) \
		$(if $(IMAGE),--image $(IMAGE)) $(if $(REPLICAS),--replicas $(REPLICAS)) \
		$(if $(MAX_REPLICAS),--max-replicas $(MAX_REPLICAS)) $(if $(CPU),--cpu $(CPU)) \
		$(if $(MEMORY),--memory $(MEMORY)) $(if $(NAMESPACE),--namespace $(NAMESPACE)) $(if $(OUT),--out $(OUT)) \
		$(if $(filter 1 yes true,$(PUBLIC)),--public) $(if $(OTLP),--otlp-endpoint $(OTLP)) \
		$(if $(KSERVE_MODE),--kserve-mode $(KSERVE_MODE)) $(if $(AUTOSCALER),--autoscaler $(AUTOSCALER)) \
		$(if $(PROMETHEUS_URL),--prometheus-url $(PROMETHEUS_URL))

# The bundle's image, built here (docs/kubernetes.md, "The image"): buildah on a Debian base made by mmdebstrap,
# torch from this machine's wheel cache; exported to build/image/*.oci.tar with its size layer by layer.
#   make image [the bundle's variables: MODELS=..., IMAGE=..., OUT=...]
image: bundle containers
	$(PY) -m servekit.deploy.image --bundle $(or $(OUT),bundle)

clean:
	rm -rf build var model_store/*.mar model_store/manifest.json .pytest_cache
