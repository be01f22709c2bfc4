# collab_jax: `make run` trains the offline default, `make test` runs the tests.
# The newest Python here that runs (3.13, 3.12, then 3.11; pyenv's too), so
# the venv gets the newest JAX it is served. Override with PYTHON=...
PYTHON ?= $(shell for v in 3.13 3.12 3.11; do \
  for c in python$$v $$(pyenv root 2>/dev/null)/versions/$$v*/bin/python$$v; do \
    if $$c -c 'import venv, ensurepip' >/dev/null 2>&1; then echo $$c; exit 0; fi; \
  done; done; echo python3)
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

.PHONY: install run test bench bench-device data clean onednn

install: $(VENV)/.installed

# A venv made by another Python (e.g. before a newer one was installed) is
# made anew.
$(VENV)/.installed: pyproject.toml
	@want=$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])'); \
	  have=$$($(PY) -c 'import sys; print(sys.version_info[:2])' 2>/dev/null); \
	  if [ "$$want" != "$$have" ]; then rm -rf $(VENV); fi
	@echo "Python for $(VENV): $(PYTHON) ($$($(PYTHON) --version))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,test]'
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

# pytest-xdist, one worker per core: the suite is mostly single-threaded XLA
# compilation of tiny programs (a third worker on 2 cores: 7 min 6 s against
# 7 min 13 s, one run each, no clear gain). TEST_WORKERS=0 runs one process.
TEST_WORKERS ?= auto
# The tests' temporary folders (pytest keeps the last 3 runs') go to memory
# when /dev/shm has 4 GiB free: checkpoints are written and deleted all
# through the suite, and on a disk mounted with online discard each unlink
# waits (reliability and sweep tests: 116 s on tmpfs against 128 s on disk).
TEST_TMPDIR ?= $(shell [ -w /dev/shm ] && [ $$(df -Pk /dev/shm | awk 'NR==2 {print $$4}') -gt 4194304 ] && echo /dev/shm || echo $${TMPDIR:-/tmp})
test: install
	TMPDIR=$(TEST_TMPDIR) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# The PyTorch peer runs in its own Python 3.11 venv (torch's CPU wheel exists
# for 3.11 here; on newer Pythons pip would fetch a CUDA build of several GB);
# bench.py calls it as a subprocess. About 30 minutes on 2 cores.
TORCH_PYTHON_BASE ?= $(shell command -v python3.11 || echo $$(pyenv root 2>/dev/null)/versions/3.11*/bin/python3.11)
TORCH_VENV := .venv-torch
# The oneDNN rows need `make onednn`; without it (e.g. no g++) they say "not
# built" and the rest runs.
bench: install $(TORCH_VENV)/.installed
	-$(MAKE) onednn
	$(PY) experiments/bench.py --out=experiments/results --torch_python=$(TORCH_VENV)/bin/python

$(TORCH_VENV)/.installed:
	test -x $(TORCH_VENV)/bin/python || $(TORCH_PYTHON_BASE) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q torch==2.13.0 numpy
	touch $@

# Opt-in: convolutions on CPU through oneDNN (collab_jax/models/onednn_conv.py),
# a jax.ffi extension compiled from csrc/onednn_conv.cc against the `onednn`
# extra (oneDNN 3.2's OpenMP build from PyPI, into the venv). No root needed,
# except to apt-get a missing g++. Nothing uses it unless asked
# (bench.py's "oneDNN convolutions (jax.ffi)" rows); tests skip without it.
ONEDNN_SO := collab_jax/models/_onednn_conv.so
onednn: $(ONEDNN_SO)

$(VENV)/.installed-onednn: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[train,test,onednn]'
	touch $@

$(ONEDNN_SO): csrc/onednn_conv.cc $(VENV)/.installed-onednn
	@command -v g++ >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q >/dev/null && apt-get install -y -q g++ >/dev/null; \
	  else echo "make onednn needs g++ (e.g. sudo apt-get install g++)"; exit 1; fi; }
	prefix=$$(cd $(VENV) && pwd); \
	g++ -O2 -std=c++17 -shared -fPIC -fopenmp -Wno-attributes -Wno-return-type \
	  -I$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())') \
	  -I$$prefix/include $< -o $@ -L$$prefix/lib -ldnnl -Wl,-rpath,$$prefix/lib
	$(PY) -c 'from collab_jax.models import onednn_conv as o; assert o.available(); print("oneDNN", o.version(), o.implementation("bwd_w", (128, 32, 32, 16), (3, 3, 16, 16)))'

# The accelerator check (under 6 minutes on one H100): writes
# experiments/results/bench_<device>.md and .json.
bench-device: install
	$(PY) experiments/bench.py --device --out=experiments/results

clean:
	rm -rf $(VENV) $(TORCH_VENV) runs .pytest_cache $(ONEDNN_SO)
