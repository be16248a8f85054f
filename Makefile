# Two entry points that do all the set-up themselves: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qaconv-built
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: all setup demo test test-fast bench nvcc-check emu-mutants dist-check wheel-check clean

all: test

$(STAMP): $(SOURCES) tools/bootstrap.sh
	VENV=$(VENV) bash tools/bootstrap.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qaconv demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Results go to a new folder runs/bench/<date-time>/; `make bench UPDATE=1` rewrites the committed
# benchmarks/results/cpu_match.json (docs/PERFORMANCE.md's table) instead.
bench: $(STAMP)
	$(PY) benchmarks/bench_match.py $(if $(filter 1,$(UPDATE)),--update-results)

nvcc-check: $(STAMP)
	bash tools/nvcc_check.sh $(PY)

# Every mutant of the CUDA emulator's mutation table (docs/CUDA.md); `make test` runs a subset.
emu-mutants: $(STAMP)
	QACONV_EMU_MUTANTS=all $(PY) -m pytest -q tests/test_cuda_emu_mutants.py

# The sdist and a wheel built from it, each installed into a fresh virtual environment and run from
# outside the repository (compiles the extension twice: a few minutes).
dist-check: $(STAMP)
	bash tools/check_dist.sh $(PY)

# One abi3 wheel built once (with ../venv-cu130's torch 2.14.1+cu130 and nvcc when that venv exists: CPU and
# CUDA kernels), installed without a compiler next to torch 2.13 CPU and torch 2.14.1+cu130 and run from
# outside the tree; auditwheel. `make wheel-check UPDATE=1` rewrites benchmarks/results/wheel_check.json.
wheel-check: $(STAMP)
	bash tools/wheel_check.sh $(if $(filter 1,$(UPDATE)),--update-results)

clean:
	rm -rf build *.egg-info qaconv_ext/_kernels*.so qaconv_ext/_build_info.json $(STAMP)
