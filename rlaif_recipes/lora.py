"""LoRA pieces shared by `dpo` and `online_dpo`: adapter shapes, fresh adapters, merged weights.

With LoRA only the adapters train, the reference is the same model with its adapters switched off
(`torchtune.modules.peft.disable_adapter`, no second copy of the weights), and whatever leaves the
trainer (vLLM weight pushes, HF checkpoints) holds the adapters merged into the base weights.
"""

import math
from typing import Dict, Iterable, Iterator, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torchtune import config
from torchtune.modules.peft import LoRALinear, get_adapter_params, get_merged_lora_ckpt

AdapterShapes = Dict[str, Tuple[int, ...]]
_LORA_PARTS = (".weight", ".lora_a.weight", ".lora_b.weight")  # a LoRALinear's tensors (a bias passes as it is)


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
    return dict(merge_adapters(model, state_dict.items()))


def merge_adapters(model: nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """`weights` (full tensors of `model`, in state-dict order) with each LoRA module's adapters
    merged into a copy of its base weight as soon as its three tensors have passed: a stream holds
    one module's tensors at a time, never the model's."""
    lora = {name.replace(_CHECKPOINT_PREFIX, ""): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    held: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, value in weights:
        module = next((name[: -len(s)] for s in _LORA_PARTS if name.endswith(s) and name[: -len(s)] in lora), None)
        if module is None:
            yield name, value
            continue
        parts = held.setdefault(module, {})
        parts[name] = value.clone() if name == f"{module}.weight" else value  # merged in place below
        if len(parts) == len(_LORA_PARTS):
            del held[module]
            yield from get_merged_lora_ckpt(parts, rank=lora[module].rank, alpha=lora[module].alpha).items()
