"""Pairwise judges: each `judge=` config option names one class here.

The names load on first use (PEP 562): a process that needs only the cache or the review queue
(`rlaif review`, a test's helper process) does not import torch, torchtune and vLLM, which the
local judges need (bench/RESULTS.md, "`rlaif review` and the judgment cache without torch").
"""

import importlib
from typing import Any, List

_MODULE_OF = {
    "AnthropicJudge": "api",
    "OpenAIJudge": "api",
    "Judgment": "base",
    "Pair": "base",
    "PairwiseJudge": "base",
    "Verdict": "base",
    "JudgmentCache": "cache",
    "LLMJudge": "llm",
    "PanelJudge": "panel",
    "RewardModelJudge": "reward_model",
    "PromptMatches": "router",
    "RouterJudge": "router",
    "export_review_queue": "review_queue",
    "Rubric": "rubric",
    "RuleJudge": "rules",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
