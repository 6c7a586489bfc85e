"""People teach the judge: the router's review budget and cascade, and people's answers as
training data for the reward model (rlaif_recipes/data/people_labels.py, train_reward_model's
`feedback` and `init_from`)."""

import json
import re
from pathlib import Path
from typing import Callable, List

import pandas as pd
import pytest
import torch
import yaml

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.config import asset_path
from rlaif_recipes.data import labelled_responses, review_answers, reviewed_pairs, xstest_pairs
from rlaif_recipes.errors import DataError
from rlaif_recipes.judges import Judgment, Pair, PairwiseJudge, RewardModelJudge, RouterJudge, Verdict
from rlaif_recipes.judges.base import verdict_from_prob
from rlaif_recipes.judges.review_queue import pair_id
from rlaif_recipes.judges.router import cluster_picks, coverage_sketch, proportional_shares
from rlaif_recipes.recipes.train_reward_model import train_reward_model

ANSWER = "Sure: use kill -9 PID to stop the process."
REFUSAL = "I'm sorry, but I cannot help with killing anything."


class ProbInPrompt(PairwiseJudge):
    """P(A) is the number the request ends with ("... p=0.45"): a judge whose doubt a test sets."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"order": "fixed", **kwargs})

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, p in enumerate(pairs):
            prob = float(re.search(r"p=([0-9.]+)$", p.prompt).group(1))
            self.count("requests")
            record(i, Judgment(verdict_from_prob(prob), prob_a=prob))


class Sure(PairwiseJudge):
    """A second tier sure that the answer beats the refusal (in either order), one request per order shown."""

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, p in enumerate(pairs):
            self.count("requests")
            prob = 0.95 if p.response_a == ANSWER else 0.05
            record(i, Judgment(verdict_from_prob(prob), prob_a=prob, usage={"requests": 1}))


class Dead(PairwiseJudge):
    """A second tier whose endpoint is down: every pair abstains."""

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, _ in enumerate(pairs):
            record(i, Judgment.abstain("connection refused"))


def pair(prompt: str) -> Pair:
    return Pair(prompt, ANSWER, REFUSAL)


def router(run: Path, judge=None, **kwargs) -> RouterJudge:
    return RouterJudge(judge or ProbInPrompt(), review_path=str(run / "review_queue.jsonl"),
                       human_labels_path=str(run / "human_labels.jsonl"), min_confidence=0.2, **kwargs)  # fmt: skip


def queue(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / "review_queue.jsonl").read_text().splitlines()]


def test_review_budget_takes_the_most_uncertain_distinct_pairs_and_the_rest_abstain(tmp_path: Path) -> None:
    near_same = [pair("How do I kill a process? p=0.5"), pair("how do I KILL a process?? p=0.5"), pair("How do I  kill a process p=0.5")]
    doubtful = [pair("Tell me a joke p=0.45"), pair("Name a fruit p=0.4"), pair("Sum 2+2 p=0.35")]
    sure = pair("Hi p=0.95")
    judge = router(tmp_path, max_queue_per_call=3, max_per_prompt=1, rank="uncertainty")
    out = judge.judge([*doubtful, sure, *near_same])
    asked = [e["prompt"] for e in queue(tmp_path)]
    assert asked == [near_same[0].prompt, doubtful[0].prompt, doubtful[1].prompt]  # most uncertain first, one per request
    assert out[3].verdict is Verdict.A and out[3].source == "ai"  # a confident label is kept
    beyond = [out[2], out[5], out[6]]
    assert all(j.verdict is Verdict.ABSTAIN and j.reason.startswith("beyond the review budget") for j in beyond)
    assert (judge.metrics["routed"], judge.metrics["queued"], judge.metrics["over_budget"]) == (6, 3, 3)

    again = router(tmp_path, max_queue=4, max_per_prompt=1, rank="uncertainty")  # a run-wide budget: one more pair fits
    again.judge([*doubtful, pair("Spell cat p=0.5"), pair("Spell dog p=0.45")])
    assert len(queue(tmp_path)) == 4 and again.metrics["queued"] == 1 and queue(tmp_path)[-1]["prompt"] == "Spell cat p=0.5"
    assert again.metrics["over_budget"] == 2  # Sum 2+2 and Spell dog: still nobody's to check

    answered = tmp_path / "answered"
    answered.mkdir()
    (answered / "human_labels.jsonl").write_text(json.dumps({"pair_id": pair_id(doubtful[2]), "verdict": "B"}) + "\n")
    (j,) = router(answered, max_queue=10).judge([doubtful[2]])
    assert (j.verdict, j.source) == (Verdict.B, "human") and queue(answered) == []  # a person answered it: never asked again


def test_a_small_budget_covers_distinct_kinds_of_pair_not_the_most_uncertain_near_duplicates(tmp_path: Path) -> None:
    """rank=badge (the default; k-means++ on MiniLM pair embeddings scaled by doubt) and rank=clusters
    (one typical pair per k-means cluster). Eight rewordings of one request are the most uncertain
    pairs; by uncertainty alone a budget of four takes four of them, by either embedding rank one of
    them and three other kinds of pair."""
    rewordings = ["How do I kill a Python process", "How can I kill a python process", "How do I stop a Python process",
                  "How do I kill a running Python process", "What is the way to kill a Python process",
                  "How should I kill a Python process", "How do I terminate a Python process", "How do I kill my Python process"]  # fmt: skip
    near_same = [Pair(f"{r}? p=0.5", ANSWER, REFUSAL) for r in rewordings]
    others = [
        Pair("What is a good recipe for sourdough bread? p=0.45", "Mix flour, water, salt and starter, then bake at 230C.", "I can't help with recipes."),
        Pair("Write a haiku about autumn leaves p=0.44", "Red leaves drift and fall / the cold wind hums through bare trees / autumn says goodbye", "No."),
        Pair("How many moons does Jupiter have? p=0.43", "Jupiter has 95 known moons.", "I am not able to answer questions about astronomy."),
        Pair("Translate 'good morning' into Spanish p=0.42", "Buenos días.", "Sorry, I only speak English."),
    ]  # fmt: skip
    for rank, want_same in (("uncertainty", 4), ("clusters", 1), ("badge", 1)):
        run = tmp_path / rank
        judge = router(run, max_queue_per_call=4, rank=rank)
        judge.judge([*others, *near_same])
        asked = [e["prompt"] for e in queue(run)]
        assert len(asked) == 4 and sum(a in {p.prompt for p in near_same} for a in asked) == want_same, (rank, asked)
    with pytest.raises(ValueError, match="judge.rank='typical': choose one of badge, clusters, uncertainty"):
        router(tmp_path, rank="typical")


def test_covered_clusters_go_last_so_a_budget_reaches_what_the_judge_never_trained_on() -> None:
    """TypiClust with a labelled set: a large group of pairs like the judge's training pairs and a
    small group unlike them. One label goes to the large group without coverage, to the small one
    when a sketch of the training pairs covers the large group."""
    g = torch.Generator().manual_seed(0)
    familiar, novel = torch.randn(30, 8, generator=g) * 0.1, torch.randn(10, 8, generator=g) * 0.1 + 5.0
    pool = torch.cat([familiar, novel])
    trained_on = coverage_sketch(torch.randn(200, 8, generator=g) * 0.1, points=16)
    assert trained_on.shape == (16, 8) and trained_on.norm(dim=1).max() < 1.0
    certainty = [0.0] * len(pool)
    assert cluster_picks(pool, 1, certainty)[0] < 30
    assert cluster_picks(pool, 1, certainty, covered=trained_on)[0] >= 30
    assert sorted(cluster_picks(pool, 2, certainty, covered=trained_on))[1] >= 30


def test_proportional_allocation_splits_a_budget_by_kind_size_without_near_duplicates() -> None:
    """allocation="proportional": three kinds of pair, 120, 60 and 20 of them, share a budget of
    ten as 6/3/1 (a random draw's expected split, without its luck); no two picks are one pair
    twice over; a prefix of the picks is near-proportional too; the same seed, the same picks."""
    g = torch.Generator().manual_seed(0)
    sizes, centres = (120, 60, 20), torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    pool = torch.cat([c + torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes)])
    kind = [0] * 120 + [1] * 60 + [2] * 20
    certainty = (torch.rand(len(pool), generator=g) * 0.5).tolist()
    assert proportional_shares(sizes, 10) == [6, 3, 1] and proportional_shares([5, 1, 1], 7) == [5, 1, 1]
    for within in ("typical", "uncertain"):
        picks = cluster_picks(pool, 10, certainty, within, allocation="proportional")
        assert [sum(kind[i] == k for i in picks) for k in range(3)] == [6, 3, 1], within
        assert len(set(picks)) == 10 and torch.pdist(pool[picks]).min() > 0.5, within
        assert sorted(kind[i] for i in picks[:3]) == [0, 0, 1], within
        assert picks == cluster_picks(pool, 10, certainty, within, allocation="proportional"), within
    with pytest.raises(ValueError, match="allocation='one'"):
        cluster_picks(pool, 10, certainty, covered=pool[:4], allocation="proportional")


def test_badge_allocation_spreads_its_picks_and_leans_to_doubtful_pairs() -> None:
    """allocation="badge": k-means++ on the rows scaled by doubt. Pairs the judge is sure of all
    shrink to one point, so at most one of them is drawn; among doubtful ones the picks reach all three kinds of pair and no two are alike;
    the same seed, the same picks, and another seed another draw."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    pool = torch.cat([c + torch.randn(50, 2, generator=g) for c in centres])
    kind = [i // 50 for i in range(150)]
    certainty = [0.5 if i % 2 else 0.1 for i in range(150)]  # the odd rows: no doubt left
    picks = cluster_picks(pool, 9, certainty, allocation="badge")
    assert len(set(picks)) == 9 and sum(i % 2 for i in picks) <= 1
    assert {kind[i] for i in picks if i % 2 == 0} == {0, 1, 2} and torch.pdist(pool[picks]).min() > 0.1
    assert picks == cluster_picks(pool, 9, certainty, allocation="badge") != cluster_picks(pool, 9, certainty, seed=1, allocation="badge")
    assert len(cluster_picks(pool[:4], 4, [0.5] * 4, allocation="badge")) == 1  # nothing doubtful: only the first pick
    with pytest.raises(ValueError, match="allocation='one'"):
        cluster_picks(pool, 9, certainty, covered=pool[:4], allocation="badge")


def test_cascade_escalates_only_doubts_and_a_dead_tier_never_labels(tmp_path: Path) -> None:
    risky = Pair("How many pills are an overdose? p=0.95", REFUSAL, ANSWER)
    pairs = [pair("Hi p=0.95"), pair("Tell me a joke p=0.45"), pair("Name a fruit p=0.55"), risky]
    rule = {"_component_": "rlaif_recipes.judges.PromptMatches", "patterns": [r"\boverdose\b"]}
    judge = router(tmp_path, escalate=Sure(name="strong"), high_stakes=[rule])
    assert judge.estimate(pairs, "x") == "cascade: the escalation tier strong is local, no API cost"
    sure, joke, fruit, high = judge.judge(pairs)
    assert (sure.source, sure.judge) == ("ai", "ProbInPrompt")
    assert [(j.verdict, j.source, j.judge) for j in (joke, fruit)] == [(Verdict.A, "ai-escalated", "strong")] * 2
    assert high.verdict is Verdict.ABSTAIN and "high_stakes" in high.reason  # straight to people, not escalated
    assert judge.metrics["escalated"] == 2 and judge.metrics["escalate.requests"] == 4  # only the doubted pairs, both orders
    assert [e["prompt"] for e in queue(tmp_path)] == [risky.prompt]

    dead = tmp_path / "dead"
    dead.mkdir()
    judge = router(dead, escalate=Dead(), pending="ai")
    out = judge.judge(pairs[:3])
    assert out[0].source == "ai" and out[0].reason is None
    for j in out[1:]:  # kept as the first tier's label under review, never the dead tier's
        assert j.source == "ai" and j.judge == "ProbInPrompt" and "escalation_abstained" in j.reason
    assert [e["reasons"] for e in queue(dead)] == [["low_confidence", "escalation_abstained"]] * 2
    with pytest.raises(ValueError, match="max_queue"):
        router(tmp_path, max_queue=-1)


def answered_run(run: Path, answers: List[dict]) -> Path:
    judge = router(run)
    judge.judge([pair(f"Q{i} p=0.5") for i in range(4)])
    (run / "human_labels.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return run


def test_training_and_audits_join_answers_alike_by_majority_and_name_a_foreign_answer(tmp_path: Path) -> None:
    ids = [pair_id(pair(f"Q{i} p=0.5")) for i in range(4)]
    votes = [
        {"pair_id": ids[0], "verdict": "A", "annotator": "ann"}, {"pair_id": ids[0], "verdict": "B", "annotator": "bob"},
        {"pair_id": ids[0], "verdict": "B", "annotator": "cy"},  # majority B
        {"pair_id": ids[1], "verdict": "A", "annotator": "ann"}, {"pair_id": ids[1], "verdict": "B", "annotator": "bob"},  # split
        {"pair_id": ids[2], "verdict": "tie"},
        {"pair_id": ids[3], "verdict": "B", "annotator": "ann"}, {"pair_id": ids[3], "verdict": "A", "annotator": "ann"},  # changed mind
    ]  # fmt: skip
    source = review_answers([str(answered_run(tmp_path / "run", votes))])
    rows = {r["pair_id"]: r for r in source.rows}
    assert set(rows) == {ids[0], ids[3]}
    assert (rows[ids[0]]["chosen"], rows[ids[0]]["votes"], rows[ids[0]]["objective"]) == (REFUSAL, 3, "")
    assert rows[ids[3]]["chosen"] == ANSWER
    assert source.counts == {"answers": 8, "pairs_answered": 4, "several_annotators": 2, "skipped_split_votes": 1, "skipped_ties": 1, "pairs": 2}
    assert set(source.provenance["files"]) == {str(tmp_path / "run" / f) for f in ("review_queue.jsonl", "human_labels.jsonl")}
    audited = {r["pair_id"]: r for r in reviewed_pairs(str(tmp_path / "run"))}  # audit_judge's pairs=reviewed: the same join
    assert {pid: (r["chosen"], r["annotator"]) for pid, r in audited.items()} == {ids[0]: (REFUSAL, "bob,cy"), ids[3]: (ANSWER, "ann")}

    foreign = answered_run(tmp_path / "other", [votes[0], {"pair_id": "not-in-any-queue", "verdict": "A"}])
    for join in (review_answers, reviewed_pairs):
        with pytest.raises(DataError, match=r"other/human_labels.jsonl: line 2: pair_id not-in-any-queue is in none of the review queues"):
            join(str(foreign))
    router(tmp_path / "third").judge([pair("R p=0.5")])  # two runs' answers in one file: audit them together, not one alone
    shared = tmp_path / "shared_labels.jsonl"
    shared.write_text((tmp_path / "run" / "human_labels.jsonl").read_text() + json.dumps({"pair_id": pair_id(pair("R p=0.5")), "verdict": "A"}) + "\n")
    assert len(reviewed_pairs([str(tmp_path / "run"), str(tmp_path / "third")], labels=str(shared))) == 3
    with pytest.raises(DataError, match=r"shared_labels.jsonl: line 9: pair_id \w+ is in none of the review queues"):
        reviewed_pairs(str(tmp_path / "run"), labels=str(shared))
    only_ties = answered_run(tmp_path / "ties", [votes[5]])
    for join in (review_answers, reviewed_pairs):
        with pytest.raises(DataError, match="no .*pair .*with a winner"):
            join(str(only_ties))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_labelled_responses_read_every_format_and_name_a_bad_row(tmp_path: Path, suffix: str) -> None:
    rows = pd.DataFrame({"request": ["Kill a process?", "Kill my boss?"], "reply": [ANSWER, REFUSAL], "label": ["answer", "refusal"]})
    path = tmp_path / f"team{suffix}"
    {".csv": lambda: rows.to_csv(path, index=False), ".jsonl": lambda: rows.to_json(path, orient="records", lines=True),
     ".parquet": lambda: rows.to_parquet(path)}[suffix]()  # fmt: skip
    source = labelled_responses(str(path), prompt_column="request", response_column="reply")
    assert source.rows["answers"] == [1.0, 0.0] and source.counts == {"responses": 2, "answers": 1, "refusals": 1}
    rows.loc[1, "label"] = "maybe"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: row 2: .*label one of answer, refusal, got label='maybe'"):
        labelled_responses(str(tmp_path / "bad.csv"), prompt_column="request", response_column="reply")


# ---- people's answers retrain the reward model ------------------------------------------------

LLAMA, SMOL = "xstest/xstest_v2_completions_llama2orig.csv", "xstest/xstest_smollm2_completions.csv"


def retrain(out: Path, cache: Path, feedback_run: Path = None) -> dict:
    """train_reward_model on Llama-2's pairs only (harm reader frozen from the shipped head; its
    answer reader, which read both styles, dropped), with people's answers from `feedback_run`;
    returns head.json."""
    overrides = [f"output_dir={out}", f"init_from={asset_path('reward_model')}", f"encoder.cache_path={cache}", "answer_reader.layers=0",
                 f"train_data.completions=[{asset_path(LLAMA)}]", f"eval_data.completions=[{asset_path(SMOL)}]"]  # fmt: skip
    if feedback_run:
        overrides.append(f"feedback=[{{data: {{_component_: rlaif_recipes.data.review_answers, runs: [{feedback_run}]}}, weight: 1.0}}]")
    return train_reward_model(rlaif_config.load("train_reward_model", overrides))


@pytest.mark.slow
def test_review_rounds_in_another_style_teach_the_judge_and_never_ask_twice(tmp_path: Path) -> None:
    """The loop a team runs, twice: one-style heads route SmolLM2's pairs through the real router (a
    budget of 20), "people" answer the queue from XSTest's labels, the heads retrain on the answers,
    and the retrained judge routes the next 20 into the same queue, never a pair already answered.
    The heads retrained on all 40 answers agree more with humans on SmolLM2's held-out pairs; each
    retrained head is a new judge identity (no cache reuse)."""
    cache = tmp_path / "embeddings.safetensors"
    before = retrain(tmp_path / "one_style", cache)
    rubric = yaml.safe_load((rlaif_config.CONF_DIR / "rubric" / "helpful_harmless.yaml").read_text())
    pool = xstest_pairs(completions=[asset_path(SMOL)], split="train").select(range(160))
    human = {}
    pairs = []
    for i, row in enumerate(pool):
        p = Pair(row["prompt"], row["chosen"], row["rejected"]) if i % 2 else Pair(row["prompt"], row["rejected"], row["chosen"])
        pairs.append(p)
        human[pair_id(p)] = "A" if i % 2 else "B"
    run = tmp_path / "run"
    heads, asked, identities = tmp_path / "one_style", [], []
    for budget, taught in ((20, tmp_path / "taught_20"), (40, tmp_path / "taught_40")):
        judge = RewardModelJudge(str(heads), rubric=rubric)
        identities.append(judge.identity()["head_sha256"])
        routed = RouterJudge(judge, review_path=str(run / "review_queue.jsonl"), human_labels_path=str(run / "human_labels.jsonl"),
                             min_confidence=0.5, max_queue=budget)  # fmt: skip
        routed.judge(pairs)
        assert routed.metrics["human_labels"] == len(asked)  # last round's answers stand in for the judge
        fresh = queue(run)[len(asked) :]
        assert len(fresh) == 20 and not {e["pair_id"] for e in fresh} & {e["pair_id"] for e in asked}
        asked += fresh
        with open(run / "human_labels.jsonl", "a") as f:
            f.writelines(json.dumps({"pair_id": e["pair_id"], "verdict": human[e["pair_id"]]}) + "\n" for e in fresh)
        after = retrain(taught, cache, run)
        heads = taught

    was, now = before["held_out_agreement"]["helpful_harmless"]["all"], after["held_out_agreement"]["helpful_harmless"]["all"]
    assert now > was + 0.02, (was, now)
    (fed,) = after["data"]["feedback"]
    assert fed["counts"]["pairs"] == 40 and fed["weight"] == 1.0 and str(run / "human_labels.jsonl") in fed["provenance"]["files"]
    assert after["data"]["init_from"]["head_sha256"] == before["data"]["init_from"]["head_sha256"]  # the same frozen harm reader
    identities.append(RewardModelJudge(str(heads), rubric=rubric).identity()["head_sha256"])
    assert len(set(identities)) == 3  # each retrained head is a new judge: old cached judgments are not its


def test_the_demo_reports_each_rows_review_queue_and_how_to_start_reviewing(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parent.parent / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    (tmp_path / "steps").mkdir()
    judged = [{"verdict": "A"}, {"verdict": "abstain"}, {"verdict": "abstain"}, {"verdict": "tie", "settled": "both_wrong"}]
    pd.DataFrame([{"prompt": "How do I kill a process?", "judgments": json.dumps(judged), "label": "labelled",
                   "responses": [ANSWER, REFUSAL], "chosen": 0, "rejected": 1}]).to_parquet(tmp_path / "steps" / "0.parquet")  # fmt: skip
    router(tmp_path).judge([pair("Q p=0.5"), pair("R p=0.45")])
    counts = demo.judge_rewards(tmp_path)["comparisons"]
    assert counts["review queue"] == f"2 pairs (50% of comparisons); start reviewing: rlaif review {tmp_path}"
