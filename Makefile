# uvmshim: `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml 2>/dev/null | sha256sum | cut -c1-12)
# Host packages: QEMU and image tools, libvirt (daemon + headers for libvirt-python), Python build deps.
APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static e2fsprogs erofs-utils kmod xz-utils cpio \
	util-linux crun containerd containernetworking-plugins libvirt-dev libvirt-daemon-system libvirt-clients pkg-config gcc \
	python3 python3-venv python3-dev

.PHONY: help setup system-packages venv image proto demo test lint unit bench soak clean distclean

help:
	@echo "make demo   set up, build the guest image, boot a UVM, run a command and a container, then ctr run --rm through containerd"
	@echo "make test   set up, build the guest image, lint, run the whole test suite"
	@echo "make bench  figures (boot time against raw-QEMU floors measured in the same run)"
	@echo "make soak   200 ctr run --rm cycles and 1000 piped execs through containerd, then a leak check"
	@echo "make setup | image | lint | clean"

setup: system-packages venv

# apt-get update runs once, and only when a package is missing: a second run only checks.
system-packages:
	@missing=$$(dpkg-query -W -f='$${Package} $${db:Status-Status}\n' $(APT_PACKAGES) 2>/dev/null \
		| awk '$$2 != "installed" {print $$1}'; \
		for p in $(APT_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// }" ]; then \
		echo "[setup] installing Debian packages: $$missing"; \
		[ "$$(id -u)" = 0 ] || { echo "[setup] run as root to install packages" >&2; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "[setup] Debian packages present"; fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "[setup] virtualenv $(VENV) with uvmshim[dev]"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

image: system-packages
	@$(PYTHON) images/build.py

# containerd's messages: schemas/containerd/*.proto (from Debian's containerd sources) compiled by
# grpcio-tools, and the tests' CRI subset (tests/cri/api.proto); the generated modules are checked in, and a test fails when they drift from the .proto files.
proto: venv
	@$(PY) -m schemas.containerd.compile
	@$(PY) -m tests.cri.compile

demo: setup image
	@$(PY) -m uvm.demo
	@$(PY) -m shim.demo
	@$(PY) -m tests.cri.demo

lint: venv
	@echo "[lint] ruff"; $(VENV)/bin/ruff check .
	@echo "[lint] mypy (strict: uvm, shim, schemas)"; $(VENV)/bin/mypy

test: setup image lint
	@$(VENV)/bin/pytest -ra

unit: venv
	@$(VENV)/bin/pytest -ra -m "not vm"

bench: setup image
	@$(PY) bench/bench.py

# Not part of `make test`: bounded by SOAK_CYCLES (200), SOAK_EXECS (1000) and SOAK_MAX_MINUTES (90).
soak: setup image
	@$(PY) -m tests.soak

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache bench/results
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) images/out images/cache
