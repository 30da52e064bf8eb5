# The two commands a user needs: `make demo` and `make test`. Both set up .venv first if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC := torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_save_restore.py --size-mb 512 --repeat 3
	$(BIN)/python benchmarks/bench_verify.py --size-mb 1024 --repeat 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
