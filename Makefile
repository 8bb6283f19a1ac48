# Two commands set up a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on this project's machines; an unpinned torch
# would pull a multi-GB CUDA build. A machine that already has torch keeps it.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[dev,hf,accelerate]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/autobatch run configs/demo.yaml

test: install
	$(PY) -m pytest -q --durations=25  # the 25 slowest tests listed at the end

lint: install
	$(VENV)/bin/ruff check .

bench: install  # runs every benchmark (~50 min on 2 cores), rewrites benchmarks/RESULTS.md
	$(PY) benchmarks/make_results.py

clean:
	rm -rf $(VENV)
