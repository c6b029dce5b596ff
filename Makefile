# Set-up and entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all test-fast test-isa venv test-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed
test-deps: $(VENV)/.test-installed

# Runs the main job on the embedded tiny default model (no download needed).
demo: venv
	$(BIN)/python -m helios_jax.generate --out outputs/demo.mp4

# The CI suite: everything but the multi-minute `heavy` runs (pytest exit code 5 = "no tests
# collected" is not a failure). `make test-all` also runs the heavy ones.
test: test-deps
	$(BIN)/python -m pytest -q -ra -m "not heavy" tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-all: test-deps
	$(BIN)/python -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: test-deps
	$(BIN)/python -m pytest -q -ra -m "not slow" tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The suite under every forced CPU feature level of torch and XLA (see .ci/isa_sweep.sh):
# no test may depend on one machine's kernels. Several times as long as `make test`.
test-isa: test-deps
	bash .ci/isa_sweep.sh

bench: test-deps
	$(BIN)/python benchmarks/dit_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
