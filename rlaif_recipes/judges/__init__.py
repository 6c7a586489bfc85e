"""Pairwise judges: each `judge=` config option names one class here."""

from rlaif_recipes.judges.api import AnthropicJudge, OpenAIJudge
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict
from rlaif_recipes.judges.cache import JudgmentCache
from rlaif_recipes.judges.llm import LLMJudge
from rlaif_recipes.judges.panel import PanelJudge
from rlaif_recipes.judges.reward_model import RewardModelJudge
from rlaif_recipes.judges.router import PromptMatches, RouterJudge, export_review_queue
from rlaif_recipes.judges.rubric import Rubric
from rlaif_recipes.judges.rules import RuleJudge

__all__ = [
    "AnthropicJudge", "OpenAIJudge",
    "Judgment", "JudgmentCache", "Pair", "PairwiseJudge", "PanelJudge", "PromptMatches", "Rubric", "RouterJudge", "RuleJudge",
    "Verdict", "export_review_queue",
    "LLMJudge", "RewardModelJudge",
]
