# Two commands do everything: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

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

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV)
