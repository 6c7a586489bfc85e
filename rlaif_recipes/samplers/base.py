"""The Sampler interface: n completions per prompt, plus a way to push new policy weights.

Both backends take chat messages (rendered with the checkpoint's own chat template) or token ids,
so the same prompt reaches vLLM and torchtune as the same token ids.
"""

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.models.hf_model import hf_config

Messages = List[Dict[str, str]]
Prompt = Union[Messages, List[int]]
Weights = Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]  # torchtune names, full tensors


@dataclass
class Completion:
    token_ids: List[int]
    text: str
    logprobs: List[float]  # log-prob of each sampled token under the untempered model
    finish_reason: str  # "stop" (an end token) or "length" (max_tokens reached)


@dataclass
class PromptSamples:
    prompt_token_ids: List[int]
    completions: List[Completion] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop_token_ids: tuple


class Sampler(abc.ABC):
    """Common set-up and input checks; backends implement `_generate` and `update_weights`."""

    uses_live_policy = False  # True: sampling runs on the training model itself (no weight copy)
    # constructor arguments that never change the samples' distribution (rlaif_recipes.run_dir)
    RUNTIME_SETTINGS: Tuple[str, ...] = ()

    def __init__(
        self,
        checkpoint_dir: str,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        stop_tokens: Sequence[str] = (),
        seed: int = 0,
        max_model_len: Optional[int] = None,
    ) -> None:
        self.checkpoint_dir = str(checkpoint_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir)
        self.max_model_len = max_model_len or context_length(self.checkpoint_dir, self.tokenizer)
        self.eos_token_ids = _eos_ids(self.checkpoint_dir, self.tokenizer)
        self.defaults = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        self.stop_token_ids = tuple(self.eos_token_ids) + tuple(self._stop_ids(stop_tokens))

    def bind_policy(self, policy: nn.Module) -> None:
        """Give the sampler the live training model; only backends that sample with it keep it."""

    @abc.abstractmethod
    def update_weights(self, weights: Weights) -> None:
        """Load full (unsharded) torchtune-named weights, a dict or a stream of (name, tensor)
        pairs, into the sampling copy of the policy."""

    def sleep(self) -> None:
        """Give back the memory the sampler holds until it is next used (vLLM's sleep mode on CUDA,
        when `sleep_between_steps` is set); a no-op otherwise."""

    def close(self) -> None:
        """Free the engine; the sampler cannot be used afterwards."""

    def sample(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        *,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_tokens: Optional[int] = None,
        seed: Optional[int] = None,
        on_prompt_done: Optional[Callable[[int, PromptSamples], None]] = None,
    ) -> List[PromptSamples]:
        """n completions for each prompt. Same seed, prompts and weights give the same samples.
        `on_prompt_done(i, samples)` is called once per prompt as soon as its completions exist
        (the vLLM backend: while longer ones still generate), on the calling thread."""
        if len(prompts) == 0:
            raise ValueError("sample() got an empty prompt list; pass at least one prompt")
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one completion per prompt (n >= 1)")
        overrides = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        s = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if s["temperature"] < 0 or not 0 < s["top_p"] <= 1 or s["max_tokens"] < 1:
            raise ConfigError(
                f"bad sampling settings {s}: need temperature >= 0, 0 < top_p <= 1, max_tokens >= 1"
            )
        settings = SamplingSettings(stop_token_ids=self.stop_token_ids, **s)
        ids = [self.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if len(p) + settings.max_tokens > self.max_model_len:
                raise DataError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={settings.max_tokens} it exceeds the "
                    f"context of {self.max_model_len}: shorten the prompt or lower max_tokens"
                )
        def done(i: int, completions: List[Completion]) -> None:
            if on_prompt_done is not None:
                on_prompt_done(i, PromptSamples(ids[i], completions))

        return [PromptSamples(p, c) for p, c in zip(ids, self._generate(ids, n, settings, done))]

    def encode(self, prompt: Prompt) -> List[int]:
        """Chat messages -> token ids with the checkpoint's chat template (ids pass through)."""
        if len(prompt) == 0:
            raise ValueError("got an empty prompt; a prompt is a non-empty list of messages or token ids")
        if isinstance(prompt[0], int):
            return list(prompt)
        return list(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)["input_ids"])

    def decode(self, token_ids: List[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @abc.abstractmethod
    def _generate(
        self, prompt_ids: List[List[int]], n: int, settings: SamplingSettings, done: Callable[[int, List[Completion]], None]
    ) -> List[List[Completion]]:
        """Backend work: n completions for each (already checked) prompt; `done(i, completions)` as
        each prompt's are complete."""

    def _stop_ids(self, stop_tokens: Sequence[str]) -> List[int]:
        vocab = self.tokenizer.get_vocab()
        unknown = [t for t in stop_tokens if t not in vocab]
        if unknown:
            specials = ", ".join(self.tokenizer.all_special_tokens) or "none"
            raise ConfigError(
                f"stop token(s) {unknown} are not in the tokenizer of {self.checkpoint_dir}; "
                f"use single tokens from its vocabulary (special tokens: {specials})"
            )
        return [vocab[t] for t in stop_tokens]


def check_pair_sampling(sampler: Mapping, n: int) -> None:
    """Settings under which n responses per prompt can differ; greedy decoding gives n identical
    ones, so every pair would be a tie and nothing would train (checked before an engine starts)."""
    if n < 2:
        raise ConfigError(f"n={n}: a preference pair needs at least 2 responses per prompt (n >= 2)")
    if sampler.get("temperature") == 0:
        raise ConfigError(
            f"sampler.temperature=0 is greedy decoding: all n={n} responses to a prompt would be identical and every "
            "pair a tie; set sampler.temperature > 0 (e.g. 0.7)"
        )
    if str(sampler.get("_component_", "")).endswith("VLLMSampler"):
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        try:  # vLLM's own limit on n (VLLM_MAX_N_SEQUENCES), which it checks only at the first request
            SamplingParams(n=n)
        except VLLMValidationError as err:
            raise ConfigError(f"n={n}: {str(err).strip().rstrip('.')}, or lower n") from None


def derive_seed(*parts: object) -> int:
    """A well-mixed 31-bit seed from several parts, so nearby seeds give unrelated random streams.

    (vLLM seeds the n samples of a request with consecutive values; plain `seed + i` per prompt
    would make sample j of prompt i repeat sample j-1 of prompt i+1.)
    """
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def context_length(checkpoint_dir: str, tokenizer) -> int:
    """The model's context: the tokenizer's `model_max_length` unless it is transformers' "unset"
    sentinel (1e30, which vLLM refuses), never more than config.json's `max_position_embeddings`."""
    positions = hf_config(checkpoint_dir).get("max_position_embeddings")
    declared = tokenizer.model_max_length if tokenizer.model_max_length < VERY_LARGE_INTEGER else None
    if positions is None and declared is None:
        raise ConfigError(
            f"{checkpoint_dir} declares no context length (no max_position_embeddings in config.json, "
            "no model_max_length in tokenizer_config.json); set sampler.max_model_len"
        )
    return min(x for x in (positions, declared) if x is not None)


def _eos_ids(checkpoint_dir: str, tokenizer) -> List[int]:
    try:
        eos = GenerationConfig.from_pretrained(checkpoint_dir).eos_token_id
    except OSError:
        eos = None
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos or [])
