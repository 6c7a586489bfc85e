"""A tiny Llama-architecture model in HF format, for tests, the demo and benchmarks.

The directory it writes is a normal HF checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json), so the same files load in
torchtune (FullModelHFCheckpointer), vLLM and transformers. No model hub is involved: the
tokenizer is a byte-level BPE trained here on the text it is given.
"""

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlaif_recipes.errors import ConfigError, OutputError

BOS, EOS, PAD, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|eot|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, EOT, *ROLE_TOKENS]

# One turn is `<|role|>content<|eot|>`; a prompt ends with `<|assistant|>` so the model answers
# and stops at `<|eot|>`. The Python twin of this template is `render_chat` below.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eot|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "assets"


def render_chat(messages: List[dict], add_generation_prompt: bool = True) -> str:
    """The chat template in Python, for code that must not depend on jinja (kept equal by a test)."""
    text = BOS + "".join(f"<|{m['role']}|>{m['content']}{EOT}" for m in messages)
    return text + "<|assistant|>" if add_generation_prompt else text


def default_corpus() -> List[str]:
    """Prompts and completions of the XSTest data the package ships (CC-BY-4.0, Röttger et al.)."""
    texts: List[str] = []
    for name in ("xstest_prompts.csv", "xstest_v2_completions_llama2orig.csv"):
        with open(PACKAGE_DATA / "xstest" / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                texts.append(row["prompt"])
                if row.get("completion"):
                    texts.append(row["completion"].strip())
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the chat special tokens; every byte is in the alphabet, so no <unk>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_tiny_model(
    out: str,
    *,
    vocab_size: int = 2048,
    dim: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_dim: int = 384,
    max_seq_len: int = 512,
    rope_base: float = 10000.0,
    seed: int = 0,
    corpus: Optional[List[str]] = None,
) -> Path:
    """Write a randomly initialised HF Llama checkpoint with a trained tokenizer to `out`.

    Files are written to a temporary sibling directory and renamed into place, so a killed run
    never leaves a half-written model behind.
    """
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise OutputError(f"{out_path} exists and is not empty; pass an empty or new directory")
    if dim % num_heads or num_heads % num_kv_heads:
        raise ConfigError(
            f"dim ({dim}) must be divisible by num_heads ({num_heads}) and num_heads by "
            f"num_kv_heads ({num_kv_heads})"
        )
    tmp = out_path.with_name(out_path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tok = train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    real_vocab = tok.get_vocab_size()

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": real_vocab,
        "hidden_size": dim,
        "intermediate_size": intermediate_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": dim // num_heads,
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_base,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOT], ids[EOS]],
        "pad_token_id": ids[PAD],
        "torch_dtype": "float32",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOT], ids[EOS]], "pad_token_id": ids[PAD]},
            indent=2,
        )
    )
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOT,
                "pad_token": PAD,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_seq_len,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}, indent=2)
    )
    save_file(_random_llama_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out_path.exists():
        out_path.rmdir()  # empty, checked above
    os.replace(tmp, out_path)
    return out_path


def _random_llama_weights(config: dict, seed: int) -> dict:
    """HF-named Llama weights: N(0, 0.02) matrices, unit norms (transformers' own init)."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    kv = config["num_key_value_heads"] * hd

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    w = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": torch.ones(d), "lm_head.weight": normal(v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": normal(config["num_attention_heads"] * hd, d),
            p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d),
            p + "self_attn.o_proj.weight": normal(d, config["num_attention_heads"] * hd),
            p + "mlp.gate_proj.weight": normal(f, d),
            p + "mlp.up_proj.weight": normal(f, d),
            p + "mlp.down_proj.weight": normal(d, f),
            p + "input_layernorm.weight": torch.ones(d),
            p + "post_attention_layernorm.weight": torch.ones(d),
        }
    return {k: t.contiguous() for k, t in w.items()}
