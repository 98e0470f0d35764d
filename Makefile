# Developer entry points. `make up` runs the whole job locally; `make test` runs the tests.
# Both create the virtual environment on first use (Python 3.11, Java 17 and Maven assumed).
# VENV may point elsewhere (CI passes a cached one): `make test VENV=/path/to/venv`.
VENV ?= .venv
PYTHON ?= python3.11

# The install is redone only when pyproject.toml changes, or when this checkout is not the
# one the venv was installed from (an editable install points at one directory). Both are in
# the stamp's name, so a changed pyproject.toml or a moved checkout simply has no stamp yet.
KEY := $(shell { sha256sum pyproject.toml; echo "$(CURDIR)"; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(KEY)

.PHONY: venv up test lint bench gpu-check

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test,peer]'
	# deep-river (the evaluate peer) pins an old torch; its imports come with the peer extra.
	$(VENV)/bin/python -m pip install -q --no-deps 'deep-river==0.3.4'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

up: venv
	$(VENV)/bin/stream-lstm up $(UP_ARGS)

# make turns any failing recipe into exit 2, so say here why pytest failed when it found
# no tests at all (exit 5): a wrong path or a broken conftest, never a pass.
test: venv
	@echo "$(VENV)/bin/python -m pytest"
	@$(VENV)/bin/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAILED: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

lint: venv
	$(VENV)/bin/python -m ruff check stream_lstm tests

bench: venv
	$(VENV)/bin/stream-lstm bench --quick

# On a CUDA machine (issue 18): no venv needed, only a Python with torch, numpy, kafka-python,
# prometheus-client and pydantic-settings, and this checkout on the path. A few minutes. The
# venv's Python when there is one, else python3; GPU_PYTHON=... names another.
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m stream_lstm.cli gpu-check --report gpu-check.md
