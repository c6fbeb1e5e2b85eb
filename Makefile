# make test: set up a virtual environment (unless one is active) and run the test suite.
# make run / runfast / runomp: build the C inference program.

PYTHON ?= python3
CC ?= gcc

ifdef VIRTUAL_ENV
ENV_DIR := $(VIRTUAL_ENV)
else
ENV_DIR := .venv
endif
PY := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.toolkit-deps

.PHONY: setup test

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(ENV_DIR)
	$(PY) -m pip install -q -r requirements.txt pytest
	@touch $@

test: setup
	$(PY) -m pytest -q tests
