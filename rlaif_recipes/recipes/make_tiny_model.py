"""Write the tiny HF-format Llama (weights + trained BPE tokenizer) used by tests and the demo.

    tune run rlaif_recipes/recipes/make_tiny_model.py --config make_tiny_model out=outputs/tiny-model
"""

import sys
from dataclasses import dataclass

from omegaconf import DictConfig
from torchtune import utils

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.models.tiny import make_tiny_model

log = utils.get_logger("INFO")


@dataclass
class MakeTinyModelSettings:
    out: str
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    max_seq_len: int
    seed: int


@rlaif_config.parse(MakeTinyModelSettings)
def recipe_main(cfg: DictConfig) -> None:
    settings = {k: v for k, v in cfg.items() if k != "config_choices"}
    path = make_tiny_model(**settings)
    log.info(f"wrote a tiny Llama ({cfg.num_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}) to {path}")


if __name__ == "__main__":
    sys.exit(recipe_main())
