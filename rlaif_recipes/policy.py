"""Build the trainable policy from config, on one process or sharded with FSDP2 across ranks, and
check the settings it is built with before anything heavy starts."""

import contextlib
import functools
import os
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torchtune import config, modules, training, utils

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.checkpointing import tensor_bytes
from rlaif_recipes.dtypes import resolve_dtype
from rlaif_recipes.errors import ConfigError
from rlaif_recipes.logprobs import training_attention


def device_and_dtype(device: str, dtype: str) -> Tuple[torch.device, torch.dtype]:
    """torchtune's device and dtype (`auto`: bf16 where the device computes it natively, else fp32),
    refusing a device this machine lacks (torchtune would not)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}, but this machine has no usable CUDA GPU (torch {torch.__version__}); use device=cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device={device!r}: use device=cpu or device=cuda")
    torch_device = utils.get_device(device)
    try:
        return torch_device, training.get_dtype(resolve_dtype(dtype, torch_device), device=torch_device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"dtype={dtype} on device={device}: {str(e).splitlines()[0]}; use dtype=fp32, bf16 or auto") from None


def check_training_settings(cfg: DictConfig) -> None:
    """LoRA and checkpoint settings of dpo and online_dpo, before any weight loads: a LoRA rank of 0
    would build the model and die in its first forward with a bare ZeroDivisionError."""
    rlaif_config.check_ranges(cfg, (
        ("model.lora_rank", lambda v: v >= 1, "the adapter rank must be >= 1 (e.g. 8)"),
        ("model.lora_alpha", lambda v: v > 0, "the adapter scale must be > 0 (e.g. 2 x lora_rank)"),
        ("model.lora_dropout", lambda v: 0 <= v < 1, "dropout must be in [0, 1) (0: none)"),
        ("keep_last_checkpoints", lambda v: v >= 1, "keep at least 1 checkpoint, or null for all"),
    ))  # fmt: skip


def check_optimizer(
    optimizer: DictConfig,
    lr_scheduler: Optional[DictConfig] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """Build the optimizer (and schedule) on a stand-in weight of the run's dtype and device, so a
    bad `optimizer.*` fails in one line before the model is built rather than in torch's words
    after it. Returns the bytes of state the optimizer keeps per byte of trained weight (AdamW 2,
    SGD with momentum 1, plain SGD 0), measured by one step on the stand-in: what a checkpoint's
    size is planned with before the real optimizer has any state. The same step, with no gradient,
    shows what weight decay alone does at the full lr: lr x weight_decay >= 1 zeroes or flips the
    sign of every weight each step, a run that trains nothing while it looks fine."""
    weight = nn.Parameter(torch.ones(4096, dtype=dtype, device=device))
    try:
        built = config.instantiate(optimizer, [weight])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {str(e).splitlines()[0]}; fix optimizer.* in the config") from None
    weight.grad = torch.zeros_like(weight)
    built.step()
    kept = weight.detach().min().item()
    if not kept > 0:
        raise ConfigError(
            f"optimizer: one step with no gradient scales every weight by {kept:.3g} (weight decay {optimizer.get('weight_decay')} "
            f"at lr {optimizer.get('lr')}), which zeroes or flips them; lower optimizer.weight_decay so lr x weight_decay < 1"
        )
    if lr_scheduler is not None:
        try:
            config.instantiate(lr_scheduler, built, num_training_steps=1)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"lr_scheduler: {str(e).splitlines()[0]}; fix lr_scheduler.* in the config") from None
    return tensor_bytes(built.state_dict()["state"]) / tensor_bytes(weight)


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
        # the recompute in backward must run the attention backend the forward ran (saved tensors differ by backend)
        recompute = functools.partial(checkpoint_wrapper, context_fn=lambda: (contextlib.nullcontext(), training_attention(device)))
        training.set_activation_checkpointing(
            model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}, checkpoint_wrapper_fn=recompute
        )
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


def compile_training(models: Sequence[nn.Module], loss_fn: nn.Module, verbose: bool) -> nn.Module:
    """torchtune's `compile: true`: compile each transformer layer of `models` in place (as
    `training.compile_model` does, so parameter names, FSDP2 shards, LoRA adapters and weight
    pushes are untouched) and return the loss compiled (`training.compile_loss`).

    Unlike torchtune's, the batch and sequence dimensions are dynamic from the first call (the
    layers' input is marked so): online steps change the sequence length every step, and one kernel
    for every length keeps a resumed run bitwise equal to an uninterrupted one (a static first
    kernel would run only the first step of each process). Only those dimensions: `dynamic=True`
    would make every shape symbolic, FSDP2's gathered weights included, and that ran SmolLM2's
    sharded layers 1.4x slower (bench/RESULTS.md, "Offline `dpo` against torchtune on the same
    batches").
    """
    backend = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    handler = torch._dynamo.callback_handler
    if _compile_started not in handler.start_callbacks:
        handler.register_start_callback(_compile_started)
        handler.register_end_callback(_compile_ended)
    if verbose:
        utils.get_logger("INFO").info(f"compile=true: compiling the policy's layers and the loss with torch.compile ({backend})")
    for model in models:
        for m in model.modules():
            if isinstance(m, modules.TransformerSelfAttentionLayer):
                m.compile(backend=backend)
        model.tok_embeddings.register_forward_hook(_dynamic_batch_and_length)
        model.register_forward_pre_hook(_dynamic_mask_and_positions, with_kwargs=True)
    return torch.compile(loss_fn, backend=backend, dynamic=True)


def _dynamic_batch_and_length(_module: nn.Module, _args: Any, hidden: torch.Tensor) -> None:
    """The embeddings feed the first compiled layer: its (batch, length) compile as symbols."""
    torch._dynamo.maybe_mark_dynamic(hidden, 0)
    torch._dynamo.maybe_mark_dynamic(hidden, 1)


def _dynamic_mask_and_positions(_module: nn.Module, _args: Any, kwargs: Dict[str, Any]) -> None:
    """Packed pairs (`logprobs.collate_pairs`) hand every layer their attention mask and positions:
    dynamic in the same dimensions as the hidden states."""
    for name in ("mask", "input_pos"):
        if isinstance(kwargs.get(name), torch.Tensor):
            for dim in range(kwargs[name].dim()):
                torch._dynamo.maybe_mark_dynamic(kwargs[name], dim)


_compile_clock = {"seconds": 0.0, "since": None}  # this process's time inside torch.compile, outermost sections only


def _compile_started(_args: Any) -> None:
    _compile_clock["since"] = time.perf_counter()


def _compile_ended(_args: Any) -> None:
    _compile_clock["seconds"] += time.perf_counter() - _compile_clock["since"]


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo tracing and inductor codegen of
    forward graphs, and of backward graphs at their first backward), to report apart from step
    time. torch's compile callbacks fire once per outermost compile, so nested work counts once."""
    return _compile_clock["seconds"]


def full_cpu_state_dict(model: nn.Module, is_rank_zero: bool, device: torch.device) -> Dict[str, torch.Tensor]:
    """Full weights on rank 0's CPU for a checkpoint (a collective under FSDP2; other ranks get {}),
    so no rank holds a second full copy on its device."""
    if training.is_distributed():
        return training.gather_cpu_state_dict(model, is_rank_zero, device=device)
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded weights on every rank (a collective under FSDP2: all ranks must call it)."""
    return dict(streamed_state_dict(model))


def streamed_state_dict(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """The unsharded weights one at a time, on every rank: under FSDP2 each is an all-gather that
    all ranks run in the same order. A consumer done with each weight before it asks for the next
    (vLLM's reload) never holds a second copy of the model, only one full weight beside the shards."""
    for name, value in model.state_dict().items():
        yield name, value.full_tensor() if isinstance(value, DTensor) else value
