"""Configs for released models compose and validate with every recipe, without their weights.

The builders are checked against each release's published config.json: built on the meta device,
the torchtune model has the same parameter count as transformers' model, and its weights map to
exactly the HF names and shapes (what checkpoints are saved under and vLLM is sent on sync).
"""

import json
from pathlib import Path

import pytest
import torch
from torchtune import config

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.models import hf_to_tune_state_dict, tune_to_hf_state_dict
from rlaif_recipes.recipes.dpo import DPOSettings
from rlaif_recipes.recipes.evaluate import EvaluateSettings
from rlaif_recipes.recipes.generate_pairs import GeneratePairsSettings
from rlaif_recipes.recipes.judge_pairs import JudgePairsSettings
from rlaif_recipes.recipes.online_dpo import OnlineDPOSettings

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# The fields of each release's config.json that decide shapes (copied from the published files).
RELEASES = {
    "llama3_2_1b_instruct": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_hidden_layers=16,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={**_LLAMA31_ROPE, "factor": 32.0}, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama3_1_8b_instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={**_LLAMA31_ROPE, "factor": 8.0}, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "qwen2_5_0_5b_instruct": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_hidden_layers=24,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen2_5_1_5b_instruct": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_hidden_layers=28,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6),
}  # fmt: skip
MODEL_TYPES = {
    "llama3_2_1b_instruct": "LLAMA3_2",
    "llama3_1_8b_instruct": "LLAMA3",
    "qwen2_5_0_5b_instruct": "QWEN2",
    "qwen2_5_1_5b_instruct": "QWEN2",
}
RECIPES = {
    "generate_pairs": GeneratePairsSettings,
    "evaluate": EvaluateSettings,
    "dpo": DPOSettings,
    "online_dpo": OnlineDPOSettings,
}
GPU = ["device=cuda", "dtype=bf16"]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("model", sorted(RELEASES))
def test_real_model_composes_for_every_recipe_on_gpu_settings(model: str, recipe: str) -> None:
    where = f"/models/{model}"  # need not exist: validation reads no weights
    sampler = ["sampler=vllm_gpu"] if recipe != "dpo" else []
    cfg = rlaif_config.load(
        recipe, [f"model={model}", f"checkpoint_dir={where}", *GPU, *sampler], RECIPES[recipe]
    )
    assert cfg.checkpointer.checkpoint_dir == where and cfg.checkpointer.model_type == MODEL_TYPES[model]
    assert cfg.config_choices.model == model
    if sampler:
        assert (cfg.sampler.checkpoint_dir, cfg.sampler.dtype, cfg.sampler.enforce_eager) == (
            where,
            "bfloat16",
            False,
        )
        assert 0.3 <= cfg.sampler.gpu_memory_utilization <= 0.5 and cfg.sampler.max_model_len == 4096


@pytest.mark.parametrize("model", sorted(RELEASES))
def test_real_model_needs_its_checkpoint_dir(model: str) -> None:
    with pytest.raises(rlaif_config.ConfigError, match="missing required value\\(s\\): checkpoint_dir"):
        rlaif_config.load("generate_pairs", [f"model={model}"], GeneratePairsSettings)


@pytest.mark.parametrize("model", sorted(RELEASES))
def test_builder_matches_the_release_and_maps_to_its_hf_names(model: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(RELEASES[model]))
    cfg = rlaif_config.load(
        "generate_pairs", [f"model={model}", f"checkpoint_dir={tmp_path}"], GeneratePairsSettings
    )
    with torch.device("meta"):
        tune = config.instantiate(cfg.model)
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tmp_path)))
    assert sum(p.numel() for p in tune.parameters()) == sum(p.numel() for p in hf.parameters())
    hf_named = tune_to_hf_state_dict(tune.state_dict(), str(tmp_path))
    mapped = {k: tuple(v.shape) for k, v in hf_named.items()}
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if RELEASES[model]["tie_word_embeddings"]:
        expected.pop("lm_head.weight")  # tied: saved once, as the input embedding
    assert mapped == expected
    # Reading a checkpoint back (resume) inverts the mapping exactly.
    restored = {k: tuple(v.shape) for k, v in hf_to_tune_state_dict(hf_named, str(tmp_path)).items()}
    assert restored == {k: tuple(v.shape) for k, v in tune.state_dict().items()}


def test_checkpoint_files_of_the_8b_expand_to_its_four_shards() -> None:
    from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

    cfg = rlaif_config.load(
        "generate_pairs", ["model=llama3_1_8b_instruct", "checkpoint_dir=/m"], GeneratePairsSettings
    )
    files = FormattedCheckpointFiles.from_dict(
        dict(cfg.checkpointer.checkpoint_files)
    ).build_checkpoint_filenames()
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


@pytest.mark.parametrize("judge", rlaif_config.group_options("judge"))
@pytest.mark.parametrize(
    "recipe, schema", [("judge_pairs", JudgePairsSettings), ("evaluate", EvaluateSettings)]
)
def test_every_judge_option_composes(recipe: str, schema: type, judge: str) -> None:
    cfg = rlaif_config.load(recipe, [f"judge={judge}"], schema)
    assert cfg.config_choices.judge == judge and "_component_" in cfg.judge


def test_openai_judge_pointed_at_a_vllm_serve_judge() -> None:
    cfg = rlaif_config.load("judge_pairs", ["judge=openai", "judge.base_url=http://judge-host:8000/v1",
                                            "judge.model=Qwen2.5-7B-Instruct", "judge.max_concurrency=64"], JudgePairsSettings)  # fmt: skip
    assert (cfg.judge.base_url, cfg.judge.model, cfg.judge.api_key_env) == (
        "http://judge-host:8000/v1",
        "Qwen2.5-7B-Instruct",
        "OPENAI_API_KEY",
    )
    assert cfg.judge.rubric.name == "false_refusal"
