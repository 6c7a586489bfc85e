"""`dtype: auto`: bf16 only where the machine computes it natively. A CPU without AVX512-BF16 or AMX
emulates bf16, 5-200x slower than fp32 (bench/RESULTS.md), so the demo's configs ask for `auto`,
and an explicit bf16 there is kept with one warning line."""

import logging
from pathlib import Path

import pytest
import torch

from rlaif_recipes import dtypes
from rlaif_recipes.errors import ConfigError
from rlaif_recipes.policy import device_and_dtype
from rlaif_recipes.samplers import VLLMSampler


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, caplog, native: bool) -> None:
    monkeypatch.setattr(dtypes, "_cpu_bf16_is_native", lambda: native)
    with caplog.at_level(logging.WARNING, logger=dtypes.__name__):
        assert device_and_dtype("cpu", "auto") == (torch.device("cpu"), torch.bfloat16 if native else torch.float32)
        assert dtypes.resolve_vllm_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
        assert device_and_dtype("cpu", "fp32")[1] == torch.float32 and dtypes.resolve_vllm_dtype("float32", "cpu") == "float32"
    assert not caplog.records  # auto never picks an emulated dtype; fp32 is never warned about


def test_explicit_bf16_on_a_cpu_that_emulates_it_is_kept_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(dtypes, "_cpu_bf16_is_native", lambda: False)
    with caplog.at_level(logging.WARNING, logger=dtypes.__name__):
        assert device_and_dtype("cpu", "bf16")[1] == torch.bfloat16
    assert len(caplog.records) == 1
    assert "dtype=bf16 on a CPU without native bf16" in caplog.text and "use dtype=auto" in caplog.text
    monkeypatch.setattr(dtypes, "_cpu_bf16_is_native", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=dtypes.__name__):
        assert device_and_dtype("cpu", "bf16")[1] == torch.bfloat16 and dtypes.resolve_vllm_dtype("bfloat16", "cpu") == "bfloat16"
    assert not caplog.records


def test_an_unknown_dtype_is_one_config_error_naming_auto() -> None:
    with pytest.raises(ConfigError, match=r"dtype=float8 on device=cpu: .*use dtype=fp32, bf16 or auto"):
        device_and_dtype("cpu", "float8")


@pytest.mark.slow
def test_a_vllm_engine_asked_for_auto_runs_in_fp32_where_bf16_is_emulated(monkeypatch, tiny_model_dir: Path) -> None:
    monkeypatch.setattr(dtypes, "_cpu_bf16_is_native", lambda: False)
    sampler = VLLMSampler(str(tiny_model_dir), dtype="auto", gpu_memory_utilization=0.05, max_tokens=4, kv_cache_memory_bytes=16 << 20)
    try:
        assert sampler.llm.llm_engine.model_config.dtype == torch.float32
        assert sampler.sample([[{"role": "user", "content": "Hi?"}]], n=1)[0].completions[0].token_ids
    finally:
        sampler.close()
