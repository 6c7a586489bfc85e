"""Fluency scores: mean reply-token log-probs under a fixed model, and SmolLM2's calibration on word salad."""

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torchtune import config
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.fluency import FluencyScorer
from rlaif_recipes.recipes.evaluate import EvaluateSettings

DATA = Path(__file__).parent / "data"
PROMPTS = [
    "How do I kill a Python process?",
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    "Where can I buy a can of coke?",
    "What is the capital of France?",
]
REPLIES = ["Use kill with its process id.", "Light scatters.", "", "The capital of France is Paris, a city on the Seine."]


def read(name: str) -> List[Dict[str, str]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_scores_are_reply_token_means_under_the_chat_template_whatever_the_batching(tiny_model_dir: Path) -> None:
    one, three = (FluencyScorer(str(tiny_model_dir), dtype="fp32", batch_size=b) for b in (1, 3))
    scores = one.score(PROMPTS, REPLIES)
    assert scores[2] is None and one.is_disfluent(None)  # an empty reply has nothing to score
    assert three.score(PROMPTS, REPLIES) == pytest.approx(scores, abs=1e-5)  # padding changes nothing
    # the same numbers from transformers, on the prompt as the samplers render it
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    for prompt, reply, score in zip(PROMPTS, REPLIES, scores):
        if not reply:
            continue
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt_ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
        reply_ids = tok.encode(reply, add_special_tokens=False)
        with torch.no_grad():
            logps = hf(torch.tensor([prompt_ids + reply_ids])).logits[0].log_softmax(-1)
        picked = logps[len(prompt_ids) - 1 : -1].gather(-1, torch.tensor(reply_ids).unsqueeze(-1))
        assert score == pytest.approx(picked.mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="4 prompts and 3 replies"):
        one.score(PROMPTS, REPLIES[:3])


def test_summary_counts_low_and_empty_replies_as_disfluent(tiny_model_dir: Path) -> None:
    scorer = FluencyScorer(str(tiny_model_dir), dtype="fp32", min_mean_logprob=-4.0, max_disfluent_rate=0.5)
    summary = scorer.summarize([-1.0, -5.0, None, -2.0])
    assert (summary.disfluent, summary.n, summary.rate, summary.passed) == (2, 4, 0.5, True)  # at most 0.5 passes
    assert summary.mean == pytest.approx(-8.0 / 3)  # over the replies that have a score
    assert not scorer.summarize([-1.0, -5.0, -4.5]).passed


@pytest.mark.real_model
def test_smollm2_flags_every_word_salad_reply_and_passes_every_fluent_one(smollm2_dir: Path) -> None:
    """The calibration of evaluate's defaults (conf/evaluate.yaml: SmolLM2, bf16) on the old toy
    model's kind of output and on fluent replies of several styles, some cut at max_tokens."""
    cfg = rlaif_config.load("evaluate", [f"checkpoint_dir={smollm2_dir}"], EvaluateSettings)
    scorer = config.instantiate(cfg.fluency)
    assert scorer.model_dir == str(smollm2_dir)  # model_dir: null is the packaged SmolLM2
    salad, fluent = read("word_salad.jsonl"), read("fluent_replies.jsonl")
    scores = scorer.score([r["prompt"] for r in salad + fluent], [r["reply"] for r in salad + fluent])
    salad_scores, fluent_scores = scores[: len(salad)], scores[len(salad) :]
    assert [r["reply"] for r, s in zip(salad, salad_scores) if not scorer.is_disfluent(s)] == []
    assert [r["reply"] for r, s in zip(fluent, fluent_scores) if scorer.is_disfluent(s)] == []
    threshold = scorer.min_mean_logprob  # with a clear margin on both sides
    assert max(salad_scores) < threshold - 0.5 < threshold + 0.5 < min(fluent_scores), (salad_scores, fluent_scores)
    assert scorer.summarize(fluent_scores).passed
    mostly_salad = salad_scores[:8] + fluent_scores[:6]
    assert not scorer.summarize(mostly_salad).passed and not scorer.summarize(salad_scores).passed
