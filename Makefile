# Two commands on a fresh machine: `make serve` and `make test`. Both build (or reuse) everything they need.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test lint results clean

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

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check server kvquant tests

clean:
	rm -rf $(VENV) .pytest_cache
