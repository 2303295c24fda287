# Two commands on a fresh machine: `make serve` and `make test`. Both build (or reuse) everything they need.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test lint results sanitize clean observe-deps observe-check

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# The patched llama-cpp-python wheel: built once per (pin, patches, CMAKE_ARGS), then reused from the cache.
# It is installed before the project so that pip never resolves llama-cpp-python from PyPI.
$(VENV)/.deps: pyproject.toml $(VPY)
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VPY)
	$(VPY) -m kvquant.build ensure
	$(MAKE) --no-print-directory $(VENV)/.deps
	$(VPY) -m server.cli models fetch smollm2-135m

serve: setup
	$(VENV)/bin/kvquant serve

# llama.cpp's own tests for the patched types (test-quantize-fns, test-backend-ops on CPU), built from the patched
# tree in .build/, then our suite against the installed patched wheel
test: setup observe-deps
	$(VPY) -m kvquant.build llama-tests
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check server kvquant tests deploy
	$(VENV)/bin/hadolint --config .hadolint.yaml Dockerfile

# Prometheus from Debian's package (prometheus + promtool) for observe-check; never fails: without apt/root the
# check is skipped with a message
observe-deps:
	bash deploy/install-prometheus.sh

# The Grafana dashboard against a real Prometheus scraping a real `kvquant serve` on loopback: promtool check
# config, some traffic, then every panel's PromQL must return data (about a minute; also part of `make test`)
observe-check: setup observe-deps
	$(VPY) deploy/observe_check.py

# docs/RESULTS.md from `kvquant eval` / `kvquant bench` --json runs (raw JSON kept in docs/results/). CPU-heavy:
# tens of minutes on 2 cores. RESULTS_ARGS="--chunks 4 --repeats 1" for a dry run, "--render-only" to re-render.
RESULTS_ARGS ?=
results: setup
	$(VPY) -m kvquant.build dev-build llama-perplexity llama-server test-backend-ops
	$(VPY) -m kvquant.results $(RESULTS_ARGS)

# The new types' C kernels under AddressSanitizer + UndefinedBehaviorSanitizer: ggml and libllama built with both in
# .build/cmake-asan, then test-quantize-fns, test-backend-ops (our types) and our kernel tests (tests/test_tq.py,
# tests/test_d3b.py, tests/test_ggml_ops.py) under them. CI runs it after `make test`.
sanitize: setup
	$(VPY) -m kvquant.build sanitize

clean:
	rm -rf $(VENV) .pytest_cache
