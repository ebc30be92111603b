# Two commands do everything: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean test-torch29 test-models test-xla

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 first: it is the CPU wheel on this machine's disk; any other spec pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	OMP_NUM_THREADS=1 $(BIN)/python examples/demo.py

test: venv lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests --ignore=tests/models --ignore=tests/xla

# Model code from other libraries (torchtitan 0.3, timm 1.0) in tests/models, which skip without
# it. Installed --no-deps: torchtitan's declared dependencies (datasets, wandb, tensorboard, ...)
# are for its trainer, not for the model code tested here (it imports triton, ~1 GB), and timm's
# would pull a CUDA torch. timm needs torchvision (0.28 is torch 2.13's; pillow is what it
# imports), whose PyPI build is CUDA-only: its C extension cannot load here, and once installed
# it breaks `import transformers` models. So timm, torchvision and pillow go to their own
# directory, on the path of this lane only (tests/models/conftest.py makes torchvision importable).
MODELS_PKGS := torchtitan==0.3.0 spmd_types tyro docstring_parser triton
MODELS_SITE := .models-site
MODELS_SITE_PKGS := timm==1.0.22 torchvision==0.28.0 pillow

$(BIN)/.models: $(BIN)/.installed Makefile
	$(BIN)/pip install -q --no-deps $(MODELS_PKGS)
	$(BIN)/pip install -q --no-deps --target $(MODELS_SITE) $(MODELS_SITE_PKGS)
	touch $@

test-models: $(BIN)/.models
	OMP_NUM_THREADS=1 PYTHONPATH=$(MODELS_SITE) $(BIN)/python -m pytest -q -n 2 tests/models

# code health: imports point one way (import-linter layers contract), ruff lint and format
lint: venv
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# Optional, not part of CI: the suite on the oldest supported torch. torch 2.9.0 comes from PyPI
# as a CUDA build of several GB (it runs on CPU); the rest resolves as for `make test`.
VENV29 := .venv-torch29

$(VENV29)/bin/.installed: pyproject.toml
	test -x $(VENV29)/bin/python || $(PY) -m venv $(VENV29)
	$(VENV29)/bin/pip install -q --upgrade pip
	$(VENV29)/bin/pip install -q torch==2.9.0
	$(VENV29)/bin/pip install -q -e ".[test]" torch==2.9.0
	touch $@

test-torch29: $(VENV29)/bin/.installed
	OMP_NUM_THREADS=1 $(VENV29)/bin/python -m pytest -q -n 2 tests --ignore=tests/models --ignore=tests/xla

# The torch-xla lane: its own venv (torch-xla 2.9.0 pins torch 2.9.0, a CUDA build of several GB
# from PyPI that runs on CPU; about 2.5 min and 7 GB), PJRT on CPU. tests/xla skip without it.
VENVXLA := .venv-xla
XLA_PKGS := torch==2.9.0 torch-xla==2.9.0

$(VENVXLA)/bin/.installed: pyproject.toml
	test -x $(VENVXLA)/bin/python || $(PY) -m venv $(VENVXLA)
	$(VENVXLA)/bin/pip install -q --upgrade pip
	$(VENVXLA)/bin/pip install -q $(XLA_PKGS)
	$(VENVXLA)/bin/pip install -q -e ".[test]" $(XLA_PKGS)
	touch $@

test-xla: $(VENVXLA)/bin/.installed
	PJRT_DEVICE=CPU OMP_NUM_THREADS=1 $(VENVXLA)/bin/python -m pytest -q tests/xla

clean:
	rm -rf $(VENV) $(VENV29) $(VENVXLA) $(MODELS_SITE)
