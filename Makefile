# fastfib: `make run` and `make test` work from a fresh clone.
# They create .venv, install fastfib into it with `pip install .` (which compiles
# the kernel against the gmpy2 wheel's GMP), build the kernel in place too (so
# that the checkout itself imports, for tests, `python -m fastfib` and
# `python -m bench`), and make sure RabbitMQ answers on 127.0.0.1:5672.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=
KERNEL_SOURCES := fastfib/_kernel.pyx fastfib/_kernel.pxd setup.py pyproject.toml

.PHONY: all venv build broker run test lint bench bench-quick bench-kernel clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Installs fastfib (compiling it in pip's isolated build environment) with the
# test and benchmark extras, plus what the in-place build needs.
$(VENV)/.installed: $(PY) $(KERNEL_SOURCES) $(wildcard fastfib/*.py)
	$(PIP) install --quiet ".[test,bench]"
	$(PIP) install --quiet "Cython>=3.0,<4" "setuptools>=77" wheel
	$(PY) setup.py --quiet build_ext --inplace
	@touch $@

venv: $(PY)

build: $(VENV)/.installed

broker:
	@scripts/ensure-broker.sh

# The main job: the server pool in the foreground (Ctrl-C stops it cleanly).
run: build broker
	$(PY) -m fastfib serve

test: build broker
	$(PY) -m pytest $(PYTEST_ARGS)

lint: build
	$(PY) -m ruff check fastfib bench tests setup.py

bench: build broker
	$(PY) -m bench

bench-quick: build broker
	$(PY) -m bench --quick

bench-kernel: build
	$(PY) -m pytest bench/test_kernel.py --benchmark-only -p no:randomly

clean:
	rm -rf build dist *.egg-info fastfib/_kernel.c fastfib/*.so $(VENV)/.installed

# A local 3-node RabbitMQ cluster (AMQP 127.0.0.1:5681-5683) to try failover: docs/deploy.md.
.PHONY: cluster-up cluster-down
cluster-up:
	@scripts/cluster.sh up

cluster-down:
	@scripts/cluster.sh down
