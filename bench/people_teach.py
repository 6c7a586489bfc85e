"""Do people's review answers teach the reward model? Heads trained on one writing style, then N
answers on another style's pairs, routed or random, then agreement on that style's held-out pairs.

    PYTHONPATH=. python bench/people_teach.py --out /tmp/people_teach [--ns 25 50 100 200] [--random-seeds 5]
        [--rankings clusters uncertainty] [--cluster-seeds 1] [--rounds] [--validate]

1. `one-style` heads: `rlaif train-reward-model` on Llama-2-chat's XSTest pairs only, the harm
   reader frozen from the shipped head (`init_from`), without an answer reader (the shipped one
   read both styles: `answer_reader.layers=0`); `both-styles`: the same on Llama-2's and SmolLM2's
   pairs (the reference the gap is measured to).
2. The one-style judge (judge=reward_model, rubric helpful_harmless) judges SmolLM2's training-split
   pairs, each shown in a hash-picked order; every pair is a router candidate. "People" (simulated
   from XSTest's own labels: the human-preferred side wins) answer N of them, picked by the
   router's `rank_for_review` with a budget of N (routed, one row per `--rankings` entry:
   `clusters`, one most typical pair per k-means cluster of the pairs'
   encoder embeddings, `--cluster-seeds` k-means seeds: mean and spread; `clusters-uncertain`, the
   most uncertain pair per cluster; `clusters-coverage`, `clusters` with the one-style heads'
   training pairs as TypiClust's labelled set (`coverage_sketch`: 128 k-means centres), so the
   clusters they cover go last; `strata`, the budget shared over ceil(sqrt(N)) k-means strata in
   proportion to their sizes, a stratum's share one most typical pair per k-means sub-cluster of
   it; `badge`, the router's default, k-means++ seeding on the embeddings scaled by the judge's
   doubt, `--cluster-seeds` draws; `uncertainty`, the most uncertain first) or at random
   (`--random-seeds` seeds: mean and spread), written as a real review queue and human_labels.jsonl.
3. Retrain with `feedback=[review_answers(that run)]` (weight 1, harm reader frozen) and measure
   agreement on SmolLM2's held-out pairs (never in the pool).
`--rounds`: the loop a team runs (judge -> review -> retrain -> re-judge). Each routed arm answers
in rounds up the `--ns`: at N it keeps the answers of the N before, re-judges the pool with the heads
retrained on them, and routes N minus those among the pairs not yet answered; the label budget is
the same as random's.
`--validate`: the other direction, to choose a ranking without reading SmolLM2's held-out pairs:
heads on SmolLM2's pairs only learn Llama-2's style (pool: Llama-2's training pairs; agreement on
Llama-2's held-out pairs).
Prints one table; writes results.json under --out.
"""

import argparse
import hashlib
import json
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import yaml

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.config import asset_path
from rlaif_recipes.data import xstest_pairs
from rlaif_recipes.judges.base import Pair
from rlaif_recipes.judges.review_queue import ReviewQueue, pair_id
from rlaif_recipes.judges.reward_model import RewardModelJudge, SentenceEncoder
from rlaif_recipes.judges.router import coverage_sketch, pair_embeddings, rank_for_review
from rlaif_recipes.recipes.train_reward_model import train_reward_model

LLAMA, SMOL = "xstest/xstest_v2_completions_llama2orig.csv", "xstest/xstest_smollm2_completions.csv"
METRICS = (("helpful_harmless", "all"), ("false_refusal", "safe"))
RANKINGS = {  # name: (within, allocation) for cluster_picks; None: most uncertain first
    "clusters": ("typical", "one"), "clusters-uncertain": ("uncertain", "one"), "clusters-coverage": ("typical", "one"),
    "strata": ("typical", "proportional"), "badge": ("typical", "badge"), "uncertainty": None,
}  # fmt: skip


def train(out: Path, name: str, styles: List[str], taught: str, cache: str, feedback_run: Path = None) -> Dict[str, float]:
    """Retrain the heads (harm reader frozen from the shipped head, no answer reader); agreement on `taught`'s held-out pairs."""
    overrides = [
        f"output_dir={out / name}", f"init_from={asset_path('reward_model')}", f"encoder.cache_path={cache}", "answer_reader.layers=0",
        "train_data.completions=[" + ",".join(asset_path(s) for s in styles) + "]",
        f"eval_data.completions=[{asset_path(taught)}]",
    ]  # fmt: skip
    if feedback_run:
        overrides.append(f"feedback=[{{data: {{_component_: rlaif_recipes.data.review_answers, runs: [{feedback_run}]}}, weight: 1.0}}]")
    table = train_reward_model(rlaif_config.load("train_reward_model", overrides))["held_out_agreement"]
    return {f"{o}:{g}": table[o][g] for o, g in METRICS}


def candidates(head_dir: Path, taught: str) -> List[Dict]:
    """`taught`'s training pairs as the one-style judge routes them, with the person's answer."""
    pool = xstest_pairs(completions=[asset_path(taught)], split="train")
    shown = []
    for row in pool:
        swap = hashlib.sha256(row["prompt"].encode()).digest()[0] % 2 == 1
        a, b = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
        shown.append((Pair(row["prompt"], a, b), "B" if swap else "A"))
    judge = RewardModelJudge(str(head_dir), rubric=yaml.safe_load((rlaif_config.CONF_DIR / "rubric" / "helpful_harmless.yaml").read_text()))
    judgments = judge.judge([p for p, _ in shown])
    return [
        {"pair_id": pair_id(p), **vars(p), "reasons": ["low_confidence"], "ai": j.to_dict(), "human": human}
        for (p, human), j in zip(shown, judgments)
    ]


def answered_run(out: Path, name: str, picked: List[Dict]) -> Path:
    """A run directory as the router and `rlaif review` leave it: the queue and people's answers."""
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    ReviewQueue(str(run / "review_queue.jsonl")).add([{k: v for k, v in c.items() if k != "human"} for c in picked])
    with open(run / "human_labels.jsonl", "w") as f:
        f.writelines(json.dumps({"pair_id": c["pair_id"], "verdict": c["human"], "annotator": "sim"}) + "\n" for c in picked)
    return run


def spread(scores: List[Dict[str, float]]) -> Dict[str, float]:
    """Each metric's mean over seeds, with its standard deviation and range (one seed: as it is)."""
    if len(scores) == 1:
        return scores[0]
    out = {}
    for k in scores[0]:
        values = [s[k] for s in scores]
        out.update({k: round(statistics.mean(values), 4), f"{k}:sd": round(statistics.pstdev(values), 4),
                    f"{k}:min": min(values), f"{k}:max": max(values)})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/people_teach")
    parser.add_argument("--ns", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--rankings", nargs="+", choices=sorted(RANKINGS), default=["clusters", "uncertainty"])
    parser.add_argument("--cluster-seeds", type=int, default=1, help="k-means seeds per cluster ranking (the router uses seed 0)")
    parser.add_argument("--rounds", action="store_true",
                        help="routed arms answer in rounds: each N keeps the last N's answers and routes the rest by the judge retrained on them")
    parser.add_argument("--validate", action="store_true", help="SmolLM2-only heads learn Llama-2's style: never reads SmolLM2's held-out pairs")
    args = parser.parse_args()
    out, started = Path(args.out), time.time()
    cache = str(out / "embeddings.safetensors")
    known, taught = (SMOL, LLAMA) if args.validate else (LLAMA, SMOL)
    encoder = SentenceEncoder(cache_path=cache)
    table = {"one-style (N=0)": train(out, "one_style", [known], taught, cache),
             "both-styles": train(out, "both_styles", [known, taught], taught, cache)}  # fmt: skip
    pool = candidates(out / "one_style", taught)
    known_pairs = [{"prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"]}
                   for r in xstest_pairs(completions=[asset_path(known)], split="train")]  # fmt: skip
    covered = coverage_sketch(pair_embeddings(encoder, known_pairs))
    picked: Dict[str, List[Dict]] = {}
    rounds: Dict[tuple, tuple] = {}  # (ranking, seed): (the heads retrained on its answers so far, those answers), with --rounds
    for n in sorted(n for n in args.ns if n < len(pool)):
        for ranking in args.rankings:
            clustered, scores = RANKINGS[ranking], []
            within, allocation = clustered or ("typical", "one")
            for seed in range(args.cluster_seeds if clustered else 1):
                embed = (lambda c: pair_embeddings(encoder, c)) if clustered else None
                name = f"{ranking}_{n}" + (f"_{seed}" if seed else "")
                head, answered = rounds.get((ranking, seed), (out / "one_style", []))
                asked = {c["pair_id"] for c in answered}
                rest = [c for c in (candidates(head, taught) if answered else pool) if c["pair_id"] not in asked]
                picked[name] = answered + rank_for_review(rest, budget=n - len(answered), embed=embed, within=within, seed=seed, allocation=allocation,
                                                          covered=covered if ranking == "clusters-coverage" else None)[: n - len(answered)]  # fmt: skip
                if args.rounds:
                    rounds[ranking, seed] = (out / name, picked[name])
                scores.append(train(out, name, [known], taught, cache, answered_run(out, f"run_{name}", picked[name])))
            table[f"{ranking} N={n}"] = spread(scores)
        scores = []
        for seed in range(args.random_seeds):
            sample = random.Random(seed).sample(pool, n)
            scores.append(train(out, f"random_{n}_{seed}", [known], taught, cache, answered_run(out, f"run_random_{n}_{seed}", sample)))
        table[f"random N={n}"] = spread(scores)
    print(f"\nagreement with the human choice on {taught}'s held-out XSTest pairs (heads on {known}'s; pool: {len(pool)} {taught} "
          f"training pairs; random: mean ± sd of {args.random_seeds} seeds); gap recovered = (x - one-style) / (both-styles - one-style)")  # fmt: skip
    print("| heads | " + " | ".join(f"{o} {g}" for o, g in METRICS) + " | gap recovered (helpful_harmless all) |\n|---|---:|---:|---:|")
    key = "helpful_harmless:all"
    base, top = table["one-style (N=0)"], table["both-styles"]
    for name, r in table.items():
        cells = [f"{r[f'{o}:{g}']:.3f}" + (f" ± {r[f'{o}:{g}:sd']:.3f}" if f"{o}:{g}:sd" in r else "") for o, g in METRICS]
        recovered = (r[key] - base[key]) / (top[key] - base[key]) if top[key] != base[key] else float("nan")
        print(f"| {name} | " + " | ".join(cells) + f" | {recovered:.2f} |")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "minutes": round((time.time() - started) / 60, 1), "validate": args.validate, "rows": table,
              "picked": {k: [c["pair_id"] for c in v] for k, v in picked.items()}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"{record['minutes']} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()
