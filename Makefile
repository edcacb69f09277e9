# Every target installs what it needs on a fresh machine: a venv with torch==2.13.0 and the
# project, and the Debian packages zookeeper, redis-server, redis-sentinel and prometheus when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Extra flags for demo / cluster-up, e.g. make demo DEMO_ARGS="--preset small --requests 10"
DEMO_ARGS ?=
WORKDIR ?= var/demo

.PHONY: help setup sysdeps venv test image test-deploy demo cluster-up cluster-status cluster-down protos bench clean

help:
	@echo "make test    install everything and run the test suite"
	@echo "make image   build the Docker images without a registry (deploy/build_images.py)"
	@echo "make test-deploy   Docker engine, images, the compose stack under test, a rolling upgrade (docs/deploy.md)"
	@echo "make demo    install everything, start a local cluster, serve sample requests, stop"
	@echo "make cluster-up / cluster-status / cluster-down   the same cluster, left running (WORKDIR=$(WORKDIR))"
	@echo "make protos  regenerate services/_proto from protos/"
	@echo "make bench   the Lookup micro-benchmark and a short system comparison (bench-results/)"

setup: venv sysdeps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,docker]'
	touch $(STAMP)

venv: $(STAMP)

# prometheus (and its promtool) serves `shardrec cluster up --prometheus` and the observability
# tests; --no-install-recommends leaves out the node exporter the package recommends.
sysdeps:
	@if [ ! -f /usr/share/java/zookeeper.jar ] || ! command -v redis-server >/dev/null 2>&1 || \
	    ! command -v redis-sentinel >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
		echo "installing zookeeper, redis-server, redis-sentinel and prometheus (Debian packages)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq zookeeper redis-server redis-sentinel >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi

test: setup
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Docker: a Docker engine is installed and started when missing (root, Debian); see docs/deploy.md.
image: venv
	$(PY) deploy/build_images.py

test-deploy: venv
	PY=$(PY) deploy/test_deploy.sh

demo: setup
	$(PY) -m services.admin.cli demo --workdir $(WORKDIR) $(DEMO_ARGS)

cluster-up: setup
	$(PY) -m services.admin.cli cluster up --workdir $(WORKDIR) $(DEMO_ARGS)

cluster-status: venv
	$(PY) -m services.admin.cli cluster status --workdir $(WORKDIR)

cluster-down: venv
	$(PY) -m services.admin.cli cluster down --workdir $(WORKDIR)

protos: venv
	$(PY) tools/gen_protos.py

# A short comparison (one run, about 5 minutes on 2 cores): the Lookup micro-benchmark, then
# every system on the demo model (bench-results/: JSON and PNG plots; docs/benchmarks.md explains).
# The remote systems (shardrec, redis-kv) run with the embedding cache at 5% of the demo model's
# embedding bytes and the adaptive batch window (docs/cache.md, docs/benchmarks.md).
BENCH_ARGS ?= --runs 1 --duration-s 5 --warmup-s 1 --sweep-duration-s 3 --sweep-steps 14
BENCH_FRONTEND_ARGS ?= --cache-bytes 19485107 --adaptive-wait-ms 10
bench: setup
	$(PY) benchmarks/lookup_micro.py --out bench-results/lookup_micro.json
	$(PY) -m services.admin.cli bench compare --out bench-results/compare $(BENCH_ARGS) --frontend-args "$(BENCH_FRONTEND_ARGS)"

clean:
	@if [ -x $(PY) ] && [ -f $(WORKDIR)/cluster.json ]; then $(PY) -m services.admin.cli cluster down --workdir $(WORKDIR); fi
	rm -rf $(VENV) .pytest_cache build *.egg-info var
