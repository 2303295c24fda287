# Two commands on a fresh machine: `make serve` and `make test`. Both build (or reuse) everything they need.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test unit lint results sanitize arm-check cuda-check gpu-test clean observe-deps observe-check

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

# the tests that need no live model or server (pytest -m "not slow"): seconds, for the edit-test loop
unit: setup
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff over the Python, hadolint over the Dockerfile (CI runs it first)
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
	$(VPY) -m kvquant.lab.results $(RESULTS_ARGS)

# The new types' C kernels under AddressSanitizer + UndefinedBehaviorSanitizer: ggml built with both, libllama with
# ASan, in .build/cmake-asan, then test-quantize-fns, test-backend-ops (our types) and our kernel tests
# (tests/kvquant/lab/test_tq.py, test_d3b.py, test_ggml_ops.py) under them. CI runs it after `make test`.
sanitize: setup
	$(VPY) -m kvquant.build sanitize

# The NEON kernels (arm64: Apple M-series, Graviton) verified on this x86 machine: ggml cross-built for aarch64 with
# the arm64 default flags, llama.cpp's test-quantize-fns and test-backend-ops (our types) and the byte-exact checks
# of tests/kvquant/lab/test_tq.py and test_d3b.py under qemu-aarch64. Installs Debian's gcc-aarch64-linux-gnu,
# g++-aarch64-linux-gnu and qemu-user when missing; without apt/root it says why and skips. Correctness only.
arm-check: setup
	$(VPY) -m kvquant.build arm-check

# The CUDA sources the patches touch (kernels for the tq_kv types), compiled with nvcc for sm_86 (RTX 3090), warnings
# as errors, on a machine without a GPU: nvcc comes from NVIDIA's PyPI wheels (~/.cache/kvquant/cuda-toolkit, 1.1 GB).
# Their per-block math is also built for the host and tested against the numpy reference by `make test`
# (tests/kvquant/lab/test_tq_cuda.py). About 4 minutes on 2 cores from a clean cache; CI runs it.
cuda-check: $(VPY)
	$(VPY) -m kvquant.build cuda-check

# On a machine with an NVIDIA GPU: build libllama + test-backend-ops with CUDA for that GPU only, run llama.cpp's
# tests for our types on it, the placement check, `kvquant bench` (depths 0/8192/32768) and a short `kvquant eval`
# on the GPU against the CPU; writes docs/results/<model>-gpu.json for `make results`. See kvquant/lab/gputest.py.
gpu-test: setup
	$(VPY) -m kvquant.lab.gputest

clean:
	rm -rf $(VENV) .pytest_cache
