# Developer entry points. `make up` runs the whole job locally; `make test` runs the tests.
# Both create the virtual environment on first use (Python 3.11, Java 17 and Maven assumed).
VENV ?= .venv
PYTHON ?= python3.11
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: venv up test lint bench

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

up: venv
	$(VENV)/bin/stream-lstm up

test: venv
	$(VENV)/bin/python -m pytest

lint: venv
	$(VENV)/bin/ruff check stream_lstm tests

bench: venv
	$(VENV)/bin/stream-lstm bench --quick
