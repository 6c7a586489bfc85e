"""LoRA pieces shared by `dpo` and `online_dpo`: adapter shapes, fresh adapters, merged weights.

With LoRA only the adapters train, the reference is the same model with its adapters switched off
(`torchtune.modules.peft.disable_adapter`, no second copy of the weights), and whatever leaves the
trainer (vLLM weight pushes, HF checkpoints) holds the adapters merged into the base weights.
"""

import math
from typing import Dict, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config
from torchtune.modules.peft import LoRALinear, get_adapter_params, get_merged_lora_ckpt

AdapterShapes = Dict[str, Tuple[int, ...]]


def adapter_shapes(cfg_model: DictConfig) -> AdapterShapes:
    """Adapter parameter names and shapes (empty without LoRA), from a meta-device build."""
    with torch.device("meta"):
        probe = config.instantiate(cfg_model)
    return {name: tuple(p.shape) for name, p in get_adapter_params(probe).items()}


def fresh_adapters(shapes: AdapterShapes, seed: int) -> Dict[str, torch.Tensor]:
    """LoRA's own init (A: Kaiming-uniform, B: zeros), so the policy starts equal to the reference.
    One generator seeded by the config: every rank draws the same adapters (torchtune seeds each
    rank's global generator differently)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape)
        out[name] = nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g) if name.endswith("lora_a.weight") else t.zero_()
    return out


def merged_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state_dict` (full tensors of `model`) with every adapter merged into its base weight and
    removed; only the merged weights are copied, so the live model is never written to."""
    lora = next(m for m in model.modules() if isinstance(m, LoRALinear))
    modules = {k[: -len(".lora_a.weight")] for k in state_dict if k.endswith(".lora_a.weight")}
    out = {k: v.clone() if k[: -len(".weight")] in modules else v for k, v in state_dict.items()}
    return get_merged_lora_ckpt(out, rank=lora.rank, alpha=lora.alpha)
