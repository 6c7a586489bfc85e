"""The cascade on the audit's pairs: the reward model on every pair, an OpenAI-compatible judge only
on the pairs it doubts, people on what that one still doubts; agreement and cost per tier.

    PYTHONPATH=. python bench/cascade.py [--model-dir ~/.cache/rlaif-recipes/models/smollm2-135m-instruct]

The second tier is vLLM's OpenAI-compatible server on loopback (real HTTP) serving the local model
(SmolLM2-135M-Instruct: the only LLM on this machine, so a weak "strong" judge; the figures say
what the plumbing does and costs, not what a frontier judge would add). Pairs: XSTest's
human-labelled held-out pairs (both writing styles), the human's winner in slot A or B by a hash,
as audit_judge places them. Cost: each escalated request priced at --usd-in / --usd-out per
million tokens (a rule of thumb for a mid-size API model); the reward model costs nothing per pair.
"People" are simulated from the human label, so the cascade's agreement with them answering is an
upper bound that shows how many pairs they had to answer.
"""

import argparse
import hashlib
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import yaml

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from servers import vllm_server  # noqa: E402

from rlaif_recipes import config as rlaif_config  # noqa: E402
from rlaif_recipes.config import asset_path  # noqa: E402
from rlaif_recipes.data import xstest_pairs  # noqa: E402
from rlaif_recipes.judges import OpenAIJudge, Pair, RewardModelJudge, RouterJudge, Verdict  # noqa: E402

STYLES = ["xstest/xstest_v2_completions_llama2orig.csv", "xstest/xstest_smollm2_completions.csv"]


def audit_pairs(max_pairs: int) -> List[tuple]:
    """The held-out pairs, every `step`-th one when max_pairs is below their number (both styles stay in)."""
    rows = xstest_pairs(completions=[asset_path(s) for s in STYLES], split="held_out")
    step = max(1, -(-len(rows) // max_pairs))
    out = []
    for row in rows.select(range(0, len(rows), step)):
        a_wins = hashlib.sha256(row["prompt"].encode()).digest()[0] % 2 == 0
        pair = Pair(row["prompt"], row["chosen"], row["rejected"]) if a_wins else Pair(row["prompt"], row["rejected"], row["chosen"])
        out.append((pair, Verdict.A if a_wins else Verdict.B))
    return out


def share(hits: int, n: int) -> str:
    return f"{hits / n:.3f} ({hits}/{n})" if n else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache/rlaif-recipes/models/smollm2-135m-instruct"))
    parser.add_argument("--min-confidence", type=float, default=0.2)
    parser.add_argument("--usd-in", type=float, default=3.0)
    parser.add_argument("--usd-out", type=float, default=15.0)
    parser.add_argument("--max-pairs", type=int, default=1000, help="judge every k-th held-out pair so that at most this many are judged")
    args = parser.parse_args()
    rubric = yaml.safe_load((rlaif_config.CONF_DIR / "rubric" / "helpful_harmless.yaml").read_text())
    data = audit_pairs(args.max_pairs)
    pairs, human = [p for p, _ in data], [h for _, h in data]
    work = Path(tempfile.mkdtemp(prefix="cascade-"))
    cheap = RewardModelJudge(rubric=rubric)
    alone = cheap.judge(pairs)
    with vllm_server(args.model_dir, "smollm2", work / "server.log", extra=["--max-model-len", "2048"]) as url:
        strong = dict(base_url=url, model="smollm2", api_key_env=None, rubric=rubric, structured="choice", max_output_tokens=2,
                      order="both", input_usd_per_mtok=args.usd_in, output_usd_per_mtok=args.usd_out)  # fmt: skip
        with OpenAIJudge(**strong, cache_path=str(work / "strong.sqlite")) as every:
            strong_alone = every.judge(pairs)
            strong_cost, strong_requests = every.metrics["cost_usd"], int(every.metrics["requests"])
        router = RouterJudge(cheap, review_path=str(work / "queue.jsonl"), min_confidence=args.min_confidence,
                             escalate=OpenAIJudge(**strong, cache_path=str(work / "strong.sqlite")))  # fmt: skip
        router.escalate.cache = None  # the cascade pays for its own requests, not the "strong alone" run's
        with router:
            cascade = router.judge(pairs)
    n = len(pairs)
    tier = {"ai": [], "ai-escalated": [], "people": []}
    for j, h in zip(cascade, human):
        tier["people" if j.verdict is Verdict.ABSTAIN else j.source].append(j.verdict is h)
    rows: Dict[str, List[str]] = {
        "reward model alone": [share(sum(j.verdict is h for j, h in zip(alone, human)), n), "0", "$0"],
        "SmolLM2 (vLLM, openai judge) alone": [share(sum(j.verdict is h for j, h in zip(strong_alone, human)), n),
                                              str(strong_requests), f"${strong_cost:.4f}"],  # fmt: skip
        "cascade tier 1: reward model, its confident pairs": [share(sum(tier["ai"]), len(tier["ai"])), "0", "$0"],
        "cascade tier 2: SmolLM2 on the doubted pairs": [share(sum(tier["ai-escalated"]), len(tier["ai-escalated"])),
                                                         str(int(router.metrics["requests"])), f"${router.metrics['cost_usd']:.4f}"],  # fmt: skip
        "cascade tier 3: people (still doubted)": [f"{len(tier['people'])} pairs queued", "-", "-"],
        "cascade, people not yet answered (abstains = misses)": [share(sum(tier["ai"]) + sum(tier["ai-escalated"]), n),
                                                                 str(int(router.metrics["requests"])), f"${router.metrics['cost_usd']:.4f}"],  # fmt: skip
        "cascade, people answered their queue": [share(sum(tier["ai"]) + sum(tier["ai-escalated"]) + len(tier["people"]), n),
                                                 str(int(router.metrics["requests"])), f"${router.metrics['cost_usd']:.4f}"],  # fmt: skip
    }
    print(f"\n{datetime.now(timezone.utc).isoformat(timespec='seconds')} {platform.platform()}; {n} XSTest held-out pairs, "
          f"min_confidence={args.min_confidence}, escalated {int(router.metrics['escalated'])}, price ${args.usd_in}/${args.usd_out} per Mtok")  # fmt: skip
    print("| judge | agreement with the human choice | API requests | cost |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(r) + " |")
    print("\nsample escalated pairs (request | A | B | human | tier-2 verdict):")
    shown = 0
    for p, j, h in zip(pairs, cascade, human):
        if j.source == "ai-escalated" and shown < 4:
            shown += 1
            print(f"- {p.prompt[:70]!r} | {p.response_a[:60]!r} | {p.response_b[:60]!r} | {h.value} | {j.verdict.value} P(A)={j.prob_a:.2f}")


if __name__ == "__main__":
    main()
