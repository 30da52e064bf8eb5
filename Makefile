# The two commands a user needs: `make demo` and `make test`. Both set up .venv first if missing:
# the library (editable) with its extras, and this repository's training application, which runs
# from here and is never installed into site-packages (scripts/install_application.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC := torch==2.13.0
# TorchRec (recipes.torchrec_ranking) declares a dependency on `fbgemm-gpu`, the CUDA build, which a
# resolver pulls in and which overwrites the CPU build (same import folder `fbgemm_gpu/`). So
# torchrec is installed last, alone and with --no-deps; its other dependencies, with
# fbgemm-gpu-cpu in place of fbgemm-gpu, are the `torchrec` extra in pyproject.toml.
TORCHREC_SPEC := torchrec==1.8.0

.PHONY: setup demo test quick lint typecheck bench bench-quick screenshots clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,torchrec]"
	$(BIN)/python -m pip install --quiet --no-deps "$(TORCHREC_SPEC)"
	$(BIN)/python -c "import torchrec, fbgemm_gpu"
	$(BIN)/python scripts/install_application.py
	touch $(STAMP)

# The main job: train 3 epochs with one injected failure (watch the retry), then run the same
# command again: it resumes from the checkpoint directory and skips every epoch.
demo: $(STAMP)
	@dir=$$(mktemp -d /tmp/tml-demo-XXXXXX); \
	echo "== training into $$dir/run (failure injected at step 50: the epoch is retried)"; \
	$(BIN)/tml train --save-dir $$dir/run --epochs 3 --steps-per-epoch 20 --checkpoint-every-steps 10 \
	  --fail-at-step 50 && \
	echo "== same command again: resumes, nothing left to train" && \
	$(BIN)/tml train --save-dir $$dir/run --epochs 3 --steps-per-epoch 20 --checkpoint-every-steps 10 && \
	$(BIN)/tml checkpoints list $$dir/run

# Four pytest-xdist workers, each running whole test modules (module fixtures are built once;
# the four longest modules start first, one per worker: tests/conftest.py). Most of the suite
# waits on processes it started (imports, servers, ranks), so the workers finish sooner than
# one process even when every core is busy. `make test PYTEST_PARALLEL=` runs it in one process.
PYTEST_PARALLEL ?= -n 4 --dist loadscope --no-loadscope-reorder

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# The edit-test loop (~3.5 min): all but the tests marked slow in tests/conftest.py (Prefect
# server, kill, signal, deployment and multi-rank tests).
quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Writes benchmarks/results/*.json and redraws docs/benchmarks.svg (the README's chart).
bench: $(STAMP)
	$(BIN)/pip install --quiet --no-deps torch-checkpointing==0.1.1  # the `bench` extra: a peer measured
	$(BIN)/python benchmarks/bench_save_restore.py --size-mb 512 --repeat 5 --json \
	  > benchmarks/results/save_restore.json
	$(BIN)/python benchmarks/chart.py benchmarks/results/save_restore.json docs/benchmarks.svg
	$(BIN)/python benchmarks/bench_flow_overhead.py --short 2 --long 12 --repeat 5
	$(BIN)/python benchmarks/bench_verify.py --size-mb 1024 --repeat 5 --json \
	  > benchmarks/results/verify.json
	$(BIN)/python benchmarks/bench_torchrec.py --repeat 3 --json > benchmarks/results/torchrec.json
	$(BIN)/python benchmarks/bench_sharded.py --busy --json  # writes benchmarks/results/sharded.json
	$(BIN)/python benchmarks/bench_first_save.py --runs 7
	$(BIN)/python benchmarks/bench_fast.py --json --chart docs/performance.png \
	  > benchmarks/results/fast.json
	$(BIN)/python benchmarks/bench_s3.py --json > benchmarks/results/s3.json
	$(BIN)/python benchmarks/bench_incremental.py --json > benchmarks/results/incremental.json
	$(BIN)/python benchmarks/bench_eval_latency.py --query-seconds 2 --json \
	  > benchmarks/results/eval_latency.json

# ~3 minutes: the writer-process and incremental benchmarks on small states (edit-measure loop).
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench_fast.py --quick
	$(BIN)/python benchmarks/bench_incremental.py --quick

# Refreshes docs/screenshots/*.png (the README's Prefect UI pictures), ~70 s: a private Prefect
# server, `prefect deploy --all`, a worker, one train run and the evaluations its checkpoint
# events start, photographed in headless Chromium. Needs Debian's chromium
# (apt-get install -y chromium); the `screenshots` extra brings playwright.
screenshots: $(STAMP)
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[screenshots]"
	$(BIN)/python scripts/ui_screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
