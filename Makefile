# The README's two commands: `make demo` and `make test`. Each sets itself up.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install broker bench lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

broker:
	@bash ops/ensure_rabbitmq.sh

demo: install broker
	$(BIN)/qflare demo

test: install broker
	$(BIN)/pytest -q

bench: install broker
	$(BIN)/qflare bench crypto --write-docs
	$(BIN)/qflare bench handshake --write-docs
	$(BIN)/qflare bench round --write-docs
	$(BIN)/qflare bench fleet --write-docs

lint: install
	$(BIN)/ruff check .
