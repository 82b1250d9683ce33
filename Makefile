# `make bench` runs the main job, `make test` the tests; each creates .venv and installs what is
# missing first. torch is installed before the project so pip never resolves it on its own:
# the default is the CPU wheel torch==2.13.0; a GPU user sets TORCH_SPEC (or installs their own
# torch into .venv first: an importable torch is kept as it is).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BENCH_ARGS ?=

.PHONY: install test bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m cachecompile bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info bench-out
