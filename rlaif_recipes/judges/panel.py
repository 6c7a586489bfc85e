"""`judge=panel`: several judges vote on each pair.

    vote: majority   A or B by the majority of the members' A/B verdicts (ties and abstains do not
                     vote); equal counts are a tie; fewer than `min_votes` A/B verdicts abstain.
                     P(A) is the share of A votes, so a router can see how split the panel was.
    vote: mean_prob  the mean of the members' P(A) (members without one do not count; fewer than
                     `min_votes` abstain), turned into a verdict with `tie_margin`.

Each member handles position bias with its own `order` and caches its own calls. The panel itself
neither re-orders pairs (members already did) nor caches: its verdict is a cheap function of the
members' verdicts, which are cached already, and a panel-level cache would freeze a verdict that
was reached while a member abstained (members do not cache abstains, so a re-run can fill them in).
"""

from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from rlaif_recipes.errors import ConfigError
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict, verdict_from_prob
from rlaif_recipes.judges.composite import ask_member, build_judge

VOTES = ("majority", "mean_prob")


def sum_usage(judgments: Iterable[Judgment]) -> Dict[str, float]:
    total: Counter = Counter()
    for j in judgments:
        total.update(j.usage)
    return dict(total)


class PanelJudge(PairwiseJudge):
    delegates_order = True  # members handle the order themselves; the panel sees each pair once
    COMBINE_SETTINGS = ()  # tie_margin decides the mean_prob vote inside _compare

    def __init__(
        self,
        judges: Sequence[Union[PairwiseJudge, Mapping[str, Any]]],
        vote: str = "majority",
        min_votes: int = 1,
        tie_margin: float = 0.0,
        name: Optional[str] = None,
    ) -> None:
        if vote not in VOTES:
            raise ConfigError(f"judge.vote={vote!r}: choose one of {', '.join(VOTES)}")
        if not judges:
            raise ConfigError("judge.judges is empty: a panel needs at least one member ({_component_: ...})")
        if not 1 <= min_votes <= len(judges):
            raise ConfigError(f"judge.min_votes={min_votes}: must be between 1 and the number of members ({len(judges)})")
        self.members = [build_judge(spec, f"judge.judges[{i}]") for i, spec in enumerate(judges)]
        rubrics = {m.rubric for m in self.members}
        super().__init__(rubric=rubrics.pop() if len(rubrics) == 1 else None, order="fixed", tie_margin=tie_margin, name=name)
        self.vote = vote
        self.min_votes = min_votes
        self.member_names = _unique_names([m.name for m in self.members])

    @property
    def model(self) -> str:
        return ",".join(self.member_names)

    def identity(self) -> Dict[str, Any]:
        """The members as built (their identities pin down their weights; a config does not)."""
        return {**super().identity(), "judges": [m.identity() for m in self.members]}

    def close(self) -> None:
        for m in self.members:
            m.close()

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        votes: List[List[Judgment]] = []
        for name, member in zip(self.member_names, self.members):
            votes.append(ask_member(self, name, member, pairs))
        if all(m.stopped for m in self.members):
            self.stopped = "; ".join(f"{n}: {m.stopped}" for n, m in zip(self.member_names, self.members))
        for i in range(len(pairs)):
            record(i, self._decide([v[i] for v in votes]))

    def _decide(self, ballots: List[Judgment]) -> Judgment:
        shown = "; ".join(f"{n}={b.verdict.value}" for n, b in zip(self.member_names, ballots))
        agree = [b.orders_agree for b in ballots if b.orders_agree is not None]
        rubrics = sorted({b.rubric for b in ballots if b.rubric})
        provenance = dict(
            rationale=shown, judge=f"{self.name}[{self.model}]", rubric=",".join(rubrics) or None, usage=sum_usage(ballots)
        )
        if self.vote == "majority":
            a = sum(b.verdict is Verdict.A for b in ballots)
            b = sum(b.verdict is Verdict.B for b in ballots)
            if a + b < self.min_votes:
                return Judgment.abstain(f"{a + b} of {len(ballots)} members gave A or B; min_votes={self.min_votes} ({shown})", **provenance)
            verdict = Verdict.A if a > b else Verdict.B if b > a else Verdict.TIE
            prob_a = a / (a + b)
        else:
            probs = [b.prob_a for b in ballots if b.prob_a is not None and b.verdict is not Verdict.ABSTAIN]
            if len(probs) < self.min_votes:
                return Judgment.abstain(f"{len(probs)} of {len(ballots)} members gave P(A); min_votes={self.min_votes} ({shown})", **provenance)
            prob_a = sum(probs) / len(probs)
            verdict = verdict_from_prob(prob_a, self.tie_margin)
        return Judgment(
            verdict,
            prob_a=prob_a,
            reason=f"members split ({shown})" if verdict is Verdict.TIE else None,
            orders_agree=all(agree) if agree else None,
            **provenance,
        )


def _unique_names(names: List[str]) -> List[str]:
    """Member names for provenance and metrics; repeats get #2, #3 ..."""
    seen: Counter = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return out
