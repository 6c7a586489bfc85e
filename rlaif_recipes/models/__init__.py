"""Model builders that read an HF checkpoint directory, a cheap check of one, the hub-free model fetcher, and the
tiny test model."""

from rlaif_recipes.models.hf_model import (
    UnsupportedModelError,
    check_checkpoint_dir,
    decoder_from_hf_dir,
    hf_checkpointer,
    hf_config,
    hf_to_tune_state_dict,
    lora_decoder_from_hf_dir,
    tune_to_hf_state_dict,
)
from rlaif_recipes.models.tiny import make_tiny_model

__all__ = [
    "UnsupportedModelError",
    "check_checkpoint_dir",
    "decoder_from_hf_dir",
    "hf_checkpointer",
    "hf_config",
    "hf_to_tune_state_dict",
    "lora_decoder_from_hf_dir",
    "make_tiny_model",
    "tune_to_hf_state_dict",
]
