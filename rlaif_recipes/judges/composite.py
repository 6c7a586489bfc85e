"""What the composite judges (panel, router) share: building their member judges from configs and
asking them, with what the members counted added to the composite's metrics."""

from typing import Any, List, Mapping, Sequence, Union

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import ConfigError
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge

# Counters every judge keeps about its own verdicts: a composite keeps its own, so members' go
# under "<member>.<key>" only; everything else members count (requests, tokens, cost_usd,
# cache_hits, retries ...) is also summed at the top level.
OWN_KEYS = ("pairs", "queries", "order_disagreements")


def build_judge(spec: Union[PairwiseJudge, Mapping[str, Any]], where: str) -> PairwiseJudge:
    """A judge from a `{_component_: ...}` config (or an already built one)."""
    judge = rlaif_config.build(spec, where)
    if not isinstance(judge, PairwiseJudge):
        raise ConfigError(f"{where} must be a PairwiseJudge config ({{_component_: rlaif_recipes.judges.RuleJudge, ...}}), got {spec!r}")
    return judge


def ask_member(owner: PairwiseJudge, name: str, judge: PairwiseJudge, pairs: Sequence[Pair]) -> List[Judgment]:
    """`judge.judge(pairs)`, with what this call counted added to the composite `owner`'s counts."""
    judgments, usage = judge.judge_with_usage(pairs)
    for key, value in usage.items():
        owner.count(f"{name}.{key}", value)
        if key not in OWN_KEYS and not key.startswith("verdict_"):
            owner.count(key, value)
    return judgments
