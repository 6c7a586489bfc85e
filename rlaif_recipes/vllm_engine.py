"""Starting and closing an in-process vLLM engine: shared by the vLLM sampler and the LLM judge.

In-process (no engine-core subprocess): weight pushes are plain function calls, nothing is pickled
across processes. A start that fails is one ConfigError naming the settings under the caller's
config key (`sampler.*` or `judge.*`), with vLLM's own error chained for the details.

Under torchrun every engine (the sampler's and the judge's alike) is one per rank on vLLM's
`external_launcher` backend, seeded by rank, on the rank's own GPU; vLLM sets the current CUDA
device while it starts, so the rank's device is put back afterwards (FSDP2 places shards there).
Tensor parallelism across torchrun ranks is refused: the ranks sample different prompts.

On CPU the KV cache comes in blocks of 32 tokens unless the caller sets another size. vLLM's CPU
default, 128, is longer than most chat prompts, and prefix caching shares only full blocks: the n
replies of one prompt then each prefill it again. With 32 they share all but its last partial
block, and sample the same tokens (bench/RESULTS.md, "The prompt's KV once for n replies").
"""

import os
from typing import Any, Mapping, Optional

import torch
from torchtune import utils

from rlaif_recipes.dtypes import resolve_vllm_dtype
from rlaif_recipes.errors import ConfigError

CPU_BLOCK_SIZE = 32  # the smallest KV block vLLM's CPU attention takes (it needs a multiple of 32)


def start_engine(
    key: str,
    *,
    model: str,
    dtype: str,
    gpu_memory_utilization: float,
    kv_cache_memory_bytes: Optional[int],
    max_model_len: Optional[int],
    seed: int,
    tensor_parallel_size: int = 1,
    block_size: Optional[int] = None,
    **engine_args: Any,
) -> Any:
    """`vllm.LLM` for `model`; `key` is the config key its settings sit under ("sampler", "judge").
    `dtype` is vLLM's name, or `auto`: bf16 where the device computes it natively, else float32.
    `block_size`: KV-cache block in tokens; None = CPU_BLOCK_SIZE on CPU, vLLM's own on GPU."""
    check_engine_settings(key, {"tensor_parallel_size": tensor_parallel_size, "sleep_between_steps": engine_args.get("enable_sleep_mode")})
    world_size, rank = utils.get_world_size_and_rank()
    if world_size > 1:
        engine_args["distributed_executor_backend"] = "external_launcher"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    if block_size is not None or device is None:
        engine_args["block_size"] = block_size or CPU_BLOCK_SIZE
    try:
        return LLM(
            model=model,
            dtype=resolve_vllm_dtype(dtype, "cpu" if device is None else "cuda"),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed + rank,
            tensor_parallel_size=tensor_parallel_size,
            **kv_cache_args(gpu_memory_utilization, kv_cache_memory_bytes),
            **engine_args,
        )
    except Exception as e:  # name the cause in one line, keep the chain for the details
        raise ConfigError(
            f"vLLM engine failed to start for {model} ({type(e).__name__}: {first_line(e)}); check "
            f"{key}.gpu_memory_utilization={gpu_memory_utilization}, {key}.dtype={dtype} and "
            f"{key}.max_model_len={max_model_len}{'' if block_size is None else f', {key}.block_size={block_size}'}, and set {key}.kv_cache_memory_bytes when another "
            "engine or model already lives in this process"
        ) from e
    finally:
        if device is not None:
            torch.cuda.set_device(device)


def check_engine_settings(key: str, settings: Mapping[str, Any]) -> None:
    """Engine settings that cannot work here, refused from the config alone: recipes call it before
    any model loads (start_engine again). Under torchrun each rank samples its own prompts with its
    own engine, so a tensor-parallel group spanning ranks would feed one engine different requests;
    sleep mode frees GPU memory and exists only on CUDA."""
    world_size, _ = utils.get_world_size_and_rank()
    tensor_parallel_size = int(settings.get("tensor_parallel_size") or 1)
    if tensor_parallel_size > 1 and world_size > 1:
        raise ConfigError(
            f"{key}.tensor_parallel_size={tensor_parallel_size} under torchrun ({world_size} ranks): each rank runs its "
            f"own engine on its own GPU; use {key}.tensor_parallel_size=1, or run without torchrun to shard one engine"
        )
    if settings.get("sleep_between_steps") and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}.sleep_between_steps=true needs CUDA (vLLM's sleep mode frees GPU memory); set {key}.sleep_between_steps=false"
        )


def close_engine(owner: Any) -> None:
    """Shut down `owner.llm`, if it was started, and drop it: closing twice is harmless."""
    engine = owner.__dict__.pop("llm", None)
    if engine is not None:
        engine.llm_engine.engine_core.shutdown()


def kv_cache_args(gpu_memory_utilization: float, kv_cache_memory_bytes: Optional[int]) -> dict:
    """A fixed KV-cache size where vLLM's own sizing fails: on CPU it reserves the memory share
    minus what this process already holds, which turns negative once the process has loaded other
    models (a judge, a reward model, a trainer). There the share is taken of RAM itself."""
    if kv_cache_memory_bytes is None and not torch.cuda.is_available():
        kv_cache_memory_bytes = int(gpu_memory_utilization * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return {} if kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": kv_cache_memory_bytes}


def first_line(e: BaseException) -> str:
    """vLLM's reason on one line (its config errors put it after a 'N validation errors' header)."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            return "; ".join(str(err.get("msg", err)) for err in errors())[:300]
        except Exception:
            pass
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300] or repr(e)
