# collab_jax: `make run` trains the offline default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

.PHONY: install run test bench bench-device data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Debian's dataset-fashion-mnist holds the original IDX files; install it when
# it is missing and we may (root), otherwise say how.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist ..."; \
	  apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist' or set FMNIST_DIR=<dir with the IDX files>"; exit 1; \
	fi

run: install data
	$(PY) -m collab_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) \
	  --config.data_dir=$(FMNIST_DIR)

test: install
	$(PY) -m pytest -q tests

# The PyTorch peer runs in its own Python 3.11 venv (torch's CPU wheel exists
# for 3.11 here; on newer Pythons pip would fetch a CUDA build of several GB);
# bench.py calls it as a subprocess. About 15 minutes on 2 cores.
TORCH_PYTHON_BASE ?= $(shell command -v python3.11 || echo $$(pyenv root 2>/dev/null)/versions/3.11*/bin/python3.11)
TORCH_VENV := .venv-torch
bench: install $(TORCH_VENV)/.installed
	$(PY) experiments/bench.py --out=experiments/results --torch_python=$(TORCH_VENV)/bin/python

$(TORCH_VENV)/.installed:
	test -x $(TORCH_VENV)/bin/python || $(TORCH_PYTHON_BASE) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q torch==2.13.0 numpy
	touch $@

# The accelerator check (under 6 minutes on one H100): writes
# experiments/results/bench_<device>.md and .json.
bench-device: install
	$(PY) experiments/bench.py --device --out=experiments/results

clean:
	rm -rf $(VENV) $(TORCH_VENV) runs .pytest_cache
