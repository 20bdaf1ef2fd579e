# Two entry points for a fresh machine (see README.md):
#   make demo   set up, then run the embedded default end to end (offline, CPU is enough)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: setup system-deps demo test test-slow lint bench-cpu

$(BIN)/augment: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

system-deps:
	WITH_CHROMIUM=$(WITH_CHROMIUM) bash scripts/system-deps.sh

setup: $(BIN)/augment system-deps

demo: setup
	$(BIN)/augment run demo

# The fast lane (about 2 min on 2 cores); the slow lane runs real Prefect flows and servers
# end to end (about 3 min). CI runs both (.ci/run).
test: WITH_CHROMIUM=1
test: setup
	$(BIN)/pytest -q -m "not slow"

test-slow: setup
	$(BIN)/pytest -q -m slow

lint: setup
	$(BIN)/ruff check anl_core pipeline flows tests bench
