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

# make demo: the whole pipeline on the built-in corpus (demo.py, sizes in config/demo.py), in the same
# environment plus matplotlib for its curves. DEMO_SMALL=1 runs demo.py's toy sizes instead.
DEMO_STAMP := $(ENV_DIR)/.demo-deps
.PHONY: demo

$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q matplotlib
	@touch $@

demo: $(DEMO_STAMP)
	$(PY) demo.py $(if $(filter 1,$(DEMO_SMALL)),,config/demo.py)

# run.c builds. Each computes the same floats in the same order (no -ffast-math, no FMA contraction), so
# greedy output is identical across them. RUN_OUT=path writes the binary elsewhere (the tests do).
RUN_CFLAGS = -O3 -ffp-contract=off -Wall -Wextra
.PHONY: run runfast runomp run_asan

run:  # portable
	$(CC) $(RUN_CFLAGS) -o $(or $(RUN_OUT),run) run.c -lm

runfast:  # vector instructions of this CPU (AVX2 or AVX-512 VNNI int8 dot products where present)
	$(CC) $(RUN_CFLAGS) -march=native -o $(or $(RUN_OUT),run) run.c -lm

runomp:  # as runfast, plus OpenMP threads (OMP_NUM_THREADS)
	$(CC) $(RUN_CFLAGS) -march=native -fopenmp -o $(or $(RUN_OUT),run) run.c -lm

run_asan:  # AddressSanitizer + UBSan, for the bad-input tests
	$(CC) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all \
		-ffp-contract=off -Wall -Wextra -o $(or $(RUN_OUT),run_asan) run.c -lm
