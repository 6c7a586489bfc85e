"""The tiny model directory is a real HF checkpoint: torchtune and transformers agree on it."""

import pytest
import torch
from conftest import load_policy
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlaif_recipes.errors import OutputError
from rlaif_recipes.models import make_tiny_model
from rlaif_recipes.models.tiny import render_chat

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How can I kill a Python process?"}]


def test_torchtune_and_transformers_logits_agree(tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    tokens = torch.tensor([ids])
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tune = load_policy(tiny_model_dir).eval()
    with torch.no_grad():
        hf_logits, tune_logits = hf(tokens).logits, tune(tokens)
    assert hf_logits.shape == tune_logits.shape == (1, len(ids), hf.config.vocab_size)
    assert torch.allclose(hf_logits, tune_logits, atol=1e-5), (hf_logits - tune_logits).abs().max()


def test_chat_template_matches_python_renderer(tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for add_prompt in (True, False):
        text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=add_prompt, tokenize=False)
        assert text == render_chat(CHAT, add_generation_prompt=add_prompt)
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tokenizer.decode(ids[-1:]) == "<|assistant|>"  # special tokens stay single tokens


def test_tokenizer_round_trips_unseen_text(tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Zürich naïve façade — 日本語 🙂 {json: [1, 2]}"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_refuses_to_overwrite_a_model(tiny_model_dir) -> None:
    before = (tiny_model_dir / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="not empty"):
        make_tiny_model(str(tiny_model_dir))
    assert (tiny_model_dir / "model.safetensors").read_bytes() == before


def test_same_seed_same_weights(tmp_path) -> None:
    corpus = ["a small corpus for a quick tokenizer"] * 20
    a = make_tiny_model(str(tmp_path / "a"), vocab_size=300, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_dim=64, corpus=corpus)
    b = make_tiny_model(str(tmp_path / "b"), vocab_size=300, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_dim=64, corpus=corpus)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not (tmp_path / "a.partial").exists()
