# The two commands a user needs: `make up` (the mesh with Bookinfo on this machine) and `make test`.
# Every target installs what it needs first, and each is safe to run again.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON_PREFERENCE := only-system
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)

# Debian packages the tests run for real, as `command:package`.
DEBIAN_PACKAGES := etcd:etcd-server iptables:iptables ip:iproute2 setpriv:util-linux curl:curl redis-server:redis-server redis-cli:redis-tools openssl:openssl nghttp:nghttp2-client h2load:nghttp2-client nghttpd:nghttp2-server

SRC_DIRS := $(wildcard libs/*/src services/*/src) samples/bookinfo/app/src samples/mixer-adapter/src
TEST_DIRS := libs services samples tools e2e
# Where `make up` keeps its state (config store, registry, logs, hosts file, pids).
MESH_DIR ?= .mesh
# Between the mesh's proxies: none (plaintext, 0.2's default), mtls (mutual TLS only) or
# permissive (mutual TLS, plaintext accepted too): `make up AUTH=mtls`.
AUTH ?= none

.PHONY: help up down setup venv debian-packages test lint type gen-check build-check unit protos fmt clean

help:
	@echo "make up      the mesh with Bookinfo on http://127.0.0.1:8080/productpage (MESH_DIR=.mesh, AUTH=none|mtls|permissive)"
	@echo "make down    stop the mesh \`make up\` started (from another shell)"
	@echo "make setup   install everything the mesh and its tests need (idempotent)"
	@echo "make test    lint, types, generated-code check, BUILD deps check, every test and e2e"
	@echo "make protos  regenerate libs/api from proto/"
	@echo "make fmt     format the code"

setup: debian-packages venv

up: setup
	$(PY) -m istio.platform.local up --mesh-dir $(MESH_DIR) --auth $(AUTH)

down: venv
	$(PY) -m istio.platform.local down --mesh-dir $(MESH_DIR)

venv: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock $(wildcard libs/*/pyproject.toml services/*/pyproject.toml samples/*/app/pyproject.toml samples/*/pyproject.toml)
	@if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then \
		echo "setup: installing uv"; \
		python3 -m pip install --quiet uv || python3 -m pip install --quiet --break-system-packages uv; \
	fi
	@echo "setup: syncing $(VENV) from uv.lock"
	$(UV) sync --all-packages --frozen --quiet --compile-bytecode
	@touch $@

debian-packages:
	@missing=""; \
	for pair in $(DEBIAN_PACKAGES); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -z "$$missing" ]; then echo "setup: Debian packages present"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "setup: missing Debian packages:$$missing. Run 'sudo make setup' to install them." >&2; \
		exit 1; \
	fi; \
	echo "setup: installing Debian packages:$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null

test: setup lint type gen-check build-check unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

type: venv
	$(VENV)/bin/mypy $(SRC_DIRS)

gen-check: venv
	$(PY) tools/protogen --check

build-check: venv
	$(PY) tools/build check

unit: venv
	$(VENV)/bin/pytest -q $(TEST_DIRS)

protos: venv
	$(PY) tools/protogen

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache

# Benchmarks, not part of `make test`: Pilot with 1,000 services and 200 ADS clients on
# loopback (tools/bench/pilot_bench.py; BENCH_ARGS passes options, e.g. BENCH_ARGS="--rounds 20"),
# the proxy against haproxy with wrk (tools/bench/proxy_bench.py; PROXY_BENCH_ARGS), and
# HTTP/2 and gRPC through the proxy with h2load and grpcio (tools/bench/h2_bench.py; H2_BENCH_ARGS),
# and Mixer: Checks/s against a grpc.aio echo, Report bags/s, and the proxy with Mixer on and off
# (tools/bench/mixer_bench.py; MIXER_BENCH_ARGS).
# What is measured and the figures: docs/benchmarks.md.
# The proxy benchmarks need wrk, haproxy, iperf3 and h2load (installed here when run as root).
.PHONY: bench bench-pilot bench-proxy bench-tcp bench-h2 bench-mixer
bench: bench-pilot bench-proxy bench-tcp bench-h2 bench-mixer

bench-pilot: venv
	$(PY) tools/bench/pilot_bench.py $(BENCH_ARGS)

bench-proxy: venv
	@for tool in wrk haproxy; do command -v $$tool >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "bench: $$tool is missing: run as root or apt-get install $$tool" >&2; exit 1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq $$tool >/dev/null; }; done
	$(PY) tools/bench/proxy_bench.py $(PROXY_BENCH_ARGS)

bench-tcp: venv
	@for tool in wrk haproxy iperf3; do command -v $$tool >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "bench: $$tool is missing: run as root or apt-get install $$tool" >&2; exit 1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq $$tool >/dev/null; }; done
	$(PY) tools/bench/tcp_bench.py $(TCP_BENCH_ARGS)

bench-h2: venv
	@for tool in h2load:nghttp2-client haproxy:haproxy; do command -v $${tool%%:*} >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "bench: $${tool%%:*} is missing: run as root or apt-get install $${tool#*:}" >&2; exit 1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq $${tool#*:} >/dev/null; }; done
	$(PY) tools/bench/h2_bench.py $(H2_BENCH_ARGS)

bench-mixer: venv
	@for tool in h2load:nghttp2-client wrk:wrk haproxy:haproxy; do command -v $${tool%%:*} >/dev/null || { \
		[ "$$(id -u)" = 0 ] || { echo "bench: $${tool%%:*} is missing: run as root or apt-get install $${tool#*:}" >&2; exit 1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq $${tool#*:} >/dev/null; }; done
	$(PY) tools/bench/mixer_bench.py $(MIXER_BENCH_ARGS)
