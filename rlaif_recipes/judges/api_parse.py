"""Reading a verdict out of an API judge's reply: strictly, so garbage abstains instead of guessing.

A reply counts only if it is exactly the letter A or B (surrounding whitespace, quotes, brackets,
markdown emphasis or a final full stop allowed) or a JSON object whose "verdict" is A or B.
"Response A is better", "Both are fine", "a" or an empty reply abstain with the text quoted in the
reason. Where the endpoint returns log-probabilities, P(A) is read from the token that carries
the verdict, normalised over A and B.
"""

import json
import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from rlaif_recipes.judges.base import Verdict

LABELS = ("A", "B")
JSON_ANSWER = 'Answer with a JSON object and nothing else: {"verdict": "A" or "B", "rationale": "<one short sentence>"}.'
VERDICT_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": list(LABELS)}, "rationale": {"type": "string"}},
    "required": ["verdict", "rationale"],
    "additionalProperties": False,
}
_WRAPPING = " \t\r\n\"'`*_()[]{}<>"


def parse_verdict(text: Optional[str]) -> Tuple[Optional[Verdict], Optional[str], Optional[str]]:
    """(verdict, rationale, None) for a well-formed reply, else (None, None, reason to abstain)."""
    raw = (text or "").strip()
    letter = raw.strip(_WRAPPING).rstrip(".!").strip(_WRAPPING)
    if letter in LABELS:
        return Verdict(letter), None, None
    body = raw.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("verdict") in LABELS:
        rationale = obj.get("rationale")
        return Verdict(obj["verdict"]), rationale if isinstance(rationale, str) else None, None
    return None, None, f"unparseable verdict: {raw[:120]!r}"


def prob_a_from_openai_logprobs(tokens: Sequence[Any], verdict: Verdict) -> Optional[float]:
    """P(A) from the first generated token that spells the verdict letter (OpenAI logprobs shape:
    .token and .top_logprobs[].token/.logprob). None unless both A and B are among its top tokens."""
    for tok in tokens:
        if _letter(tok.token) != verdict.value:
            continue
        lp = _letter_logprobs((t.token, t.logprob) for t in (tok.top_logprobs or []))
        if "A" not in lp or "B" not in lp:
            return None
        return 1.0 / (1.0 + math.exp(lp["B"] - lp["A"]))
    return None


def _letter(token: str) -> str:
    return token.strip(_WRAPPING + ":,.")


def _letter_logprobs(top: Iterable[Tuple[str, float]]) -> Dict[str, float]:
    """Log-probability of each label, summed over its spellings (" A", "A", "\"A") among top tokens."""
    out: Dict[str, float] = {}
    for token, logprob in top:
        label = _letter(token)
        if label in LABELS:
            out[label] = logprob if label not in out else float(_logaddexp(out[label], logprob))
    return out


def _logaddexp(x: float, y: float) -> float:
    hi = max(x, y)
    return hi + math.log(math.exp(x - hi) + math.exp(y - hi))
