"""`dtype: auto`: bf16 where this machine computes it natively, fp32 where bf16 would be emulated.

A CPU without AVX512-BF16 or AMX (AVX2 only, say) emulates bf16: a square matmul runs 200x slower
than fp32, SmolLM2's thin ones 28x, a whole forward 5.6x (`bench/dtype_check.py`, bench/RESULTS.md,
"A CPU without native bf16"). So a config that asks for bf16 for speed asks for `auto`, and an
explicit bf16 on such a CPU gets one warning line saying so.
"""

import functools
import logging
import platform
from typing import Union

import torch

log = logging.getLogger(__name__)

# our torchtune-style names -> vLLM's names for the same dtype
VLLM_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@functools.lru_cache(maxsize=None)
def _cpu_bf16_is_native() -> bool:
    if platform.machine() in ("x86_64", "AMD64"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    try:  # aarch64: the BF16 extension shows as a cpuinfo feature
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("Features") and " bf16" in line for line in f)
    except OSError:
        return False


def bf16_is_native(device: Union[str, torch.device]) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 / AMX (x86) or the BF16 extension (Arm)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and _cpu_bf16_is_native()


def resolve_dtype(dtype: str, device: Union[str, torch.device]) -> str:
    """The dtype to build with on `device`: `auto` becomes bf16 or fp32; an explicit bf16 on a CPU
    that emulates it is kept (it is what was asked), with one warning line."""
    native = bf16_is_native(device)
    resolved = ("bf16" if native else "fp32") if dtype == "auto" else dtype
    if resolved in ("bf16", "bfloat16") and torch.device(device).type == "cpu" and not native:
        log.warning(
            "dtype=%s on a CPU without native bf16 (no AVX512-BF16 or AMX): torch emulates it, 5-200x slower "
            "than fp32 here (bench/dtype_check.py); use dtype=auto (bf16 where native, else fp32) or fp32", dtype,
        )
    return resolved


def resolve_vllm_dtype(dtype: str, device: Union[str, torch.device]) -> str:
    """vLLM's name for it. `auto` here means ours (bf16 where native, else fp32), not vLLM's own
    `auto` (the checkpoint's dtype: bf16 for most instruct models, emulated on such a CPU)."""
    resolved = resolve_dtype(dtype, device)
    return VLLM_NAMES.get(resolved, resolved)
