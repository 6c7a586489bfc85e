"""Build the trainable policy from config, on one process or sharded with FSDP2 across ranks."""

from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune import config, modules, training


def build_policy(
    cfg_model: DictConfig,
    state_dict: Dict[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Instantiate `cfg_model` and load `state_dict` (torchtune names, full tensors).

    Under torchrun the model is created on the meta device, sharded layer by layer with FSDP2
    (torchtune's `shard_model`), and each rank loads only its shards, as torchtune's own
    distributed recipes do.
    """
    distributed = training.is_distributed()
    with training.set_default_dtype(dtype), torch.device("meta" if distributed else device):
        model = config.instantiate(cfg_model)
    if activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if not distributed:
        model.load_state_dict(state_dict)
        return model
    training.shard_model(
        model=model,
        shard_conditions=[lambda name, module: isinstance(module, modules.TransformerSelfAttentionLayer)],
        cpu_offload=False,
        reshard_after_forward=reshard_after_forward,
    )
    with training.set_default_dtype(dtype), device:
        for m in model.modules():
            if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                m.rope_init()
    training.load_from_full_model_state_dict(model, state_dict, device, strict=True, cpu_offload=False)
    training.validate_no_params_on_meta_device(model)
    return model


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded weights on every rank (a collective under FSDP2: all ranks must call it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
