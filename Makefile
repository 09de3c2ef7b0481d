# Two commands for a newcomer: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ssdd-installed

.PHONY: install demo test test-fast clean

install: $(STAMP)

# torch: keep one that is already importable; otherwise pin the CPU build (an unpinned
# `torch` would pull a multi-GB CUDA build). Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,hf,tb]"
	@touch $(STAMP)

demo: install
	$(VENV)/bin/ssdd demo --out runs/demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
