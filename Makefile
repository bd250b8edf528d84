# The two commands a new user needs: `make demo` and `make test`.
# Both create (or update) a local virtual environment in .venv from the pinned requirements.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Triton runs the GPU ChaCha20 kernel's tests on CPUs through its interpreter
# (tests/mpc/test_chacha_triton.py). CUDA builds of torch bring their own Triton, so it is
# installed only next to a CPU build of torch, never over the one torch asked for.
TRITON_FOR_CPU_TORCH := triton==3.7.1

.PHONY: install test test-quick test-all lint demo clean-venv

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel "setuptools==80.9.0"
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" || \
		$(PY) -m pip install -q "$(TRITON_FOR_CPU_TORCH)"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	$(PY) -m secure_inference.venv_hook
	@touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (ruff.toml) and the import contracts of the package (.importlinter)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# the inner loop: no slow tests, no tests that start Python processes (see pytest.ini)
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow and not processes" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) research/demo.py $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
