# Trellis. `make demo` and `make test` do all set-up on a fresh Debian machine (run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := iproute2 nftables iptables iputils-ping iperf3 conntrack containernetworking-plugins procps etcd-server bird2 frr podman busybox-static openssl
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit bench fuzz crash clean

setup: $(STAMP)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/trellis lab demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q -ra

fuzz: setup
	TRELLIS_FUZZ_EXAMPLES=$${TRELLIS_FUZZ_EXAMPLES:-5000} $(BIN)/pytest -q tests/privileged/test_fuzz.py

crash: setup
	TRELLIS_CRASH_ROUNDS=$${TRELLIS_CRASH_ROUNDS:-200} $(BIN)/pytest -q -s -k random_moments tests/privileged/test_burst.py

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
