# Set-up and the project's commands. Run as root on Debian 12/13; every target installs what
# is missing first (apt packages, a virtualenv in .venv with pycpt, the CRIU engine).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup:
	@$(PYTHON) -c 'import sysconfig, os, sys, venv, ensurepip; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
	  && command -v gcc >/dev/null && command -v unshare >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3-dev python3-venv util-linux mount; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@$(BIN)/pycpt engine install

demo: setup
	$(BIN)/pycpt demo

test: setup
	$(BIN)/python -m pytest -ra tests

bench: setup
	$(BIN)/python -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info pycpt/_cpt*.so
