"""`judge=rule`: a Python callable scores each response; the higher score wins, equal scores tie."""

from typing import Any, Callable, Dict, List, Union

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import ConfigError
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict


class RuleJudge(PairwiseJudge):
    symmetric = True

    def __init__(self, rule: Union[str, Dict[str, Any], Callable[[str, str], float]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rule = rlaif_config.build(rule, "judge.rule")
        if not callable(self.rule):
            raise ConfigError(f"judge.rule={rule!r} is not callable; give a dotted path to a function or a {{_component_: ...}}")
        self._rule_name = rule if isinstance(rule, str) else repr(rule)

    @property
    def model(self) -> str:
        return self._rule_name

    def identity(self) -> Dict[str, Any]:
        return {**super().identity(), "rule": self._rule_name}

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        for i, p in enumerate(pairs):
            try:
                a, b = float(self.rule(p.prompt, p.response_a)), float(self.rule(p.prompt, p.response_b))
            except Exception as e:  # a rule that fails on one pair abstains on it
                record(i, Judgment.abstain(f"rule raised {type(e).__name__}: {e}"))
                continue
            verdict = Verdict.A if a > b else Verdict.B if b > a else Verdict.TIE
            record(i, Judgment(verdict, prob_a={Verdict.A: 1.0, Verdict.B: 0.0, Verdict.TIE: 0.5}[verdict]))
