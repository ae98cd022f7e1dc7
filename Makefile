# make demo / make test on a fresh clone: a .venv with pip, torch installed first (pinned, from the
# local CPU wheel here; override with `make test TORCH_SPEC="torch==2.5.1 --index-url ..."` for a GPU build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

BIN := $(VENV)/bin
API_MODULES := processes parametrization grids samplers tuning pf_ode likelihood inversion guidance inverse losses \
	training runs oracle data nets metrics quality distributed report adapters.diffusers adapters.karras
STAMP := $(VENV)/.unstir-installed

.PHONY: demo demo-images test test-slow bench gpu-check docs install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unstir demo --out runs/demo --force
	$(BIN)/unstir report --run runs/demo/run

demo-images: $(STAMP)
	$(BIN)/unstir demo --images --out runs/demo-images --force

# Both cores (pytest-xdist), one intra-op thread per worker: 2 min 50 s against 3 min 50 s serial on a quiet
# 2-core machine; two workers at torch's default two threads each oversubscribe the cores (over 18 min).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -s

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/samplers.py --out benchmarks/samplers_results.md
	$(BIN)/python benchmarks/training.py --out benchmarks/training_results.md
	$(BIN)/python benchmarks/likelihood.py --out benchmarks/likelihood_results.md
	$(BIN)/python benchmarks/conditional.py --out benchmarks/conditional_results.md
	$(BIN)/python benchmarks/inverse.py --out benchmarks/inverse_results.md

# Every verb on a GPU, its numbers against the CPU's, and the speed table against diffusers (under 8 minutes on one
# GPU; install a CUDA build of torch first: make gpu-check TORCH_SPEC="torch==... --index-url ...").
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --device cuda --out benchmarks/gpu_results.md

docs: $(STAMP)
	$(BIN)/pip install --quiet "pdoc>=14"
	$(BIN)/pdoc unstir $(addprefix unstir.,$(API_MODULES)) --docformat google -o site 2>/dev/null
	@echo "API reference: site/index.html"

clean:
	rm -rf $(VENV) runs site .pytest_cache
