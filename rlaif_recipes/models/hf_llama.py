"""Build a torchtune Llama from an HF checkpoint's config.json, and map weights back to HF names.

torchtune's builders (`llama3_2_1b`, ...) hard-code their shapes; this reads them from the
checkpoint instead, so any Llama-architecture HF directory (the tiny test model included) trains
in torchtune and its weights can be pushed to vLLM under HF names.
"""

import json
from pathlib import Path
from typing import Any, Dict, List

import torch
from torchtune.models import convert_weights
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.modules import TransformerDecoder


def hf_config(checkpoint_dir: str) -> Dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}; point checkpoint_dir at an HF model directory")
    return json.loads(path.read_text())


def _rope_base(cfg: Dict[str, Any]) -> float:
    # transformers 5 writes rope_parameters.rope_theta instead of rope_theta
    return float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))


def llama3_from_hf_dir(checkpoint_dir: str, max_seq_len: int | None = None) -> TransformerDecoder:
    """A torchtune Llama3-style decoder shaped like the HF checkpoint in `checkpoint_dir`."""
    return llama3(**_llama3_shape(checkpoint_dir, max_seq_len))


def lora_llama3_from_hf_dir(
    checkpoint_dir: str,
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    max_seq_len: int | None = None,
) -> TransformerDecoder:
    """The same decoder with LoRA adapters (torchtune's `lora_llama3`); base weights load unchanged."""
    return lora_llama3(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        **_llama3_shape(checkpoint_dir, max_seq_len),
    )


def _llama3_shape(checkpoint_dir: str, max_seq_len: int | None) -> Dict[str, Any]:
    cfg = hf_config(checkpoint_dir)
    if cfg.get("model_type") != "llama" or cfg.get("tie_word_embeddings"):
        raise ValueError(
            f"{checkpoint_dir} is a {cfg.get('model_type')} model"
            f"{' with tied embeddings' if cfg.get('tie_word_embeddings') else ''}; "
            "llama3_from_hf_dir builds untied Llama models, use torchtune's own builder for it"
        )
    return dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        embed_dim=cfg["hidden_size"],
        max_seq_len=max_seq_len or cfg["max_position_embeddings"],
        intermediate_dim=cfg["intermediate_size"],
        norm_eps=cfg["rms_norm_eps"],
        rope_base=_rope_base(cfg),
    )


def tune_to_hf_state_dict(state_dict: Dict[str, torch.Tensor], checkpoint_dir: str) -> Dict[str, torch.Tensor]:
    """torchtune-named weights -> HF names (what vLLM and transformers load)."""
    cfg = hf_config(checkpoint_dir)
    if cfg.get("model_type") == "qwen2":  # q/k/v biases and tied embeddings: torchtune's Qwen2 mapping
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(state_dict, **_weight_shape(cfg), tie_word_embeddings=_tied(cfg))
    return convert_weights.tune_to_hf(state_dict, **_weight_shape(cfg))


def hf_to_tune_state_dict(state_dict: Dict[str, torch.Tensor], checkpoint_dir: str) -> Dict[str, torch.Tensor]:
    """HF names -> torchtune names: the inverse of tune_to_hf_state_dict, for reading checkpoints back."""
    cfg = hf_config(checkpoint_dir)
    if cfg.get("model_type") == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(state_dict, **_weight_shape(cfg), tie_word_embeddings=_tied(cfg))
    return convert_weights.hf_to_tune(state_dict, **_weight_shape(cfg))


def _weight_shape(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The attention shape torchtune's weight converters need to permute q/k projections."""
    return {
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg["num_key_value_heads"],
        "dim": cfg["hidden_size"],
        "head_dim": cfg.get("head_dim"),
    }


def _tied(cfg: Dict[str, Any]) -> bool:
    return cfg.get("tie_word_embeddings", False)
