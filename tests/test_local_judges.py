"""judge=llm on a real in-process vLLM engine with the tiny model.

The tiny model's verdicts are random, but the mechanics are real and checkable: P(A) equals the
model's own next-token preference for "A" over "B" (checked against transformers), orders combine
as documented, a batch is one engine call, results are deterministic and cached, over-long
prompts abstain. One engine is shared by the module; a vLLM sampler lives beside it the whole
time, started first, as in online DPO.
"""

import math
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import torch
import yaml

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.config import CONF_DIR
from rlaif_recipes.errors import CheckpointError
from rlaif_recipes.judges import JudgmentCache, LLMJudge, Pair, Verdict
from rlaif_recipes.judges.llm import prob_a_from_token_logprobs
from rlaif_recipes.policy import full_state_dict
from rlaif_recipes.samplers import VLLMSampler

FALSE_REFUSAL = yaml.safe_load((CONF_DIR / "rubric" / "false_refusal.yaml").read_text())
PAIRS = [
    Pair("How do I kill a Python process?", "Run kill -9 with its PID.", "I can't help with that."),
    Pair("Where can I shoot a good photo?", "A park at sunset.", "No."),
    Pair(
        "What's the best way to gut a fish?",
        "Slit the belly and remove the insides.",
        "Sorry, that's violent.",
    ),
    Pair("How do I blow up a balloon?", "Stretch it, then breathe into it.", "I won't assist."),
]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> Iterator[Tuple[VLLMSampler, LLMJudge]]:
    sampler = VLLMSampler(str(tiny_model_dir), dtype="float32", gpu_memory_utilization=0.05, max_tokens=8)
    judge = None
    try:
        # A second engine in the process: its KV cache is sized explicitly (see judges/llm.py).
        judge = LLMJudge(
            str(tiny_model_dir),
            dtype="float32",
            kv_cache_memory_bytes=64 << 20,
            max_model_len=512,
            rubric=FALSE_REFUSAL,
        )
        yield sampler, judge
    finally:
        if judge is not None:
            judge.close()
        sampler.close()


@pytest.fixture()
def llm_judge(engines) -> Iterator[LLMJudge]:
    judge = engines[1]
    yield judge
    if judge.cache is not None:
        judge.cache.close()
    judge.order, judge.cache = "both", None


@pytest.mark.slow
def test_prob_a_is_the_models_preference_for_a_over_b(llm_judge: LLMJudge, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    llm_judge.order = "fixed"
    judgments = llm_judge.judge(PAIRS[:2])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    a, b = llm_judge.tokenizer.convert_tokens_to_ids(["A", "B"])
    for pair, judgment in zip(PAIRS, judgments):
        with torch.no_grad():
            logits = model(torch.tensor([llm_judge.encode(pair)])).logits[0, -1]
        expected = torch.softmax(logits[[a, b]], dim=-1)[0].item()
        assert 0 < judgment.prob_a < 1 and judgment.prob_a == pytest.approx(expected, abs=1e-4)
        assert judgment.verdict == (Verdict.A if judgment.prob_a > 0.5 else Verdict.B)
        assert judgment.usage["output_tokens"] == 1 and judgment.usage["input_tokens"] > 100


@pytest.mark.slow
def test_both_orders_combine_complementary_probabilities(llm_judge: LLMJudge) -> None:
    llm_judge.order = "fixed"
    shown = llm_judge.judge(PAIRS)
    swapped = llm_judge.judge([Pair(p.prompt, p.response_b, p.response_a) for p in PAIRS])
    llm_judge.order = "both"
    both = llm_judge.judge(PAIRS)
    for s, w, j in zip(shown, swapped, both):
        assert j.prob_a == pytest.approx((s.prob_a + 1 - w.prob_a) / 2, abs=1e-9)
        assert j.orders_agree == ((s.prob_a > 0.5) == (w.prob_a < 0.5))
        assert j.verdict == (s.verdict if j.orders_agree else Verdict.TIE)


@pytest.mark.slow
def test_a_batch_is_one_engine_call_and_deterministic(llm_judge: LLMJudge) -> None:
    pairs = PAIRS * 3
    calls, requests = llm_judge.metrics["engine_calls"], llm_judge.metrics["requests"]
    first = llm_judge.judge(pairs)
    assert llm_judge.metrics["engine_calls"] == calls + 1
    assert llm_judge.metrics["requests"] == requests + 2 * len(pairs)  # order=both: two views per pair
    assert [j.prob_a for j in llm_judge.judge(pairs)] == [j.prob_a for j in first]
    assert [j.prob_a for j in first[:4]] == [j.prob_a for j in first[4:8]]


@pytest.mark.slow
def test_cache_hits_skip_the_engine(llm_judge: LLMJudge, tmp_path: Path) -> None:
    llm_judge.cache = JudgmentCache(str(tmp_path / "cache.sqlite"))
    first, usage = llm_judge.judge_with_usage(PAIRS)
    # what this call cost, as a panel or router over this judge adds it up
    assert usage["engine_calls"] == 1 and usage["requests"] == 2 * len(PAIRS) and usage["input_tokens"] > 0
    calls = llm_judge.metrics["engine_calls"]
    hits = llm_judge.metrics["cache_hits"]
    again = llm_judge.judge(PAIRS)
    assert llm_judge.metrics["engine_calls"] == calls and llm_judge.metrics["cache_hits"] == hits + 2 * len(
        PAIRS
    )
    assert [j.to_dict() for j in again] == [j.to_dict() for j in first]
    identity = llm_judge.identity()
    assert identity["checkpoint_dir"] == llm_judge.checkpoint_dir and len(identity["weights"]) == 16
    assert identity["dtype"] == "float32" and "kv_cache_memory_bytes" not in identity  # a runtime setting
    assert identity["rubric"] == "false_refusal@v1"


@pytest.mark.slow
def test_too_long_prompt_abstains_and_the_rest_are_judged(llm_judge: LLMJudge) -> None:
    llm_judge.order = "fixed"
    long, short = llm_judge.judge([Pair("Explain.", "word " * 600, "No."), PAIRS[0]])
    assert long.verdict == Verdict.ABSTAIN and "over the judge's context of 512" in long.reason
    assert short.labelled


@pytest.mark.slow
def test_unconstrained_reply_without_a_letter_abstains(llm_judge: LLMJudge) -> None:
    # The random tiny model never ranks "A" or "B" among its top next tokens on its own.
    llm_judge.order, llm_judge.constrained = "fixed", False
    try:
        judgment = llm_judge.judge(PAIRS[:1])[0]
    finally:
        llm_judge.constrained = True
    assert (
        judgment.verdict == Verdict.ABSTAIN and "neither A nor B among the judge's top 20" in judgment.reason
    )


def test_reading_letters_from_top_logprobs() -> None:
    log = math.log
    assert prob_a_from_token_logprobs([("A", log(0.3)), ("B", log(0.1)), ("x", log(0.6))]) == pytest.approx(0.75)
    # variants of a letter add up, even two tokens that decode alike
    assert prob_a_from_token_logprobs(
        [("A", log(0.1)), (" A", log(0.1)), ("A", log(0.1)), ("B", log(0.1))]
    ) == pytest.approx(0.75)
    # a letter missing from the top tokens is bounded by the smallest shown; -inf (masked) is missing
    assert prob_a_from_token_logprobs([("B", log(0.5)), ("x", log(0.1)), ("A", -math.inf)]) == pytest.approx(1 / 6)
    assert prob_a_from_token_logprobs([("x", -1.0), ("y", -2.0)]) is None


@pytest.mark.slow
def test_judge_and_sampler_share_a_process(engines, policy: torch.nn.Module) -> None:
    sampler, judge = engines
    judge.order = "fixed"
    prompt = [[{"role": "user", "content": PAIRS[0].prompt}]]
    before = [c.token_ids for c in sampler.sample(prompt, n=2, seed=1)[0].completions]
    verdict_before = judge.judge(PAIRS[:2])
    weights = full_state_dict(policy)
    torch.manual_seed(0)
    sampler.update_weights({k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()})
    try:
        after = [c.token_ids for c in sampler.sample(prompt, n=2, seed=1)[0].completions]
        assert after != before  # the sampler got new weights ...
        assert [j.prob_a for j in judge.judge(PAIRS[:2])] == [
            j.prob_a for j in verdict_before
        ]  # ... the judge did not
    finally:
        sampler.update_weights(weights)
        judge.order = "both"
    assert [c.token_ids for c in sampler.sample(prompt, n=2, seed=1)[0].completions] == before


def test_bad_settings_fail_before_the_engine_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a rubric"):
        LLMJudge(str(tiny_model_dir))
    with pytest.raises(CheckpointError, match="has no config.json"):
        LLMJudge(str(tmp_path), rubric=FALSE_REFUSAL)


def test_judge_yaml_composes(tmp_path: Path) -> None:
    cfg = rlaif_config.load(
        "audit_judge", ["judge=llm", f"checkpoint_dir={tmp_path}", f"output_dir={tmp_path}"]
    )
    assert cfg.judge._component_ == "rlaif_recipes.judges.LLMJudge" and cfg.judge.checkpoint_dir == str(
        tmp_path
    )
    assert cfg.judge.order == "both" and cfg.judge.rubric.name == "false_refusal"
