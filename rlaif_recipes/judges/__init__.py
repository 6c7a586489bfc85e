"""Pairwise judges: each `judge=` config option names one class here."""

from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict
from rlaif_recipes.judges.cache import JudgmentCache
from rlaif_recipes.judges.rubric import Rubric
from rlaif_recipes.judges.rule import RuleJudge

__all__ = ["Judgment", "JudgmentCache", "Pair", "PairwiseJudge", "Rubric", "RuleJudge", "Verdict"]
