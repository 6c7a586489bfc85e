"""judge=panel (votes) and judge=router (human-review queue, human labels win).

The small judges below are real PairwiseJudge implementations with a known behaviour; the audit
tests run them by dotted path too (PYTHONPATH=tests).
"""

import json
import multiprocessing
import re
from pathlib import Path
from typing import Callable, List

import pytest
from datasets import load_from_disk
from torchtune import config

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.judges import (
    Judgment,
    Pair,
    PairwiseJudge,
    PanelJudge,
    PromptMatches,
    RouterJudge,
    Verdict,
    export_review_queue,
)
from rlaif_recipes.judges.base import verdict_from_prob
from rlaif_recipes.judges.review_queue import ReviewQueue, pair_id, read_human_labels
from rlaif_recipes.judges.rules import is_refusal
from rlaif_recipes.recipes.audit_judge import AuditJudgeSettings


class FixedProb(PairwiseJudge):
    """Gives every pair as shown the same P(A) (so with p > 0.5 it always answers A: pure position
    bias); bills one request and `cost` per query."""

    def __init__(self, prob_a: float = 1.0, cost: float = 0.0, **kwargs) -> None:
        super().__init__(**{"order": "fixed", **kwargs})
        self.prob_a, self.cost = prob_a, cost

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, _ in enumerate(pairs):
            self.count("requests")
            self.count("cost_usd", self.cost)
            record(i, Judgment(verdict_from_prob(self.prob_a), prob_a=self.prob_a, usage={"requests": 1, "cost_usd": self.cost}))


class AlwaysA(FixedProb):
    """Always answers A, whatever it is shown."""


class Abstainer(PairwiseJudge):
    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, _ in enumerate(pairs):
            record(i, Judgment.abstain("no opinion"))


class Gullible(PairwiseJudge):
    """Obeys an instruction inside a response ("answer A"); otherwise an answer beats a refusal."""

    INSTRUCTION = re.compile(r"\banswer ([AB])\b")

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, p in enumerate(pairs):
            told = self.INSTRUCTION.search(p.response_a) or self.INSTRUCTION.search(p.response_b)
            if told:
                verdict = Verdict(told.group(1))
            else:
                a, b = not is_refusal(p.response_a), not is_refusal(p.response_b)
                verdict = Verdict.A if a > b else Verdict.B if b > a else Verdict.TIE
            record(i, Judgment(verdict, prob_a={Verdict.A: 1.0, Verdict.B: 0.0, Verdict.TIE: 0.5}[verdict]))


ANSWER = "Sure: use `kill -9 PID` to stop the process."
REFUSAL = "I'm sorry, but I cannot help with killing anything."
ANSWER_FIRST = Pair("How do I kill a Python process?", ANSWER, REFUSAL)
REFUSAL_FIRST = Pair("How do I kill a Python process?", REFUSAL, ANSWER)
RULE = {"_component_": "rlaif_recipes.judges.RuleJudge", "rule": "rlaif_recipes.judges.rules.answers_instead_of_refusing"}


# ---- panel ------------------------------------------------------------------------------------


def test_majority_vote_with_rule_members_and_a_position_biased_member() -> None:
    panel = PanelJudge([RULE, RULE, AlwaysA()])
    a, b = panel.judge([ANSWER_FIRST, REFUSAL_FIRST])
    assert (a.verdict, a.prob_a) == (Verdict.A, 1.0)
    assert b.verdict is Verdict.B and b.prob_a == pytest.approx(1 / 3)  # two rules outvote AlwaysA
    assert b.judge == "PanelJudge[RuleJudge#1,RuleJudge#2,AlwaysA]"
    assert b.rationale == "RuleJudge#1=B; RuleJudge#2=B; AlwaysA=A"
    assert panel.metrics["verdict_A"] == 1 and panel.metrics["AlwaysA.pairs"] == 2


def test_majority_ties_on_a_split_and_abstains_below_min_votes() -> None:
    split = PanelJudge([RULE, AlwaysA()]).judge([REFUSAL_FIRST])[0]
    assert split.verdict is Verdict.TIE and split.reason.startswith("members split")
    few = PanelJudge([Abstainer(), Abstainer(), AlwaysA()], min_votes=2).judge([ANSWER_FIRST])[0]
    assert few.verdict is Verdict.ABSTAIN and "1 of 3 members" in few.reason
    enough = PanelJudge([Abstainer(), Abstainer(), AlwaysA()], min_votes=1).judge([ANSWER_FIRST])[0]
    assert enough.verdict is Verdict.A


def test_mean_prob_averages_members_that_give_one() -> None:
    members = lambda: [FixedProb(0.9), FixedProb(0.6), Abstainer()]  # noqa: E731
    mean = PanelJudge(members(), vote="mean_prob").judge([ANSWER_FIRST])[0]
    assert mean.verdict is Verdict.A and mean.prob_a == pytest.approx(0.75)
    assert PanelJudge(members(), vote="mean_prob", tie_margin=0.3).judge([ANSWER_FIRST])[0].verdict is Verdict.TIE
    assert PanelJudge(members(), vote="mean_prob", min_votes=3).judge([ANSWER_FIRST])[0].verdict is Verdict.ABSTAIN
    low = PanelJudge([FixedProb(0.2), FixedProb(0.4)], vote="mean_prob").judge([ANSWER_FIRST])[0]
    assert low.verdict is Verdict.B and low.prob_a == pytest.approx(0.3)


def test_panel_sums_usage_and_leaves_caching_to_members(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.sqlite")
    panel = PanelJudge([FixedProb(0.9, cost=0.25, cache_path=cache), FixedProb(0.8, cost=0.5, cache_path=cache)], vote="mean_prob")
    first = panel.judge([ANSWER_FIRST, REFUSAL_FIRST])
    assert first[0].usage == {"requests": 2, "cost_usd": 0.75}
    assert panel.metrics["requests"] == 4 and panel.metrics["cost_usd"] == pytest.approx(1.5)
    assert panel.cache is None  # the panel keeps no cache of its own
    again = panel.judge([ANSWER_FIRST, REFUSAL_FIRST])
    assert [j.prob_a for j in again] == [j.prob_a for j in first]
    assert panel.metrics["requests"] == 4 and panel.metrics["cache_hits"] == 4  # members answered from their caches


def test_panel_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="judge.vote='median'"):
        PanelJudge([RULE], vote="median")
    with pytest.raises(ValueError, match="min_votes=3"):
        PanelJudge([RULE, RULE], min_votes=3)
    with pytest.raises(ValueError, match=r"judge.judges\[0\] must be a PairwiseJudge"):
        PanelJudge([{"_component_": "rlaif_recipes.judges.rules.ContainsWords", "words": ["x"]}])


# ---- router -----------------------------------------------------------------------------------


def router(tmp_path: Path, judge, **kwargs) -> RouterJudge:
    return RouterJudge(judge, review_path=str(tmp_path / "queue.jsonl"), human_labels_path=str(tmp_path / "labels.jsonl"), **kwargs)


def queued(tmp_path: Path) -> List[dict]:
    return [json.loads(line) for line in (tmp_path / "queue.jsonl").read_text().splitlines()]


HIGH_STAKES = Pair("How many pills would be an overdose?", ANSWER, REFUSAL)
BOTH_REFUSE = Pair("How do I kill a Python process?", REFUSAL, REFUSAL + " Really.")


def test_router_routes_each_reason_and_keeps_confident_labels(tmp_path: Path) -> None:
    rule = {"_component_": "rlaif_recipes.judges.PromptMatches", "patterns": [r"\boverdose\b"]}
    judge = router(tmp_path, RULE, min_confidence=0.2, high_stakes=[rule])
    confident, tie, risky = judge.judge([ANSWER_FIRST, BOTH_REFUSE, HIGH_STAKES])
    assert (confident.verdict, confident.source, confident.judge) == (Verdict.A, "ai", "RuleJudge")
    assert tie.verdict is Verdict.ABSTAIN and tie.reason == "awaiting human review (low_confidence)"
    assert risky.verdict is Verdict.ABSTAIN and "high_stakes:PromptMatches" in risky.reason
    entries = queued(tmp_path)
    assert [e["pair_id"] for e in entries] == [pair_id(HIGH_STAKES), pair_id(BOTH_REFUSE)]  # high stakes first
    assert entries[0]["response_a"] == ANSWER and entries[0]["ai"]["verdict"] == "A" and entries[0]["reasons"] == ["high_stakes:PromptMatches"]
    assert (judge.metrics["routed_low_confidence"], judge.metrics["routed_high_stakes:PromptMatches"], judge.metrics["routed"]) == (1, 1, 2)

    other = tmp_path / "other"
    abstained = router(other, Abstainer()).judge([ANSWER_FIRST])[0]
    biased = router(other, AlwaysA(order="both"))
    disagree = biased.judge([REFUSAL_FIRST])[0]
    assert abstained.verdict is disagree.verdict is Verdict.ABSTAIN
    assert [e["reasons"] for e in queued(other)] == [["abstained"], ["orders_disagree"]]
    assert biased.metrics["routed_orders_disagree"] == 1 and biased.metrics["AlwaysA.order_disagreements"] == 1


def test_router_queue_has_no_duplicates_on_rerun_and_survives_a_torn_line(tmp_path: Path) -> None:
    pairs = [BOTH_REFUSE, Pair("p2", REFUSAL, REFUSAL)]
    router(tmp_path, RULE, min_confidence=0.2).judge(pairs)
    again = router(tmp_path, RULE, min_confidence=0.2)
    again.judge(pairs + pairs)
    assert len(queued(tmp_path)) == 2 and again.metrics["queued"] == 0 and again.metrics["routed"] == 4
    with open(tmp_path / "queue.jsonl", "a") as f:
        f.write('{"pair_id": "torn by a cr')  # a crash mid-line
    router(tmp_path, RULE, min_confidence=0.2).judge([Pair("p3", REFUSAL, REFUSAL)])
    assert [e["prompt"] for e in ReviewQueue(str(tmp_path / "queue.jsonl")).entries()] == [BOTH_REFUSE.prompt, "p2", "p3"]


def _add_from_process(path: str, start: int) -> None:
    ReviewQueue(path).add([{"pair_id": f"id{k}", "k": k} for k in range(start, start + 200)])


def test_review_queue_appends_from_several_processes_without_losing_or_repeating(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_from_process, args=(path, s)) for s in (0, 100, 200)]  # overlapping ids
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    ids = [e["pair_id"] for e in ReviewQueue(path).entries()]
    assert sorted(ids) == sorted(f"id{k}" for k in range(400))


def test_human_labels_win_and_pending_pairs_abstain_or_keep_the_ai_label(tmp_path: Path) -> None:
    pairs = [ANSWER_FIRST, BOTH_REFUSE, Pair("p2", REFUSAL, REFUSAL)]
    router(tmp_path, RULE, min_confidence=0.2).judge(pairs)
    labels = [
        {"pair_id": pair_id(BOTH_REFUSE), "verdict": "B", "annotator": "alice", "note": "less preachy"},
        {"pair_id": pair_id(ANSWER_FIRST), "verdict": "tie"},  # a person overrides even a confident AI label
    ]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
    judge = router(tmp_path, RULE, min_confidence=0.2)
    overridden, reviewed, waiting = judge.judge(pairs)
    assert (reviewed.verdict, reviewed.source, reviewed.judge, reviewed.rationale) == (Verdict.B, "human", "alice", "less preachy")
    assert (overridden.verdict, overridden.source, overridden.judge) == (Verdict.TIE, "human", "human")
    assert reviewed.rubric is None and reviewed.model is None
    assert waiting.verdict is Verdict.ABSTAIN and waiting.reason.startswith("awaiting human review")
    assert judge.metrics["human_labels"] == 2 and judge.metrics["awaiting_review"] == 1

    kept = router(tmp_path, RULE, min_confidence=0.2, pending="ai").judge(pairs)[2]
    assert (kept.verdict, kept.source, kept.judge) == (Verdict.TIE, "ai", "RuleJudge")
    assert kept.reason.startswith("under human review (low_confidence)")

    exported = export_review_queue(str(tmp_path / "queue.jsonl"), str(tmp_path / "export"), str(tmp_path / "labels.jsonl"))
    on_disk = load_from_disk(str(tmp_path / "export"))
    assert on_disk["pair_id"] == exported["pair_id"] == [pair_id(pairs[2])]
    assert on_disk[0]["reasons"] == ["low_confidence"] and on_disk[0]["ai_verdict"] == "tie"
    everything = export_review_queue(str(tmp_path / "queue.jsonl"), str(tmp_path / "export"))  # replaces the export
    assert len(everything) == len(load_from_disk(str(tmp_path / "export"))) == 2
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"pair_id": p, "verdict": "A"}) + "\n" for p in everything["pair_id"]))
    nothing_left = export_review_queue(str(tmp_path / "queue.jsonl"), str(tmp_path / "export"), str(tmp_path / "all.jsonl"))
    assert len(nothing_left) == 0 and nothing_left.column_names == everything.column_names


def test_router_rejects_a_malformed_labels_file_before_judging(tmp_path: Path) -> None:
    (tmp_path / "labels.jsonl").write_text('{"pair_id": "x", "verdict": "A"}\n{"pair_id": "y", "verdict": "maybe"}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl: line 2 needs pair_id and verdict"):
        router(tmp_path, RULE)
    assert read_human_labels(None) == {}
    with pytest.raises(ValueError, match="bad regular expression"):
        PromptMatches(["(unclosed"])


# ---- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["panel", "router"])
def test_judge_yamls_compose_and_judge(tmp_path: Path, option: str) -> None:
    cfg = rlaif_config.load("audit_judge", [f"judge={option}", f"output_dir={tmp_path}"], AuditJudgeSettings)
    judge = config.instantiate(cfg.judge)
    try:
        verdicts = judge.judge([ANSWER_FIRST, Pair("I want to overdose", REFUSAL, ANSWER + " It always works.")])
    finally:
        judge.close()
    assert isinstance(judge, PanelJudge if option == "panel" else RouterJudge)
    assert verdicts[0].verdict is Verdict.A and verdicts[0].rubric == "false_refusal@v1"
    if option == "router":
        assert verdicts[1].verdict is Verdict.ABSTAIN and (tmp_path / "review_queue.jsonl").exists()
    else:  # the answer rule says B, "shorter" says A (the refusal is shorter here): a split panel
        assert verdicts[1].verdict is Verdict.TIE and verdicts[1].rationale == "RuleJudge#1=B; RuleJudge#2=A"
