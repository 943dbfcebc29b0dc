# Quick start:  make train   (set up, then train RepVGG-A0 on Fashion-MNIST)
#               make test    (set up, then run the test suite)
# Both create .venv when missing and install only what changed since the last run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/fashion_mnist_a0
CONFIG ?= configs/fashion_mnist.py
# The torch/torchvision pair known to run on this CPU image (timm needs torchvision);
# set TORCH_PINS= to let pip choose.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# loadfile: a module's tests run in one worker, so that its costly module fixtures (training
# runs, conversions, calibrations) are computed once.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: train test setup setup-test data model-table gpu-carry clean

train: setup data
	$(PY) train.py --config $(CONFIG) --workdir $(WORKDIR)

test: setup-test data
	$(PY) -m pytest $(PYTEST_ARGS) tests

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,torch]' $(TORCH_PINS)
	touch $@

# Debian's dataset-fashion-mnist gives the real data offline; without it (not root, no
# apt) the input pipeline falls back to TFDS's own downloader.
data:
	@test -d $(FASHION_MNIST_DIR) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; }; } || \
	  echo "note: $(FASHION_MNIST_DIR) missing; Fashion-MNIST will come from TFDS's downloader"

# What the GPU machines lack, for tools/gpu_check.sh and tools/gpu_train_check.sh (run
# with this folder carried along): pure-Python packages unpacked into .gpu_carry/site, and
# the Fashion-MNIST IDX files in .gpu_carry/fashion-mnist.
gpu-carry: setup data
	rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels .gpu_carry/fashion-mnist
	$(PY) -m pip download -q --no-deps -d .gpu_carry/wheels ml_collections
	$(PY) -m pip install -q --no-deps --target .gpu_carry/site .gpu_carry/wheels/*.whl
	cp $(FASHION_MNIST_DIR)/*.gz .gpu_carry/fashion-mnist/

# Regenerate the model table of README.md from the code.
model-table: setup
	$(PY) -m repvgg_jax.model_table

clean:
	rm -rf $(VENV) runs
