# collab_jax: `make run` trains the offline default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

.PHONY: install run test bench data clean

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

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) experiments/bench.py --out=experiments/results

clean:
	rm -rf $(VENV) runs .pytest_cache
