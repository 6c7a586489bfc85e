"""Fluency of replies: their mean per-token log-likelihood under a fixed scoring model.

A policy can lower its refusal rate without learning to answer: word salad holds no refusal
phrase, and a judge may not punish it. `evaluate` therefore scores every reply under a model no
stage trains (SmolLM2-135M-Instruct by default), independent of the policy and of any judge:

    scorer = FluencyScorer()                      # SmolLM2, bf16 where native (else fp32)
    scores = scorer.score(["How do I kill a Python process?"], ["Run `kill PID`."])
    scorer.summarize(scores)          # FluencySummary(mean=..., disfluent=..., rate=..., passed=...)

Each prompt is rendered with the scoring model's own chat template and generation prompt, as the
samplers render prompts; the reply's tokens follow. Only the reply's text is scored, with no
end-of-turn token, so a reply cut at the sampler's max_tokens is not penalised for stopping
mid-sentence. A reply with no tokens has no score (None) and counts as disfluent.
"""

import tempfile
from dataclasses import dataclass
from statistics import fmean
from typing import Dict, List, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from torchtune import training

from rlaif_recipes.errors import ConfigError
from rlaif_recipes.logprobs import collate_responses, sequence_logprobs
from rlaif_recipes.models.get_model import get_model
from rlaif_recipes.models.hf_model import hf_checkpointer
from rlaif_recipes.models.tokenizer import HFChatTokenizer
from rlaif_recipes.policy import build_policy, device_and_dtype

DEFAULT_MODEL = "smollm2-135m-instruct"  # rlaif_recipes.models.get_model builds it without a hub
Prompt = Union[str, List[Dict[str, str]]]  # a user message, or chat messages as the policy saw them


@dataclass(frozen=True)
class FluencySummary:
    mean: Optional[float]  # mean score over the replies that have one
    disfluent: int  # replies under min_mean_logprob, or with no tokens
    n: int
    rate: float  # disfluent / n
    passed: bool  # rate <= max_disfluent_rate


class FluencyScorer:
    """Scores replies under the causal LM in `model_dir` (an HF directory; None = SmolLM2-135M-Instruct).

    The default thresholds are calibrated on SmolLM2 in bf16 (tests/test_fluency.py on
    tests/data/word_salad.jsonl and fluent_replies.jsonl; numbers in bench/RESULTS.md); another
    scoring model needs its own.
    """

    def __init__(
        self,
        model_dir: Optional[str] = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: int = 16,
        min_mean_logprob: float = -4.0,
        max_disfluent_rate: float = 0.1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"fluency.batch_size={batch_size}: score at least one reply per forward pass")
        if not 0 <= max_disfluent_rate <= 1:
            raise ConfigError(f"fluency.max_disfluent_rate={max_disfluent_rate}: a share of the replies, in [0, 1] (e.g. 0.1)")
        if model_dir is None:
            model_dir = str(get_model(DEFAULT_MODEL))
        self.model_dir = str(model_dir)
        self.min_mean_logprob = min_mean_logprob
        self.max_disfluent_rate = max_disfluent_rate
        self._batch_size = batch_size
        self._device, torch_dtype = device_and_dtype(device, dtype)  # `auto`: bf16 where native, else fp32
        self._tokenizer = HFChatTokenizer(self.model_dir)
        with tempfile.TemporaryDirectory(prefix="rlaif-fluency-") as unused:  # the checkpointer wants an output dir
            state = hf_checkpointer(self.model_dir, output_dir=unused).load_checkpoint()[training.MODEL_KEY]
        model_cfg = OmegaConf.create({"_component_": "rlaif_recipes.models.decoder_from_hf_dir", "checkpoint_dir": self.model_dir})
        self._model = build_policy(model_cfg, state, device=self._device, dtype=torch_dtype)
        self._model.eval().requires_grad_(False)

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> List[Optional[float]]:
        """Mean log-prob per reply token given its prompt; None for a reply with no tokens."""
        if len(prompts) != len(replies):
            raise ValueError(f"got {len(prompts)} prompts and {len(replies)} replies; pass one prompt per reply")
        rows = [(self._render(p), self._tokenizer.encode(r, add_bos=False, add_eos=False)) for p, r in zip(prompts, replies)]
        scores: List[Optional[float]] = [None] * len(rows)
        todo = sorted((i for i, (_, reply) in enumerate(rows) if reply), key=lambda i: -sum(map(len, rows[i])))
        for start in range(0, len(todo), self._batch_size):  # longest first: similar lengths share a batch
            batch = todo[start : start + self._batch_size]
            input_ids, targets = collate_responses([rows[i] for i in batch], pad_id=self._tokenizer.pad_id)
            with torch.no_grad():
                sums, counts = sequence_logprobs(self._model, input_ids.to(self._device), targets.to(self._device))
            for i, s, c in zip(batch, sums.tolist(), counts.tolist()):
                scores[i] = s / c
        return scores

    def is_disfluent(self, score: Optional[float]) -> bool:
        """Below the threshold, or nothing said: an empty reply answers no more than word salad does."""
        return score is None or score < self.min_mean_logprob

    def summarize(self, scores: Sequence[Optional[float]]) -> FluencySummary:
        """The set fails when more than max_disfluent_rate of its replies are disfluent."""
        if not scores:
            raise ValueError("no scores to summarize; score at least one reply")
        scored = [s for s in scores if s is not None]
        disfluent = sum(self.is_disfluent(s) for s in scores)
        rate = disfluent / len(scores)
        return FluencySummary(
            mean=fmean(scored) if scored else None,
            disfluent=disfluent,
            n=len(scores),
            rate=rate,
            passed=rate <= self.max_disfluent_rate,
        )

    def _render(self, prompt: Prompt) -> List[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self._tokenizer.render(messages, add_generation_prompt=True)
