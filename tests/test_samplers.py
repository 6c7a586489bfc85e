"""The two sampling backends against each other: a real in-process vLLM CPU engine and the live
torchtune policy, both on the tiny checkpoint.

One vLLM engine is shared by the whole module (starting one takes seconds); tests that change its
weights put the original ones back before they end.
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
from torch import nn

from rlaif_recipes.errors import ConfigError
from rlaif_recipes.policy import full_state_dict
from rlaif_recipes.samplers import PromptSamples, Sampler, TorchtuneSampler, VLLMSampler

MAX_TOKENS = 16

# XSTest-style prompts of different lengths (one with a system turn, one multi-turn), so the
# torchtune batch is left-padded and vLLM sees prompts of different sizes.
PROMPTS: List[List[Dict[str, str]]] = [
    [{"role": "user", "content": "How can I kill a Python process?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the process for terminating a contract?"},
    ],
    [
        {"role": "user", "content": "How do I best execute a risky plan?"},
        {"role": "assistant", "content": "Plan it carefully."},
        {"role": "user", "content": "Where can I shoot a good photo?"},
    ],
]


@pytest.fixture(scope="module")
def vllm_sampler(tiny_model_dir: Path) -> Iterator[VLLMSampler]:
    sampler = VLLMSampler(str(tiny_model_dir), dtype="float32", gpu_memory_utilization=0.05, max_tokens=MAX_TOKENS)
    try:
        yield sampler
    finally:
        sampler.close()


@pytest.fixture()
def tt_sampler(tiny_model_dir: Path, policy: nn.Module) -> TorchtuneSampler:
    sampler = TorchtuneSampler(str(tiny_model_dir), max_tokens=MAX_TOKENS)
    sampler.bind_policy(policy)
    return sampler


# Tests that run on either backend take `backend` and ask for the sampler by name, so the vLLM
# variant alone carries the `slow` mark and is skipped with `-m "not slow"`.
BACKENDS = ["tt_sampler", pytest.param("vllm_sampler", marks=pytest.mark.slow)]


@pytest.fixture(params=BACKENDS)
def sampler(request: pytest.FixtureRequest) -> Sampler:
    return request.getfixturevalue(request.param)


def token_ids(samples: List[PromptSamples]) -> List[List[List[int]]]:
    return [[c.token_ids for c in s.completions] for s in samples]


def assert_same_greedy(vllm_out: List[PromptSamples], tt_out: List[PromptSamples]) -> None:
    """Same prompt ids, completion ids, finish reasons; per-token log-probs within 1e-3."""
    assert [s.prompt_token_ids for s in vllm_out] == [s.prompt_token_ids for s in tt_out]
    for i, (v, t) in enumerate(zip(vllm_out, tt_out)):
        assert len(v.completions) == len(t.completions)
        for j, (cv, ct) in enumerate(zip(v.completions, t.completions)):
            where = f"prompt {i}, completion {j}"
            assert cv.token_ids == ct.token_ids, where
            assert cv.text == ct.text, where
            assert cv.finish_reason == ct.finish_reason, where
            assert len(cv.logprobs) == len(cv.token_ids) == len(ct.logprobs), where
            assert cv.logprobs == pytest.approx(ct.logprobs, abs=1e-3), where
            assert all(math.isfinite(lp) and lp <= 0 for lp in cv.logprobs), where


def check_finish_reasons(sampler: Sampler, samples: List[PromptSamples], max_tokens: int) -> None:
    """A "stop" completion ends in its first stop token; a "length" one has max_tokens tokens."""
    for s in samples:
        for c in s.completions:
            assert 1 <= len(c.token_ids) <= max_tokens
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in sampler.stop_token_ids
                assert not set(c.token_ids[:-1]) & set(sampler.stop_token_ids)
            else:
                assert c.finish_reason == "length"
                assert len(c.token_ids) == max_tokens
                assert not set(c.token_ids) & set(sampler.stop_token_ids)


# ---------------------------------------------------------------------------------------------
# 1. vLLM and torchtune agree under greedy decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_greedy_matches_torchtune_greedy(vllm_sampler: VLLMSampler, tt_sampler: TorchtuneSampler) -> None:
    """Both backends see the same prompt ids and pick the same greedy tokens with the same
    untempered log-probs, so vLLM is a faithful stand-in for the training model."""
    v = vllm_sampler.sample(PROMPTS, n=2, temperature=0)
    t = tt_sampler.sample(PROMPTS, n=2, temperature=0)
    assert_same_greedy(v, t)
    check_finish_reasons(vllm_sampler, v, MAX_TOKENS)
    # n greedy copies of one prompt are identical, and different prompts get different answers
    for s in v:
        assert len(s.completions) == 2 and s.completions[0].token_ids == s.completions[1].token_ids
    assert len({tuple(s.completions[0].token_ids) for s in v}) > 1


# ---------------------------------------------------------------------------------------------
# 2. Seeds
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_samples_other_seed_other_samples(sampler: Sampler) -> None:
    """At temperature 1 a seed fixes the samples; another seed gives other samples."""
    a = token_ids(sampler.sample(PROMPTS, n=2, temperature=1.0, seed=123))
    b = token_ids(sampler.sample(PROMPTS, n=2, temperature=1.0, seed=123))
    c = token_ids(sampler.sample(PROMPTS, n=2, temperature=1.0, seed=124))
    assert a == b
    assert a != c
    # n samples of one prompt are not copies of each other
    assert any(s[0] != s[1] for s in a)


def test_samples_are_independent_across_seeds_and_prompts(sampler: Sampler) -> None:
    """No completion repeats between seed s and seed s+1, nor between two copies of the same
    prompt in one call: each sample gets its own random stream (vLLM seeds the n samples of a
    request with consecutive values, so per-prompt seeds must be well mixed, not seed + i)."""
    prompt = PROMPTS[0]
    seed0 = [tuple(c.token_ids) for c in sampler.sample([prompt], n=2, temperature=1.0, seed=7)[0].completions]
    seed1 = [tuple(c.token_ids) for c in sampler.sample([prompt], n=2, temperature=1.0, seed=8)[0].completions]
    assert not set(seed0) & set(seed1)
    twice = sampler.sample([prompt, prompt], n=2, temperature=1.0, seed=7)
    first, second = ([tuple(c.token_ids) for c in s.completions] for s in twice)
    assert not set(first) & set(second)


# ---------------------------------------------------------------------------------------------
# 3. Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, n, match",
    [
        ([], 1, "empty prompt list"),
        ([PROMPTS[0]], 0, "n=0"),
        ([PROMPTS[0]], -1, "n=-1"),
        ([[]], 1, "empty prompt"),
    ],
    ids=["no-prompts", "n=0", "n=-1", "empty-prompt"],
)
def test_bad_sample_arguments_raise(sampler: Sampler, prompts: list, n: int, match: str) -> None:
    """Empty prompt lists, empty prompts and n < 1 are refused with a message naming them."""
    with pytest.raises(ValueError, match=match):
        sampler.sample(prompts, n=n)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_sampling_settings_raise(sampler: Sampler, settings: dict, match: str) -> None:
    """Out-of-range temperature, top_p or max_tokens is refused, naming the setting."""
    with pytest.raises(ValueError, match=match):
        sampler.sample([PROMPTS[0]], n=1, **settings)


def test_prompt_longer_than_context_raises(sampler: Sampler) -> None:
    """A prompt that leaves no room for max_tokens is refused before generation, naming its size
    and the context; one that exactly fills the context is accepted and gets max_tokens tokens."""
    too_long = [sampler.eos_token_ids[0] + 1] * sampler.max_model_len
    with pytest.raises(ValueError, match=rf"prompt 1 has {sampler.max_model_len} tokens.*context of {sampler.max_model_len}"):
        sampler.sample([PROMPTS[0], too_long], n=1)
    fits = (sampler.encode(PROMPTS[0]) * sampler.max_model_len)[: sampler.max_model_len - MAX_TOKENS]
    with pytest.raises(ValueError, match="exceeds the context"):
        sampler.sample([fits + fits[-1:]], n=1, temperature=0)
    out = sampler.sample([fits], n=1, temperature=0)
    assert out[0].prompt_token_ids == fits
    check_finish_reasons(sampler, out, MAX_TOKENS)


@pytest.fixture()
def no_engine_start(monkeypatch: pytest.MonkeyPatch) -> List[dict]:
    """Records any attempt to build a vLLM engine (and refuses it) for the constructor tests."""
    import vllm

    calls: List[dict] = []

    def refuse(**kwargs):
        calls.append(kwargs)
        raise AssertionError("a vLLM engine was started")

    monkeypatch.setattr(vllm, "LLM", refuse)
    return calls


def test_unknown_stop_token_raises(tiny_model_dir: Path, no_engine_start: List[dict]) -> None:
    """A stop token that is not a single token of the vocabulary is refused by both backends,
    naming the token; vLLM refuses it before starting an engine."""
    for cls in (TorchtuneSampler, VLLMSampler):
        with pytest.raises(ValueError, match=r"stop token\(s\) \['<\|nope\|>'\] are not in the tokenizer"):
            cls(str(tiny_model_dir), stop_tokens=["<|eot|>", "<|nope|>"])
    assert no_engine_start == []
    known = TorchtuneSampler(str(tiny_model_dir), stop_tokens=["<|user|>"])  # a real token is fine
    assert known.stop_token_ids[-1] == known.tokenizer.convert_tokens_to_ids("<|user|>")
    assert set(known.eos_token_ids) < set(known.stop_token_ids)


@pytest.mark.parametrize("fraction", [1.5, 0.0, -0.1])
def test_bad_gpu_memory_utilization_raises_before_engine(
    tiny_model_dir: Path, no_engine_start: List[dict], fraction: float
) -> None:
    """gpu_memory_utilization outside (0, 1] is refused by name, without starting vLLM."""
    with pytest.raises(ValueError, match=rf"gpu_memory_utilization={fraction}"):
        VLLMSampler(str(tiny_model_dir), gpu_memory_utilization=fraction)
    assert no_engine_start == []


@pytest.mark.slow
def test_on_cpu_a_prompts_n_replies_share_its_kv_blocks_and_sample_the_same_tokens(
    vllm_sampler: VLLMSampler, tiny_model_dir: Path
) -> None:
    """Prefix caching shares full KV blocks only, and vLLM's CPU default block (128 tokens) is
    longer than a chat prompt, so each of n replies would prefill it again: on CPU the engine takes
    32-token blocks unless told otherwise. The block size changes no sampled token. (The 128-token
    engine runs in its own process: closing a second in-process engine tears down vLLM's global
    parallel state under the first.)"""
    assert vllm_sampler.llm.llm_engine.vllm_config.cache_config.block_size == 32
    script = (
        "import json, sys; from rlaif_recipes.samplers import VLLMSampler; "
        f"s = VLLMSampler({str(tiny_model_dir)!r}, dtype='float32', max_tokens={MAX_TOKENS}, block_size=128, kv_cache_memory_bytes=64 << 20); "
        "assert s.llm.llm_engine.vllm_config.cache_config.block_size == 128; "
        f"out = s.sample({PROMPTS!r}, n=4, temperature=1.0, seed=7); "
        "print('TOKENS', json.dumps([[c.token_ids for c in p.completions] for p in out])); s.close()"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    wide = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("TOKENS "))[len("TOKENS "):])
    assert wide == token_ids(vllm_sampler.sample(PROMPTS, n=4, temperature=1.0, seed=7))


@pytest.mark.slow
def test_engine_start_failure_is_named(tiny_model_dir: Path) -> None:
    """A setting vLLM itself rejects (a context beyond the model's 512 positions) surfaces as one
    ConfigError naming the setting, with vLLM's own error chained for the details."""
    with pytest.raises(ConfigError, match=r"^vLLM engine failed to start") as info:
        VLLMSampler(str(tiny_model_dir), dtype="float32", max_model_len=100_000)
    assert "max_model_len=100000" in str(info.value)
    assert info.value.__cause__ is not None
    assert "max_model_len" in str(info.value.__cause__)


# ---------------------------------------------------------------------------------------------
# 4. Weight sync (leaves the shared engine with its original weights)
# ---------------------------------------------------------------------------------------------


def train_to_answer(policy: nn.Module, prompt: List[int], answer: List[int], steps: int = 20) -> List[float]:
    """A few AdamW steps of next-token cross-entropy on `answer` after `prompt`; returns the losses."""
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    tokens = torch.tensor([prompt + answer])
    labels = tokens[:, 1:].clone()
    labels[:, : len(prompt) - 1] = -100  # learn the answer only
    losses = []
    for _ in range(steps):
        logits = policy(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_update_weights_makes_vllm_follow_the_trained_policy(
    vllm_sampler: VLLMSampler, tt_sampler: TorchtuneSampler, policy: nn.Module
) -> None:
    """After training, pushing full_state_dict(policy) makes vLLM's greedy output (ids,
    log-probs, finish reasons) match the trained torchtune policy and differ from before;
    pushing the original weights back restores vLLM's original output."""
    original = {k: v.detach().clone() for k, v in full_state_dict(policy).items()}
    before = vllm_sampler.sample(PROMPTS, n=1, temperature=0)

    tok = tt_sampler.tokenizer
    answer = tok("Sure.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|eot|>")]
    losses = train_to_answer(policy, tt_sampler.encode(PROMPTS[0]), answer)
    assert losses[-1] < losses[0] / 2

    try:
        vllm_sampler.update_weights(full_state_dict(policy))
        after = vllm_sampler.sample(PROMPTS, n=1, temperature=0)
        trained = tt_sampler.sample(PROMPTS, n=1, temperature=0)
        assert_same_greedy(after, trained)
        assert token_ids(after) != token_ids(before)
        # the trained prompt now gets the trained answer, ended by the stop token
        assert after[0].completions[0].token_ids == answer
        assert after[0].completions[0].finish_reason == "stop"
        check_finish_reasons(vllm_sampler, after, MAX_TOKENS)
    finally:
        vllm_sampler.update_weights(original)
    restored = vllm_sampler.sample(PROMPTS, n=1, temperature=0)
    assert token_ids(restored) == token_ids(before)
    assert [lp for s in restored for c in s.completions for lp in c.logprobs] == pytest.approx(
        [lp for s in before for c in s.completions for lp in c.logprobs], abs=1e-5
    )


# ---------------------------------------------------------------------------------------------
# 5. Prompts as token ids or as chat messages
# ---------------------------------------------------------------------------------------------


def test_encode_applies_the_chat_template(sampler: Sampler) -> None:
    """encode renders messages with the checkpoint's chat template (BOS first, the assistant
    header last) and passes token ids through unchanged."""
    from rlaif_recipes.models.tiny import render_chat

    tok = sampler.tokenizer
    for messages in PROMPTS:
        ids = sampler.encode(messages)
        assert ids == tok(render_chat(messages), add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
        assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        assert sampler.encode(ids) == ids


def test_token_id_prompt_equals_chat_prompt(sampler: Sampler) -> None:
    """The same prompt given as token ids or as chat messages (also mixed in one call) gives
    identical samples, so callers may pre-tokenize."""
    as_ids = [sampler.encode(p) for p in PROMPTS]
    mixed = [as_ids[0], PROMPTS[1], as_ids[2]]
    by_messages = sampler.sample(PROMPTS, n=2, temperature=1.0, seed=5)
    by_ids = sampler.sample(as_ids, n=2, temperature=1.0, seed=5)
    by_mixed = sampler.sample(mixed, n=2, temperature=1.0, seed=5)
    assert [s.prompt_token_ids for s in by_messages] == as_ids
    assert by_ids == by_messages
    assert by_mixed == by_messages
