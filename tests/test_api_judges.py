"""API judges (`judge=openai`, `judge=anthropic`) over real HTTP on loopback.

The OpenAI judge runs against vLLM's own OpenAI-compatible server with the tiny model. Faults a
real server will not produce on demand (429 + Retry-After, 500, hangs past the timeout, dropped
connections, garbage verdicts) come from `servers.FaultServer`, which knows the right answer:
the response containing the marker word wins, so no pair may ever come back labelled wrongly.
"""

import asyncio
import json
import logging
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import List

import pytest
import yaml
from servers import FaultServer, free_port, vllm_server

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.judges import AnthropicJudge, OpenAIJudge, Pair, RouterJudge, Verdict
from rlaif_recipes.judges.api import APIJudge, JudgeUnavailableError
from rlaif_recipes.judges.api_limits import retry_after_seconds
from rlaif_recipes.judges.api_parse import parse_verdict

ROOT = Path(__file__).resolve().parent.parent
RUBRIC = yaml.safe_load((ROOT / "conf" / "rubric" / "false_refusal.yaml").read_text())
KEY_ENV = "RLAIF_TEST_JUDGE_KEY"
KEY = "sk-test-7f3a9c1e5b2d4f60a8c2e4b6d8f0a1c3"
FAST = dict(
    timeout_s=5.0, backoff_base_s=0.02, backoff_max_s=2.0, max_retries=4, max_concurrency=8
)  # timeouts: per test


MADE: List[APIJudge] = []  # judges made by `make`, closed after each test (their event loops and connections)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    yield
    while MADE:
        MADE.pop().close()


def marked_pairs(n: int, marker: str = "WINNER") -> List[Pair]:
    """Short pairs; the one with the marker is right, on side A for odd i and side B for even i."""
    return [
        Pair(
            f"Question {i}?",
            f"Answer {i} {marker}." if i % 2 else f"No {i}.",
            f"No {i}." if i % 2 else f"Answer {i} {marker}.",
        )
        for i in range(n)
    ]


def make(cls, server: FaultServer, **kw):
    base_url = f"{server.url}/v1" if cls is OpenAIJudge else server.url
    defaults = dict(model="judge", api_key_env=KEY_ENV, rubric=RUBRIC, **FAST)
    if cls is AnthropicJudge:
        defaults.update(temperature=None, structured="none")
    judge = cls(**{"base_url": base_url, **defaults, **kw})
    MADE.append(judge)
    return judge


def right(pair: Pair) -> Verdict:
    return Verdict.A if "WINNER" in pair.response_a else Verdict.B


# ---- strict verdict parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,verdict",
    [
        ("A", "A"),
        (" B\n", "B"),
        ("**A**", "A"),
        ("B.", "B"),
        ('"A"', "A"),
        ("(B)", "B"),
        ('{"verdict": "B", "rationale": "r"}', "B"),
        ('```json\n{"verdict": "A"}\n```', "A"),
    ],
)
def test_parser_accepts_exact_letters_and_json(text, verdict):
    assert parse_verdict(text)[0] == Verdict(verdict)


@pytest.mark.parametrize(
    "text",
    [
        "Response A",
        "a",
        "",
        "A or B",
        "AB",
        '{"verdict": "C"}',
        "I think A is better",
        "tie",
        '{"verdict": "A"',
        None,
    ],
)
def test_parser_abstains_on_anything_else(text):
    verdict, _, reason = parse_verdict(text)
    assert verdict is None and reason.startswith("unparseable verdict:")


def test_retry_after_forms():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds({"retry-after": http_date}) <= 30
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None


# ---- the real thing: vLLM's OpenAI-compatible server --------------------------------------------


@pytest.fixture(scope="module")
def vllm_url(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with vllm_server(
        str(tiny_model_dir), "tiny-judge", log, extra=["--logprobs-mode", "processed_logprobs"]
    ) as url:
        yield url


def served_requests(url: str) -> float:
    """Requests the vLLM server finished, from its own Prometheus counters."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.slow
def test_openai_judge_against_vllm_server(vllm_url, tmp_path):
    pairs = [
        Pair("Hi?", "Hello!", "No."),
        Pair("Sum 2+2?", "4", "I refuse."),
        Pair("Name a fruit.", "Apple", "Cannot."),
    ]
    kw = dict(
        base_url=vllm_url,
        model="tiny-judge",
        api_key_env=None,
        rubric=RUBRIC,
        structured="choice",
        max_output_tokens=2,
    )

    with OpenAIJudge(order="fixed", **kw) as fixed:
        for j in fixed.judge(pairs):  # one order: the verdict is the sampled letter, P(A) from its logprobs
            assert j.labelled and 0 < j.prob_a < 1
            assert (j.verdict is Verdict.A) == (j.prob_a > 0.5)  # greedy: the argmax of the two choices
            assert j.usage["requests"] == 1 and j.usage["input_tokens"] > 100 and j.model == "tiny-judge"

    before = served_requests(vllm_url)
    with OpenAIJudge(order="both", cache_path=str(tmp_path / "cache.sqlite"), **kw) as judge:
        first = judge.judge(pairs)
    assert judge.metrics["requests"] == judge.metrics["queries"] == 2 * len(pairs)  # both orders asked
    assert served_requests(vllm_url) - before == 2 * len(pairs)
    for j in first:
        assert j.verdict in (Verdict.A, Verdict.B, Verdict.TIE) and 0 < j.prob_a < 1
        assert j.usage["requests"] == 2

    with OpenAIJudge(order="both", cache_path=str(tmp_path / "cache.sqlite"), **kw) as again:
        second = again.judge(pairs)
    assert again.metrics["cache_hits"] == 2 * len(pairs) and again.metrics["requests"] == 0
    assert served_requests(vllm_url) - before == 2 * len(pairs)  # nothing new reached the server
    assert [j.to_dict() for j in second] == [j.to_dict() for j in first]


@pytest.mark.slow
def test_garbage_from_a_real_model_abstains(vllm_url):
    """json_schema on the random tiny model runs out of tokens mid-JSON: abstain, never a guess."""
    with OpenAIJudge(
        base_url=vllm_url,
        model="tiny-judge",
        api_key_env=None,
        rubric=RUBRIC,
        structured="json_schema",
        max_output_tokens=6,
        order="fixed",
    ) as judge:
        (j,) = judge.judge([Pair("Hi?", "Hello!", "No.")])
    assert (
        j.verdict is Verdict.ABSTAIN
        and "unparseable verdict" in j.reason
        and "max_output_tokens=6" in j.reason
    )


@pytest.mark.slow
def test_cascade_escalates_only_the_doubted_pairs_to_a_real_server_and_caches_that_tier(vllm_url, tmp_path):
    """reward-model-like first tier (the rule judge: two refusals are a 0.5 tie) -> vLLM's
    OpenAI-compatible server -> people. Only the doubted pairs reach the server, each label says
    which tier gave it, and a re-run asks the server nothing."""
    refusal = "I'm sorry, but I can't help with that."
    confident = [Pair(f"How do I boil {x}?", f"Boil the {x} for ten minutes.", refusal) for x in ("eggs", "rice")]
    doubted = [Pair(f"How do I peel {x}?", refusal, refusal + " Really.") for x in ("eggs", "garlic", "mango")]
    rule = {"_component_": "rlaif_recipes.judges.RuleJudge", "rule": "rlaif_recipes.judges.rules.answers_instead_of_refusing"}
    second = dict(base_url=vllm_url, model="tiny-judge", api_key_env=None, rubric=RUBRIC, structured="choice",
                  max_output_tokens=2, order="both", cache_path=str(tmp_path / "tier2.sqlite"), name="strong")  # fmt: skip

    def cascade(run: str, **tier2):
        return RouterJudge(rule, review_path=f"{tmp_path}/{run}/queue.jsonl", human_labels_path=f"{tmp_path}/{run}/labels.jsonl",
                           min_confidence=0.2, escalate=OpenAIJudge(**{**second, **tier2}))  # fmt: skip

    before = served_requests(vllm_url)
    with cascade("a") as judge:
        estimate = judge.estimate(confident + doubted, "this test")
        assert estimate.startswith("cascade: at most judge cost estimate for this test, if the first tier doubted every pair: 5 comparisons -> 10 requests")
        out = judge.judge(confident + doubted)
    assert served_requests(vllm_url) - before == judge.metrics["requests"] == 2 * len(doubted)  # both orders, doubted only
    assert all((j.verdict, j.source, j.judge) == (Verdict.A, "ai", "RuleJudge") for j in out[:2])
    for j in out[2:]:  # the tiny model is sure, or its orders disagree and the pair waits for people
        assert (j.labelled and j.source == "ai-escalated" and j.judge == "strong" and j.model == "tiny-judge") or (
            j.verdict is Verdict.ABSTAIN and "escalation_orders_disagree" in j.reason
        )
    assert judge.metrics["escalation_labels"] + judge.metrics["awaiting_review"] == len(doubted)

    with cascade("b") as again:  # the second tier's own cache: nothing new reaches the server
        assert [j.verdict for j in again.judge(confident + doubted)] == [j.verdict for j in out]
    assert served_requests(vllm_url) - before == 2 * len(doubted) and again.metrics["cache_hits"] == 2 * len(doubted)

    dead = f"http://127.0.0.1:{free_port()}/v1"  # the second tier goes down mid-run: review items, never labels
    with cascade("c", base_url=dead, cache_path=None, probe=False, **{**FAST, "max_retries": 1}) as judge:
        out = judge.judge(confident + doubted)
    assert all(j.verdict is Verdict.ABSTAIN and "escalation_abstained" in j.reason for j in out[2:])
    assert len((tmp_path / "c" / "queue.jsonl").read_text().splitlines()) == len(doubted)


# ---- faults ------------------------------------------------------------------------------------

RATES = dict(rate_limit=0.08, server_error=0.08, timeout=0.04, drop=0.08, garbage=0.05)


@pytest.mark.parametrize(
    "cls,structured",
    [
        (OpenAIJudge, "choice"),
        (OpenAIJudge, "json_schema"),
        (OpenAIJudge, "none"),
        (AnthropicJudge, "none"),
        (AnthropicJudge, "json_schema"),
    ],
)
def test_faults_never_mislabel(cls, structured):
    pairs = marked_pairs(24)
    with FaultServer(rates=RATES, retry_after="0.1", hang_s=2.5, seed=7) as server:
        judge = make(cls, server, structured=structured, order="both", timeout_s=1.0)
        start = time.monotonic()
        out = judge.judge(pairs)
        elapsed = time.monotonic() - start
        seen = {e["fault"] for e in server.log}
    assert set(RATES) <= seen  # every kind of fault was actually injected
    assert all(j.labelled or (j.verdict is Verdict.ABSTAIN and j.reason) for j in out)
    assert [j.verdict for j in out if j.labelled] == [right(p) for p, j in zip(pairs, out) if j.labelled]
    assert sum(j.labelled for j in out) >= len(pairs) // 2  # retries recover most transient faults
    expected_prob = {Verdict.A: 0.9, Verdict.B: 0.1} if cls is OpenAIJudge else {}  # server: P(right) = 0.9
    assert all(j.prob_a == pytest.approx(expected_prob.get(j.verdict)) for j in out if j.labelled)
    assert all(
        "unparseable verdict" in j.reason or "gave up after 5 attempt(s)" in j.reason
        for j in out
        if not j.labelled
    )
    m = judge.metrics
    assert (
        m["retries"] > 0
        and m["errors_rate_limit"]
        and m["errors_server"]
        and m["errors_timeout"]
        and m["errors_connection"]
    )
    assert m["requests"] == len(server.log)  # every attempt counted, on both sides
    # 48 queries, 8 at a time: 6 waves, each at worst 5 attempts x (timeout + longest backoff)
    assert elapsed < 6 * 5 * (1.0 + FAST["backoff_max_s"])


def test_retry_after_is_honoured():
    with FaultServer(script=["rate_limit"], retry_after="1") as server:
        judge = make(OpenAIJudge, server, order="fixed", structured="choice")
        (j,) = judge.judge(marked_pairs(1))
    assert j.verdict is Verdict.B
    first, second = server.log
    assert first["fault"] == "rate_limit" and second["fault"] is None
    assert 1.0 <= second["t"] - first["t"] < 2.5  # backoff alone would have been ~0.02 s
    assert judge.metrics["errors_rate_limit"] == 1 and judge.metrics["retries"] == 1


def test_retry_after_longer_than_cap_abstains_without_waiting():
    with FaultServer(script=["rate_limit"], retry_after="3600") as server:
        judge = make(OpenAIJudge, server, order="fixed")
        start = time.monotonic()
        (j,) = judge.judge(marked_pairs(1))
    assert time.monotonic() - start < 5 and len(server.log) == 1
    assert j.verdict is Verdict.ABSTAIN and "asked to wait 3600s" in j.reason and "backoff_max_s" in j.reason


@pytest.mark.parametrize("limit", ["requests_per_minute", "tokens_per_minute"])
def test_rate_limits_pace_requests(limit):
    pairs = marked_pairs(6)
    with FaultServer() as server:
        per_request = (
            1
            if limit == "requests_per_minute"
            else make(OpenAIJudge, server)._estimate_input_tokens(pairs[-1]) + 8
        )
        judge = make(
            OpenAIJudge, server, order="fixed", **{limit: 120 * per_request}
        )  # 2 requests/s, burst of 2
        judge.judge(pairs)
        times = sorted(e["t"] for e in server.log)
    assert times[-1] - times[0] >= 1.8  # 4 requests past the burst at 2/s


def test_results_are_recorded_as_they_arrive():
    """A slow request does not hold back the others: each is handed over (and cached) on arrival."""
    with FaultServer(script=["timeout"], hang_s=3.0) as server:
        judge = make(OpenAIJudge, server, order="fixed", max_concurrency=4, timeout_s=1.0)
        arrivals = {}
        judge._compare(marked_pairs(4), lambda i, j: arrivals.__setitem__(i, (time.monotonic(), j)))
    slow = next(
        i for i, (_, j) in arrivals.items() if j.usage["requests"] == 2
    )  # the one that timed out once
    assert all(t < arrivals[slow][0] - 0.3 for i, (t, _) in arrivals.items() if i != slow)
    assert all(j.labelled for _, j in arrivals.values())


@pytest.mark.parametrize("probe", [True, False])
def test_requests_spread_over_replicas_and_a_dead_one_is_skipped(probe):
    """judge.base_url as a list: round robin over the replicas; one that is down is skipped (at the
    probe, or after max_retries connection failures in a row), and no pair loses its verdict."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    pairs = marked_pairs(40)
    with FaultServer() as first, FaultServer() as second:
        urls = [f"{first.url}/v1", dead, f"{second.url}/v1"]
        judge = make(OpenAIJudge, first, base_url=urls, order="fixed", max_retries=1, max_concurrency=4, probe=probe)
        out = judge.judge(pairs)
        served = (len(first.log), len(second.log))
    assert [j.verdict for j in out] == [right(p) for p in pairs]
    assert judge.metrics[f"requests@{urls[0]}"] == served[0] > 10 and judge.metrics[f"requests@{urls[2]}"] == served[1] > 10
    assert judge.metrics[f"requests@{dead}"] <= (0 if probe else 4)  # at most the requests in flight when it failed
    assert dead in judge._dead


def test_concurrent_calls_share_one_loop_and_each_gets_its_own_usage():
    """Several `judge_with_usage` calls at once from threads (the online loop judging steps ahead):
    all are served by the judge's one event loop and capped by its one max_concurrency, and each
    call's usage counts only its own requests."""
    batches = [marked_pairs(n, marker="WINNER") for n in (3, 5, 7)]
    results = {}
    with FaultServer(latency_s=0.2) as server:
        judge = make(OpenAIJudge, server, order="fixed", max_concurrency=4)
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, judge.judge_with_usage(batches[k]))) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = server.peak_in_flight
    for k, pairs in enumerate(batches):
        judgments, usage = results[k]
        assert [j.verdict for j in judgments] == [right(p) for p in pairs]
        assert usage["requests"] == usage["queries"] == len(pairs) and usage["cache_hits"] == 0
    assert judge.metrics["requests"] == 15 and peak <= 4  # one cap for all three calls


def test_hedged_requests_cut_a_slow_tail_and_keep_every_verdict():
    """hedge_after_s: a request still unanswered after it gets one copy, and the first answer wins;
    half the requests take 3 s here, so most pairs are answered by their copy."""
    pairs = marked_pairs(12)
    with FaultServer(slow_rate=0.5, slow_s=3.0, seed=2) as server:  # the first 12 draws: 7 slow; their copies: 4 fast
        judge = make(OpenAIJudge, server, order="fixed", hedge_after_s=0.2, max_concurrency=12)
        out, usage = judge.judge_with_usage(pairs)
        sent = len(server.log)
    assert [j.verdict for j in out] == [right(p) for p in pairs]
    m = judge.metrics
    assert m["hedged"] >= 3 and m["hedge_wins"] >= 2 and m["requests"] == 12 + m["hedged"] == sent == usage["requests"]
    assert m["hedged"] == sum(j.usage["requests"] == 2 for j in out)  # each judgment bills the copy it sent
    plain = make(OpenAIJudge, FaultServer(), order="fixed")
    assert plain.hedge_after_s is None and "hedge_after_s" in APIJudge.RUNTIME_SETTINGS  # not in the cache key


def test_one_pair_calls_still_take_the_replicas_in_turn():
    """The online loop asks one prompt at a time: the round robin runs over the judge's life, not
    within a call, so single-pair calls spread over the replicas too."""
    with FaultServer() as first, FaultServer() as second:
        judge = make(OpenAIJudge, first, base_url=[f"{first.url}/v1", f"{second.url}/v1"], order="fixed")
        for pair in marked_pairs(6):
            assert judge.judge([pair])[0].verdict is right(pair)
        assert len(first.log) == len(second.log) == 3


def test_cost_estimate_counts_orders_and_cache_and_names_a_short_budget(tmp_path):
    pairs = marked_pairs(10)
    with FaultServer() as server:
        settings = dict(order="both", input_usd_per_mtok=3.0, output_usd_per_mtok=15.0, cache_path=str(tmp_path / "cache.sqlite"))
        make(OpenAIJudge, server, **settings).judge(pairs[:4])  # 8 requests paid for: now cached
        sent = len(server.log)
        judge = make(OpenAIJudge, server, **settings, max_cost_usd=0.0001)  # a budget is no part of the cache key
        line = judge.estimate(pairs, "a test")
        assert len(server.log) == sent == 8  # estimating sends nothing
    tokens = sum(judge._estimate_input_tokens(p) for p in pairs[4:]) * 2  # both orders of the 6 new pairs
    assert f"10 comparisons -> 12 requests (8 cached), ~{tokens} input + {12 * judge.max_output_tokens} output tokens" in line
    assert f"~${(tokens * 3.0 + 12 * judge.max_output_tokens * 15.0) / 1e6:.2f}" in line
    assert "below the estimate: judge.max_cost_usd=0.0001" in line and "raise it to finish" in line


def test_sync_entry_works_inside_a_running_event_loop():
    with FaultServer() as server:
        judge = make(OpenAIJudge, server, order="fixed")

        async def caller():
            return judge.judge(marked_pairs(3))

        out = asyncio.run(caller())
    assert [j.verdict for j in out] == [right(p) for p in marked_pairs(3)]


# ---- budgets -----------------------------------------------------------------------------------


def test_request_budget_stops_cleanly_and_keeps_what_is_done(tmp_path):
    pairs, cache = marked_pairs(12), str(tmp_path / "cache.sqlite")
    with FaultServer() as server:
        judge = make(OpenAIJudge, server, order="fixed", max_concurrency=1, max_requests=5, cache_path=cache)
        out = judge.judge(pairs)
        assert len(server.log) == 5
        assert [j.verdict for j in out[:5]] == [right(p) for p in pairs[:5]]
        assert all(j.verdict is Verdict.ABSTAIN and j.reason == judge.stopped for j in out[5:])
        assert "judge.max_requests=5" in judge.stopped and "judge.max_requests=10" in judge.stopped
        assert len(judge.cache) == 5

        resumed = make(
            OpenAIJudge, server, order="fixed", max_concurrency=4, max_requests=50, cache_path=cache
        )
        out = resumed.judge(pairs)
    assert resumed.metrics["cache_hits"] == 5 and resumed.metrics["requests"] == 7 and len(server.log) == 12
    assert [j.verdict for j in out] == [right(p) for p in pairs]


def test_cost_budget_stops_before_overspending():
    prices = dict(input_usd_per_mtok=1000.0, output_usd_per_mtok=1000.0)  # ~0.3 USD per request here
    with FaultServer() as server:
        judge = make(OpenAIJudge, server, order="fixed", max_cost_usd=1.0, **prices)
        out = judge.judge(marked_pairs(10))
    done = [j for j in out if j.labelled]
    assert 0 < len(done) < 10 and judge.metrics["cost_usd"] <= 1.0
    assert sum(j.usage["cost_usd"] for j in done) == pytest.approx(judge.metrics["cost_usd"])
    assert "judge.max_cost_usd=1.0" in judge.stopped
    with pytest.raises(ValueError, match="input_usd_per_mtok"):
        make(OpenAIJudge, server, max_cost_usd=1.0)


# ---- setup errors, unreachable endpoints, keys ----------------------------------------------------


@pytest.mark.parametrize("option,cls", [("openai", OpenAIJudge), ("anthropic", AnthropicJudge)])
def test_group_yaml_composes_and_builds(option, cls, tmp_path):
    """Every key of conf/judge/<option>.yaml is a constructor argument of the right type."""
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        f"defaults:\n  - judge: {option}\n  - rubric: false_refusal\n  - _self_\noutput_dir: {tmp_path}\nseed: 3\n"
    )
    cfg = rlaif_config.load(str(run_yaml), [f"judge.api_key_env={KEY_ENV}"])
    judge = rlaif_config.build(cfg.judge)
    assert (
        type(judge) is cls
        and judge.order == "both"
        and judge.seed == 3
        and judge.rubric.id == "false_refusal@v1"
    )
    assert judge.cache is not None and KEY not in json.dumps(judge.identity())


def test_identity_keeps_what_decides_a_verdict_and_drops_limits_and_budgets():
    """Concurrency, rate limits and budgets may change on a resumed run and keep its cache; the
    model, temperature and endpoint may not. The key's variable name is not in it either."""
    kw = dict(model="judge", api_key_env=KEY_ENV, rubric=RUBRIC, base_url="http://127.0.0.1:1/v1", probe=False)
    identity = OpenAIJudge(**kw).identity()
    assert OpenAIJudge(max_concurrency=64, max_requests=5, requests_per_minute=60.0, **kw).identity() == identity
    assert OpenAIJudge(**{**kw, "temperature": 0.7}).identity() != identity
    assert OpenAIJudge(**{**kw, "base_url": "http://127.0.0.1:2/v1"}).identity() != identity
    assert (identity["model"], identity["structured"], identity["logprobs"]) == ("judge", "none", True)
    assert KEY_ENV not in json.dumps(identity) and "max_concurrency" not in identity


def test_missing_key_fails_at_construction_naming_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with FaultServer() as server:
        for cls in (OpenAIJudge, AnthropicJudge):
            with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} is not set"):
                make(cls, server)
        assert server.log == []


def test_bad_settings_fail_at_construction():
    with FaultServer() as server:
        with pytest.raises(ValueError, match="structured=choice is a vLLM extension"):
            make(AnthropicJudge, server, structured="choice")
        with pytest.raises(ValueError, match="temperature"):
            make(AnthropicJudge, server, temperature=0.0)
        with pytest.raises(ValueError, match="choose one of choice, json_schema, none"):
            make(OpenAIJudge, server, structured="regex")


@pytest.mark.parametrize("cls", [OpenAIJudge, AnthropicJudge])
def test_unreachable_endpoint(cls):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    kw = dict(model="judge", api_key_env=KEY_ENV, rubric=RUBRIC, **{**FAST, "max_retries": 2})
    if cls is AnthropicJudge:
        kw["temperature"] = None
    start = time.monotonic()
    with pytest.raises(JudgeUnavailableError, match=f"{url}.* is unreachable"):
        cls(base_url=url, **kw).judge(marked_pairs(2))
    with cls(base_url=url, probe=False, **kw) as judge:
        out = judge.judge(marked_pairs(4))
    assert all(
        j.verdict is Verdict.ABSTAIN and "gave up after 3 attempt(s)" in j.reason and "Connect" in j.reason
        for j in out
    )
    assert time.monotonic() - start < 10


def test_endpoint_that_never_answers_abstains_after_the_retry_budget():
    with FaultServer(rates={"timeout": 1.0}, hang_s=2.0) as server:
        judge = make(OpenAIJudge, server, order="fixed", max_retries=1, timeout_s=0.3)
        start = time.monotonic()
        out = judge.judge(marked_pairs(4))
        elapsed = time.monotonic() - start
    assert all(j.verdict is Verdict.ABSTAIN and "APITimeoutError" in j.reason for j in out)
    assert judge.metrics["errors_timeout"] == 8 and elapsed < 2 * (0.3 + 2.0) + 1


def test_rejected_key_stops_the_run():
    with FaultServer(api_key="sk-the-right-one") as server:
        with pytest.raises(JudgeUnavailableError, match=f"HTTP 401.*\\${KEY_ENV}"):
            make(OpenAIJudge, server).judge(marked_pairs(2))
        judge = make(OpenAIJudge, server, probe=False, order="fixed", max_concurrency=2)
        out = judge.judge(marked_pairs(10))
    assert all(j.verdict is Verdict.ABSTAIN and "HTTP 401" in j.reason for j in out)
    assert judge.stopped and judge.metrics["requests"] <= 2  # the two in flight, not one per pair


def test_key_never_written_anywhere(tmp_path, caplog, capsys):
    """Config compose + save, every log record, stdout/stderr, the cache file and judgments: no key."""
    caplog.set_level(logging.DEBUG)
    out_dir = tmp_path / "run"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        "defaults:\n  - judge: openai\n  - rubric: false_refusal\n  - _self_\noutput_dir: ???\nseed: 0\n"
    )
    texts = []
    with FaultServer(rates=RATES, retry_after="0.05", hang_s=2.0, api_key=KEY) as server:
        cfg = rlaif_config.load(
            str(run_yaml),
            [
                f"output_dir={out_dir}",
                f"judge.base_url={server.url}/v1",
                f"judge.api_key_env={KEY_ENV}",
                "judge.timeout_s=1.0",
                "judge.backoff_base_s=0.02",
                "judge.max_concurrency=8",
            ],
        )
        judge = rlaif_config.build(cfg.judge)
        out = judge.judge(marked_pairs(12))
        texts += [json.dumps(j.to_dict()) for j in out] + [
            repr(judge),
            json.dumps(judge.identity()),
            str(dict(judge.metrics)),
        ]
        judge.close()
    with FaultServer(api_key="sk-another-key-entirely") as server:  # a rejected key: error paths
        bad = OpenAIJudge(
            base_url=f"{server.url}/v1",
            model="judge",
            api_key_env=KEY_ENV,
            rubric=RUBRIC,
            probe=False,
            **FAST,
        )
        texts += [j.reason for j in bad.judge(marked_pairs(2))] + [bad.stopped]
        with pytest.raises(JudgeUnavailableError) as e:
            OpenAIJudge(base_url=f"{server.url}/v1", model="judge", api_key_env=KEY_ENV, rubric=RUBRIC).judge(
                marked_pairs(1)
            )
        texts.append(str(e.value))
    saved = rlaif_config.save(cfg, str(out_dir))
    assert any(j.labelled for j in out) and (out_dir / "judge_cache.sqlite").exists()
    captured = capsys.readouterr()
    texts += [caplog.text, captured.out, captured.err, saved.read_text()]
    assert "api_key_env: " + KEY_ENV in saved.read_text()
    for f in out_dir.iterdir():  # the cache and its WAL, the config
        assert KEY.encode() not in f.read_bytes(), f
    for t in texts:
        assert KEY not in t
