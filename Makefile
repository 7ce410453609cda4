# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# The constraints file pins torch==2.13.0 (a CPU build on the dev machines' disk).
PIP_INSTALL := $(PIP) install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install install-test browser gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps make a second run install nothing; they are redone when packaging changes.
$(VENV)/.stamp-install: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

# Tests run with the optional plotting and TensorBoard extras too, so the PNG/SVG and event-file
# paths are exercised (tests/test_tensorboard.py also runs a fake writer where tensorboard is absent).
$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PIP_INSTALL) -e '.[test,plot,tensorboard]'
	touch $@

# The gpu extra (triton) on top of the test extras, for `make gpu-check`.
$(VENV)/.stamp-gpu: $(VENV)/.stamp-test
	$(PIP_INSTALL) -e '.[test,plot,tensorboard,gpu]'
	touch $@

install: $(VENV)/.stamp-install
install-test: $(VENV)/.stamp-test

demo: install
	$(BIN)/charlstm train --data pystdlib --preset demo --name demo --overwrite
	$(BIN)/charlstm sample checkpoints/demo --length 600 --temperature 0.8

# Lint first (ruff, configured in pyproject.toml), then the tests.
test: install-test
	$(BIN)/ruff check . && $(BIN)/python -m pytest -q

# The browser test (tests/test_visualize.py) renders the page in headless Chromium; no test installs
# it. As root with apt-get, install Debian's chromium where no Chromium is on PATH; otherwise say
# why not and succeed (the test then skips with the reason). .ci/run calls this before `make test`.
CHROMIUM_NAMES := chromium chromium-browser google-chrome google-chrome-stable
browser:
	@found=$$(command -v $(CHROMIUM_NAMES) | head -n 1); \
	if [ -n "$$found" ]; then \
	  echo "browser: $$found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "browser: installing Debian's chromium with apt-get"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    || echo "browser: apt-get could not install chromium: the browser test will be skipped"; \
	else \
	  echo "browser: no Chromium on PATH and not root with apt-get: the browser test will be skipped"; \
	fi

# On a CUDA machine: device and versions, every CUDA test, charlstm bench on every variant and
# backend, one layer's window on every path, 60 s of bf16 training, 10,000 sampled characters;
# one JSON report (benchmarks/gpu_check.py). Without a CUDA device it says so and exits 0.
gpu-check: $(VENV)/.stamp-gpu
	$(BIN)/python benchmarks/gpu_check.py --out checkpoints/gpu-check.json

clean:
	rm -rf $(VENV) checkpoints/demo
