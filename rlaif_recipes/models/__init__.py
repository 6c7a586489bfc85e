"""Model builders that read an HF checkpoint directory, and the tiny test model."""

from rlaif_recipes.models.hf_llama import (
    hf_config,
    hf_to_tune_state_dict,
    llama3_from_hf_dir,
    lora_llama3_from_hf_dir,
    tune_to_hf_state_dict,
)
from rlaif_recipes.models.tiny import make_tiny_model

__all__ = [
    "hf_config",
    "hf_to_tune_state_dict",
    "llama3_from_hf_dir",
    "lora_llama3_from_hf_dir",
    "make_tiny_model",
    "tune_to_hf_state_dict",
]
