# make demo / make test on a fresh clone: a .venv with pip, torch installed first (pinned, from the
# local CPU wheel here; override with `make test TORCH_SPEC="torch==2.5.1 --index-url ..."` for a GPU build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.unstir-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unstir demo --out runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/samplers.py --out benchmarks/samplers_results.md
	$(BIN)/python benchmarks/training.py --out benchmarks/training_results.md
	$(BIN)/python benchmarks/likelihood.py --out benchmarks/likelihood_results.md
	$(BIN)/python benchmarks/conditional.py --out benchmarks/conditional_results.md
	$(BIN)/python benchmarks/inverse.py --out benchmarks/inverse_results.md

clean:
	rm -rf $(VENV) runs .pytest_cache
