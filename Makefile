# seqedit — two commands on a fresh machine: `make demo` and `make test`.
# Each sets up what it needs the first time: a virtualenv in .venv, torch (2.13.0 CPU
# build where no torch is installed), and the package with its dev tools.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqedit-installed
# Override to install torch another way, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-extended lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_SPEC)"; $(PY) -m pip install --quiet $(TORCH_SPEC); \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/seqedit demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m ruff check seqedit tests bench
	$(PY) -m pytest -q -m "not extended" $(PYTEST_ARGS)

# Variants of paths the suite already covers, too long for CI's 30 minutes (each test
# says what it adds); run before a release and after changing what they exercise.
test-extended: $(STAMP)
	$(PY) -m pytest -q -m extended $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check seqedit tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
