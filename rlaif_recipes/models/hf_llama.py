"""Build a torchtune Llama from an HF checkpoint's config.json, and map weights back to HF names.

torchtune's builders (`llama3_2_1b`, ...) hard-code their shapes; this reads them from the
checkpoint instead, so any Llama-architecture HF directory (the tiny test model included) trains
in torchtune and its weights can be pushed to vLLM under HF names.
"""

import json
from pathlib import Path
from typing import Any, Dict

import torch
from torchtune.models import convert_weights
from torchtune.models.llama3 import llama3
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
    cfg = hf_config(checkpoint_dir)
    if cfg.get("model_type") != "llama" or cfg.get("tie_word_embeddings"):
        raise ValueError(
            f"{checkpoint_dir} is a {cfg.get('model_type')} model"
            f"{' with tied embeddings' if cfg.get('tie_word_embeddings') else ''}; "
            "llama3_from_hf_dir builds untied Llama models, use torchtune's own builder for it"
        )
    return llama3(
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
    return convert_weights.tune_to_hf(
        state_dict,
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        dim=cfg["hidden_size"],
        head_dim=cfg.get("head_dim"),
    )
