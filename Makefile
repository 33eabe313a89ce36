# Set-up and the project's commands. Run as root on Debian 12/13; every target installs what
# is missing first (apt packages, a virtualenv in .venv with pycpt, the CRIU engine).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo lint test package-check bench clean

# Debian packages: the build (gcc, Python headers, venv), unshare/nsenter, and the real servers
# that tests/test_workloads.py checkpoints in containers (redis-server with redis-cli, nginx);
# openssh-server and rsync for the pretend hosts of migration tests (pycpt/testing/testhosts.py: one
# sshd per network namespace, started by the tests; the host's own sshd must never run).
# Their packages would start host services on install (invoke-rc.d runs the init scripts when
# there is no systemd); a temporary policy-rc.d answering 101 ("forbidden") stops that, and is
# removed afterwards unless one was there already.
APT_PACKAGES := gcc python3-dev python3-venv util-linux mount redis-server redis-tools nginx \
                openssh-server openssh-client rsync iproute2

setup:
	@$(PYTHON) -c 'import sysconfig, os, sys, venv, ensurepip; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
	  && command -v gcc >/dev/null && command -v unshare >/dev/null \
	  && [ -x /usr/bin/redis-server ] && [ -x /usr/bin/redis-cli ] && [ -x /usr/sbin/nginx ] \
	  && [ -x /usr/sbin/sshd ] && [ -x /usr/bin/ssh ] && [ -x /usr/bin/rsync ] && [ -x /usr/sbin/tc ] \
	  || { apt-get update -qq || exit 1; \
	       ours=; [ -e /usr/sbin/policy-rc.d ] || { ours=1; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; }; \
	       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 $(APT_PACKAGES) >/dev/null; rc=$$?; \
	       [ -z "$$ours" ] || rm -f /usr/sbin/policy-rc.d; exit $$rc; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@$(BIN)/pycpt engine install

demo: setup
	$(BIN)/pycpt demo

# Lint, format and types first (fast), then the tests, then the packages.
lint: setup
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy pycpt

test: lint
	$(BIN)/python -m pytest -ra tests
	@$(MAKE) --no-print-directory package-check

# The sdist and the wheel build (python -m build) and each installs into a fresh venv, where
# `pycpt --version`, the C extension and `pycpt check` work (about 1.5 min).
package-check: setup
	@work=$$(mktemp -d /tmp/pycpt-package-XXXXXX) && trap 'rm -rf "$$work"' EXIT && \
	  $(BIN)/python -m build -o "$$work/dist" . >"$$work/build.log" 2>&1 || { tail -30 "$$work/build.log"; exit 1; }; \
	  for dist in "$$work"/dist/*.whl "$$work"/dist/*.tar.gz; do \
	    $(PYTHON) -m venv "$$work/venv" && "$$work/venv/bin/pip" install -q --disable-pip-version-check "$$dist" \
	    && (cd "$$work" && "$$work/venv/bin/pycpt" --version && "$$work/venv/bin/python" -c 'import pycpt, pycpt._native' \
	        && { "$$work/venv/bin/pycpt" check --json >/dev/null; [ $$? -le 1 ]; }) \
	    || { echo "package-check: $$(basename "$$dist") does not install and run"; exit 1; }; \
	    echo "package-check: $$(basename "$$dist") installs and runs"; rm -rf "$$work/venv"; \
	  done

bench: setup
	$(BIN)/python -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) build dist *.egg-info pycpt/_cpt*.so pycpt/_cpt.c pycpt/_cpt.o
