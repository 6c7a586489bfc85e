"""`judge=router`: an AI judge labels every pair; the doubtful and the high-stakes ones go to people.

A pair is routed to the human-review queue when the AI judgment is
    low_confidence   |P(A) - 0.5| < min_confidence (ties included, except a judge's settled ties: two
                     replies alike by the rubric; skipped if the judge gives no P(A)),
    orders_disagree  the two orders of an order=both judge picked different winners,
    abstained        the judge gave no verdict,
    high_stakes      a rule says so (e.g. `PromptMatches` on the request).
The queue is a JSONL file (`review_queue.py`), one line per pair, keyed by a stable `pair_id` (hash
of the prompt and both responses, in order), with the texts, the AI judgment and the reasons; re-runs
never add a pair twice. `export_review_queue` turns it into an HF dataset for a labelling tool.

People answer in `human_labels_path` (JSONL: pair_id, verdict A/B/tie, optional annotator and note;
A and B as in the queue entry). A human label wins over the AI label for that pair: source="human",
judge=annotator. A routed pair still waiting abstains ("awaiting human review"), or with
`pending: ai` keeps the AI label and says in `reason` that it is under review.

What people see is budgeted: `max_queue` (pairs in the queue file, over the whole run) and
`max_queue_per_call` (per `judge` call: one online step, one judge_pairs shard). Within them the
routed pairs that would teach the judge most go first (`rank_for_review`): high-stakes ones, then
(`rank: badge`) k-means++ seeding on the pairs' sentence embeddings scaled by the judge's doubt
(BADGE, Ash et al. 2020): picks spread over the kinds of pair like a random draw, leaning to the
doubtful ones, never two alike (bench/RESULTS.md, "BADGE": ahead of the other rankings at 25 and
50 labels, 1-2 sd behind a random draw at 100 and 200); or (`rank: clusters`) one pair from each of as many
k-means clusters as the budget has room for, the most typical of its cluster (TypiClust); or
(`rank: uncertainty`, and beyond the budget) by uncertainty (P(A) nearest
0.5; an abstain or an order disagreement counts as fully uncertain); and at most `max_per_prompt`
pairs of one request (spaces and case aside) in the queue, so not fifty near-identical pairs. A
routed pair beyond the budget is not queued and abstains ("beyond the review budget"), whatever
`pending` says: nobody will check it, and the AI was unsure of it, so the policy does not train
on it. A pair a person answered is never queued again. `metrics` count `routed`, `queued` and
`over_budget`.

Escalation (`escalate`, a cascade): another AI judge (e.g. an `openai` judge) is asked first about
the pairs the first judge doubts (not the high-stakes ones: those go to people). Where it is sure
(no reason of its own, by `escalate_min_confidence`) its verdict is the label, with
source="ai-escalated" and its own judge name; where it doubts or abstains (a dead endpoint, an
exhausted budget) the pair goes on to people as above, never labelled. Each tier keeps its own
cache (its own `cache_path`), and its requests, tokens and cost are only those of escalated
pairs (`metrics[escalate.requests]`, `escalated`, `escalation_labels`).

The router caches nothing itself: the inner judge caches its calls, and a cached router verdict
would hide human labels that arrive later.
"""

import math
import re
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import ConfigError
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict
from rlaif_recipes.judges.composite import ask_member, build_judge
from rlaif_recipes.judges.review_queue import (
    HUMAN_VERDICTS,
    ReviewQueue,
    pair_id,
    prompt_key,
    read_human_labels,
)

PENDING = ("abstain", "ai")
AWAITING = "awaiting human review"


class PromptMatches:
    """High-stakes rule: the request matches any of these regular expressions (case-insensitive)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        if not patterns:
            raise ConfigError("PromptMatches needs at least one pattern (patterns=[...])")
        try:
            self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"PromptMatches: bad regular expression in {list(patterns)}: {e}") from None

    def __call__(self, pair: Pair) -> bool:
        return self.pattern.search(pair.prompt) is not None


class RouterJudge(PairwiseJudge):
    delegates_order = True  # the inner judge handles the order; the router sees each pair once
    RUNTIME_SETTINGS = PairwiseJudge.RUNTIME_SETTINGS + ("review_path",)

    def __init__(
        self,
        judge: Union[PairwiseJudge, Mapping[str, Any]],
        review_path: str,
        human_labels_path: Optional[str] = None,
        min_confidence: float = 0.0,
        high_stakes: Sequence[Union[str, Mapping[str, Any], Callable[[Pair], bool]]] = (),
        pending: str = "abstain",
        max_queue: Optional[int] = None,
        max_queue_per_call: Optional[int] = None,
        max_per_prompt: Optional[int] = None,
        rank: str = "badge",
        escalate: Optional[Union[PairwiseJudge, Mapping[str, Any]]] = None,
        escalate_min_confidence: float = 0.0,
        name: Optional[str] = None,
    ) -> None:
        if pending not in PENDING:
            raise ConfigError(f"judge.pending={pending!r}: choose one of {', '.join(PENDING)}")
        if rank not in RANKS:
            raise ConfigError(f"judge.rank={rank!r}: choose one of {', '.join(RANKS)}")
        if not 0 <= min_confidence <= 0.5:
            raise ConfigError(f"judge.min_confidence={min_confidence}: must be in [0, 0.5] (a margin around P(A)=0.5)")
        for key, value in (("max_queue", max_queue), ("max_queue_per_call", max_queue_per_call), ("max_per_prompt", max_per_prompt)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"judge.{key}={value!r}: a whole number >= 0 (0: nothing goes to people), or null for no limit")
        if not 0 <= escalate_min_confidence <= 0.5:
            raise ConfigError(f"judge.escalate_min_confidence={escalate_min_confidence}: must be in [0, 0.5] (a margin around P(A)=0.5)")
        self.inner = build_judge(judge, "judge.judge")
        self.escalate = build_judge(escalate, "judge.escalate") if escalate is not None else None
        self.escalate_min_confidence = escalate_min_confidence
        self.max_queue, self.max_queue_per_call, self.max_per_prompt = max_queue, max_queue_per_call, max_per_prompt
        self.rank = rank
        self._encoder: Any = None
        super().__init__(rubric=self.inner.rubric, order="fixed", name=name)
        self.rules = [rlaif_config.build(r, f"judge.high_stakes[{i}]") for i, r in enumerate(high_stakes)]
        for spec, rule in zip(high_stakes, self.rules):
            if not callable(rule):
                raise ConfigError(f"judge.high_stakes: {spec!r} is not callable; give a dotted path or {{_component_: ...}} of a rule(pair) -> bool")
        self.min_confidence = min_confidence
        self.pending = pending
        self.queue = ReviewQueue(review_path)
        self.human_labels_path = human_labels_path
        read_human_labels(human_labels_path)  # a malformed file fails now, before any judging

    @property
    def model(self) -> Optional[str]:
        return None  # AI judgments carry the inner judge's model; human ones have none

    def identity(self) -> Dict[str, Any]:
        """The inner judge as built (its identity pins down its weights; a config does not)."""
        return {**super().identity(), "judge": self.inner.identity(), "escalate": self.escalate and self.escalate.identity()}

    def close(self) -> None:
        self.inner.close()
        if self.escalate is not None:
            self.escalate.close()

    def estimate(self, pairs: Sequence[Pair], what: str) -> Optional[str]:
        """The escalation tier's cost if every pair were escalated: only the first tier's doubtful
        pairs are, so this is the most it can cost. None without a cascade."""
        if self.escalate is None:
            return None
        if not hasattr(self.escalate, "estimate"):
            return f"cascade: the escalation tier {self.escalate.name} is local, no API cost"
        return "cascade: at most " + self.escalate.estimate(pairs, f"{what}, if the first tier doubted every pair")

    def reasons(self, pair: Pair, judgment: Judgment, min_confidence: Optional[float] = None) -> List[str]:
        """Why this AI judgment needs a person (empty: it does not)."""
        margin = self.min_confidence if min_confidence is None else min_confidence
        found = []
        if judgment.verdict is Verdict.ABSTAIN:
            found.append("abstained")
        elif judgment.settled is None and judgment.prob_a is not None and abs(judgment.prob_a - 0.5) < margin:
            found.append("low_confidence")
        if judgment.orders_agree is False:
            found.append("orders_disagree")
        found += [f"high_stakes:{_rule_name(r)}" for r in self.rules if r(pair)]
        return found

    def _escalated(self, pairs: List[Pair], ai: List[Judgment], why: List[List[str]]) -> None:
        """Ask the second tier about the pairs the first one doubts (not the high-stakes-only ones);
        where it is sure, its verdict replaces the first tier's and the pair needs no person."""
        doubted = [i for i, w in enumerate(why) if any(not r.startswith("high_stakes:") for r in w)]
        if self.escalate is None or not doubted:
            return
        self.count("escalated", len(doubted))
        second = ask_member(self, "escalate", self.escalate, [pairs[i] for i in doubted])
        for i, judgment in zip(doubted, second):
            high_stakes = [r for r in why[i] if r.startswith("high_stakes:")]
            doubts = [r for r in self.reasons(pairs[i], judgment, self.escalate_min_confidence) if not r.startswith("high_stakes:")]
            if doubts:  # still unsure, or dead: people decide, with both tiers' doubts on record
                why[i] = [*why[i], *(f"escalation_{r}" for r in doubts)]
                continue
            judgment.source = "ai-escalated"
            ai[i] = judgment
            why[i] = high_stakes
            self.count("escalation_labels", 1)

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        ai = ask_member(self, self.inner.name, self.inner, pairs)
        self.stopped = self.inner.stopped
        humans = read_human_labels(self.human_labels_path)
        ids = [pair_id(p) for p in pairs]
        why = [[] if pid in humans else self.reasons(p, j) for p, j, pid in zip(pairs, ai, ids)]
        self._escalated(pairs, ai, why)
        candidates = [
            {"pair_id": ids[i], **vars(pairs[i]), "reasons": why[i], "ai": ai[i].to_dict()} for i in range(len(pairs)) if why[i]
        ]
        for c in candidates:
            for r in c["reasons"]:
                self.count(f"routed_{r}", 1)
        self.count("routed", len(candidates))
        in_queue = self.queue.add(self._ranked(candidates), self.max_queue, self.max_queue_per_call, self.max_per_prompt)
        self.count("queued", in_queue.added)
        for i, (pid, judgment) in enumerate(zip(ids, ai)):
            if pid in humans:
                self.count("human_labels", 1)
                judgment = self._human(humans[pid], judgment)
            elif why[i] and pid not in in_queue.ids:
                self.count("over_budget", 1)
                judgment = Judgment.abstain(f"beyond the review budget ({', '.join(why[i])}): not queued, not trained on",
                                            usage=judgment.usage, rubric=judgment.rubric)  # fmt: skip
            elif why[i] and self.pending == "abstain":
                self.count("awaiting_review", 1)
                judgment = Judgment.abstain(f"{AWAITING} ({', '.join(why[i])})", usage=judgment.usage, rubric=judgment.rubric)
            elif why[i]:
                judgment.reason = f"under human review ({', '.join(why[i])})" + (f"; {judgment.reason}" if judgment.reason else "")
            record(i, judgment)

    def _ranked(self, candidates: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The candidates in the order the queue takes them: those already queued (they wait on
        people and cost no budget), then the rest by `rank_for_review` with the room left."""
        if self.max_queue is None and self.max_queue_per_call is None:
            return rank_for_review(candidates)
        queued = {e["pair_id"] for e in self.queue.entries()}
        room = [] if self.max_queue is None else [self.max_queue - len(queued)]
        room += [] if self.max_queue_per_call is None else [self.max_queue_per_call]
        fresh = [c for c in candidates if c["pair_id"] not in queued]
        allocation = ALLOCATION_OF_RANK.get(self.rank)
        ranked = rank_for_review(fresh, max(0, min(room)), self._embed if allocation else None, allocation=allocation or "one")
        return [c for c in candidates if c["pair_id"] in queued] + ranked

    def _embed(self, candidates: List[Dict[str, Any]]) -> torch.Tensor:
        """The candidates' pair vectors, from the inner judge's sentence encoder where it has one
        (the reward model's: it has just read these replies), else from the packaged one, loaded
        once, the first time a budget has to choose."""
        if self._encoder is None:
            from rlaif_recipes.judges.reward_model import SentenceEncoder

            inner = getattr(self.inner, "encoder", None)
            self._encoder = inner if isinstance(inner, SentenceEncoder) else SentenceEncoder()
        return pair_embeddings(self._encoder, candidates)

    def _human(self, label: Mapping[str, Any], ai: Judgment) -> Judgment:
        verdict = HUMAN_VERDICTS[label["verdict"]]
        return Judgment(
            verdict,
            prob_a={Verdict.A: 1.0, Verdict.B: 0.0, Verdict.TIE: 0.5}[verdict],
            rationale=label.get("note"),
            source="human",
            judge=label.get("annotator") or "human",
            rubric=ai.rubric,
            usage=ai.usage,
        )


RANKS = ("badge", "clusters", "uncertainty")
ALLOCATION_OF_RANK = {"badge": "badge", "clusters": "one"}  # the ranks that choose from pair embeddings


def rank_for_review(
    candidates: List[Dict[str, Any]],
    budget: Optional[int] = None,
    embed: Optional[Callable[[List[Dict[str, Any]]], torch.Tensor]] = None,
    within: str = "typical",
    seed: int = 0,
    covered: Optional[torch.Tensor] = None,
    allocation: str = "one",
) -> List[Dict[str, Any]]:
    """Routed pairs, those a person's answer would teach the judge most first. High-stakes ones
    always lead. Given a `budget` smaller than the rest and `embed` (pair -> vector), the rest go
    in as `cluster_picks` of their embeddings: with `allocation="one"`, one pick from each of
    `budget` k-means clusters, largest cluster first (TypiClust, Hacohen et al. 2022: on a small
    budget, labels that cover what the judge will meet teach more than its oddest pairs); with
    `"proportional"`, the budget shared over ceil(sqrt(budget)) k-means strata in proportion to
    their sizes (a random draw's match to the pool, without its luck), each stratum's share one
    pick per k-means sub-cluster of it; with `"badge"`, k-means++ seeding on the embeddings scaled
    by doubt (`_badge_picks`), no clusters. The pick is the cluster's most typical pair
    (`within="typical"`) or its most uncertain (`"uncertain"`); after them, and without a budget, the most
    uncertain first (P(A) nearest 0.5; abstains and order disagreements count as 0.5), and among
    equals the request seen fewest times so far in this list. `seed`: k-means's. `covered`
    ([m, d], `coverage_sketch` of the judge's training pairs; `allocation="one"` only): clusters
    it already covers go last (TypiClust with a labelled set)."""
    seen: Counter = Counter()
    ranked = sorted(candidates, key=lambda c: (not _high_stakes(c), _certainty(c["ai"])))
    order = []
    for c in ranked:
        key = prompt_key(c["prompt"])
        order.append((seen[key], len(order), c))
        seen[key] += 1
    ranked = [c for _, _, c in sorted(order, key=lambda t: (t[0], t[1]))]
    high, rest = [c for c in ranked if _high_stakes(c)], [c for c in ranked if not _high_stakes(c)]
    k = None if budget is None else budget - len(high)
    if embed is None or k is None or k <= 0 or len(rest) <= k:
        return ranked
    picks = cluster_picks(
        embed(rest), k, [_certainty(c["ai"]) for c in rest], within, seed=seed, covered=covered, allocation=allocation
    )
    taken = set(picks)
    return high + [rest[i] for i in picks] + [c for i, c in enumerate(rest) if i not in taken]


WITHIN = ("typical", "uncertain")
ALLOCATIONS = ("one", "proportional", "badge")


def cluster_picks(
    x: torch.Tensor,
    k: int,
    certainty: Sequence[float],
    within: str = "typical",
    neighbours: int = 20,
    seed: int = 0,
    covered: Optional[torch.Tensor] = None,
    allocation: str = "one",
) -> List[int]:
    """k row indices of `x` ([n, d]), each the pick of one k-means cluster: its most typical row
    (the inverse mean distance to its `neighbours` nearest rows of the cluster is highest) or, with
    within="uncertain", its least certain (ties: the more typical). allocation="one": k clusters, one pick
    each, largest cluster first; with `covered` ([m, d]: points standing for labelled data),
    k-means runs on both into m + k clusters, and the clusters holding fewest covered points come
    first (TypiClust's rule: label what the labelled data does not reach), then the largest.
    allocation="proportional": ceil(sqrt(k)) k-means strata share k by size (largest remainders,
    `proportional_shares`), a stratum's share a picks from its a k-means sub-clusters, largest
    first; the strata interleave so that any prefix of the picks is near-proportional too.
    allocation="badge": no clusters; k-means++ seeding on the rows scaled by doubt (`_badge_picks`).
    k-means (and k-means++) is seeded: the same rows give the same picks."""
    if within not in WITHIN:
        raise ValueError(f"within={within!r}: one of {', '.join(WITHIN)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r}: one of {', '.join(ALLOCATIONS)}")
    if covered is not None and allocation != "one":
        raise ValueError("covered= is for allocation='one' (TypiClust with a labelled set)")
    if allocation == "proportional":
        return _stratified_picks(x, k, certainty, within, neighbours, seed)
    if allocation == "badge":
        return _badge_picks(x, k, certainty, seed)
    m = 0 if covered is None else len(covered)
    labels = kmeans(torch.cat([x, covered]) if m else x, k + m, seed=seed)
    labels, covering = labels[: len(x)], Counter(labels[len(x) :].tolist())
    clusters = sorted(set(labels.tolist()), key=lambda c: (covering[c], -(labels == c).sum().item(), c))[:k]
    return [_cluster_pick(x, (labels == c).nonzero().squeeze(1), certainty, within, neighbours) for c in clusters]


def _badge_picks(x: torch.Tensor, k: int, certainty: Sequence[float], seed: int) -> List[int]:
    """`cluster_picks(allocation="badge")`: k-means++ seeding on each row scaled by the judge's doubt
    (0.5 - certainty), BADGE's gradient embedding for a logistic judge (Ash et al. 2020): the first
    pick is the most doubtful far-out pair, each next one drawn with probability rising with its
    squared distance to the picks so far. Spread like a random draw, leaning to doubtful pairs,
    never two alike. Rows with no doubt left all shrink to one point, so at most one of them is
    drawn; once every row sits at distance 0 from a pick, the picks stop short of k."""
    g = x * (0.5 - torch.tensor(certainty, dtype=x.dtype)).clamp(min=0).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed)
    picks = [int(g.norm(dim=1).argmax())]
    distance = ((g - g[picks[0]]) ** 2).sum(1)
    while len(picks) < k and distance.sum() > 0:
        picks.append(int(torch.multinomial(distance, 1, generator=generator)))
        distance = torch.minimum(distance, ((g - g[picks[-1]]) ** 2).sum(1))
    return picks


def _stratified_picks(x: torch.Tensor, k: int, certainty: Sequence[float], within: str, neighbours: int, seed: int) -> List[int]:
    """`cluster_picks(allocation="proportional")`: strata's shares by size, one pick per
    sub-cluster of a stratum; pick j of a stratum with share a is placed at (j + 0.5) / a."""
    labels = kmeans(x, math.ceil(math.sqrt(k)), seed=seed)
    strata = [(labels == s).nonzero().squeeze(1) for s in range(int(labels.max()) + 1)]
    placed = []
    for s, (rows, share) in enumerate(zip(strata, proportional_shares([len(r) for r in strata], k))):
        if share == 0:
            continue
        sub = kmeans(x[rows], share, seed=seed)
        by_size = sorted(range(share), key=lambda c: (-(sub == c).sum().item(), c))
        for j, c in enumerate(by_size):
            placed.append(((j + 0.5) / share, -len(rows), s, _cluster_pick(x, rows[sub == c], certainty, within, neighbours)))
    return [row for *_, row in sorted(placed)]


def proportional_shares(sizes: Sequence[int], total: int) -> List[int]:
    """`total` split over groups of these `sizes` in proportion to them (Hamilton's largest
    remainders; ties: the larger group, then the earlier), no group given more than its size."""
    total = min(total, sum(sizes))
    shares = [total * s // sum(sizes) for s in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % sum(sizes)), -sizes[i], i))
    while sum(shares) < total:
        for i in by_remainder:
            if sum(shares) < total and shares[i] < sizes[i]:
                shares[i] += 1
    return shares


def _cluster_pick(x: torch.Tensor, rows: torch.Tensor, certainty: Sequence[float], within: str, neighbours: int) -> int:
    """The row of `x` that stands for the cluster `rows` (see `cluster_picks`'s `within`)."""
    dist = torch.cdist(x[rows], x[rows])
    m = min(neighbours, len(rows) - 1)
    typical = 1 / (dist.topk(m + 1, largest=False).values[:, 1:].mean(1) + 1e-8) if m else torch.ones(1)
    if within == "uncertain":
        best = min(range(len(rows)), key=lambda i: (certainty[rows[i]], -typical[i].item()))
    else:
        best = int(typical.argmax())
    return int(rows[best])


def kmeans(x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster labels of the rows of `x`: k-means++ seeding, then Lloyd's iterations; an emptied
    cluster restarts at the row farthest from its centre, so there are k clusters while n >= k."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    k = min(k, n)
    centres = [int(torch.randint(n, (1,), generator=g))]
    closest = torch.cdist(x, x[centres]).squeeze(1) ** 2
    for _ in range(1, k):
        nxt = int(torch.multinomial(closest + 1e-12, 1, generator=g)) if closest.sum() > 0 else int(torch.randint(n, (1,), generator=g))
        centres.append(nxt)
        closest = torch.minimum(closest, torch.cdist(x, x[nxt : nxt + 1]).squeeze(1) ** 2)
    c = x[centres].clone()
    labels = torch.full((n,), -1)
    for _ in range(iterations):
        dist = torch.cdist(x, c)
        new = dist.argmin(1)
        served = dist.gather(1, new[:, None]).squeeze(1)
        for j in (torch.bincount(new, minlength=k) == 0).nonzero().squeeze(1).tolist():  # empty: take the row worst served
            far = int(served.argmax())
            new[far], served[far] = j, -1
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.zeros_like(c).index_add_(0, labels, x) / torch.bincount(labels, minlength=k)[:, None]
    return labels


def coverage_sketch(x: torch.Tensor, points: int = 128, seed: int = 0) -> torch.Tensor:
    """[min(points, n), d] k-means centres of `x` (the embeddings of the pairs a judge trained on):
    a small stand-in for that data, for `rank_for_review(covered=...)`."""
    labels = kmeans(x, points, seed=seed)
    counts = torch.bincount(labels)
    return torch.zeros(len(counts), x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts[:, None]


def pair_embeddings(encoder: Any, candidates: List[Dict[str, Any]]) -> torch.Tensor:
    """[n, 3 * dim] vectors of routed pairs for `rank_for_review`, from a `SentenceEncoder`: the
    request, what the two replies share (their mean) and where they differ (|A - B|: what a
    person's choice teaches the heads), each unaffected by which reply is shown first."""
    e_p = encoder.encode([c["prompt"] for c in candidates], part="prompt")
    e_a, e_b = encoder.encode([c["response_a"] for c in candidates]), encoder.encode([c["response_b"] for c in candidates])
    return torch.cat([e_p, (e_a + e_b) / 2, (e_a - e_b).abs() / 2], dim=1)


def _high_stakes(c: Mapping[str, Any]) -> bool:
    return any(r.startswith("high_stakes:") for r in c["reasons"])


def _certainty(ai: Mapping[str, Any]) -> float:
    p = ai.get("prob_a")
    if ai.get("verdict") == Verdict.ABSTAIN.value or ai.get("orders_agree") is False or p is None:
        return 0.0
    return abs(p - 0.5)


def _rule_name(rule: Any) -> str:
    return getattr(rule, "__name__", type(rule).__name__)
