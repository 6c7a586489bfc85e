"""Samplers: produce n responses per prompt from the current policy (vLLM or torchtune)."""

from rlaif_recipes.samplers.base import Completion, PromptSamples, Sampler
from rlaif_recipes.samplers.torchtune_sampler import TorchtuneSampler
from rlaif_recipes.samplers.vllm_sampler import VLLMSampler

__all__ = ["Completion", "PromptSamples", "Sampler", "TorchtuneSampler", "VLLMSampler"]
