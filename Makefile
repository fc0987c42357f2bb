# Quick start:  make demo   (set up .venv, build, run the main job on the embedded default)
#               make test   (set up .venv, build, run every test)
# Everything lives in .venv; nothing is installed outside it.

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# nvcc on PATH may be a wrapper script: point CMake at the real toolkit when there is one.
export CUDA_HOME ?= $(shell for d in /usr/local/cuda /opt/cuda; do [ -x $$d/bin/nvcc ] && readlink -f $$d && break; done)

.PHONY: demo test test-pythons install venv bench info clean gpu-check

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Build vlmkern._C against the torch in .venv (no build isolation: ABI).
$(VENV)/.built: $(VENV)/.deps pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
	$(PIP) install -q --no-build-isolation --no-deps -e . || { echo "vlmkern build failed"; exit 1; }
	touch $@

install: $(VENV)/.built

info: install
	$(VENV)/bin/vlmkern info

demo: install
	$(VENV)/bin/vlmkern demo

test: install
	$(PY) -m pytest python_tests -q

# The suite on the oldest and newest other supported Pythons (3.10, 3.13; from
# PATH or pyenv), each in its own .venv-pyX.Y; CUDA sources off (see the script).
test-pythons:
	bash tools/test_pythons.sh

bench: install
	$(VENV)/bin/vlmkern bench --out bench/out

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV) .venv-py3.* vlmkern/_C*.so bench/out
