# Every target installs what it needs into .venv from the lock file first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test run bench bench-quick lint settings-table

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

test: install $(BIN)/redis-server-tls
	$(BIN)/python -m pytest

# Debian's redis-server, for the Redis TLS tests (see tests/setup.sh).
$(BIN)/redis-server-tls: tests/setup.sh | install
	sh tests/setup.sh $(VENV)

run: install
	$(BIN)/fanout run

bench: install
	bash benchmarks/setup.sh
	$(BIN)/python -m benchmarks.run

bench-quick: install
	bash benchmarks/setup.sh
	$(BIN)/python -m benchmarks.run --quick

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

settings-table: install
	$(BIN)/python -m common.settings --update README.md
