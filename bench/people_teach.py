"""Do people's review answers teach the reward model? Heads trained on one writing style, then N
answers on another style's pairs, routed or random, then agreement on that style's held-out pairs.

    PYTHONPATH=. python bench/people_teach.py --out /tmp/people_teach [--ns 25 50 100 200] [--random-seeds 5]
        [--rankings clusters uncertainty] [--validate]

1. `one-style` heads: `rlaif train-reward-model` on Llama-2-chat's XSTest pairs only, the harm
   reader frozen from the shipped head (`init_from`); `both-styles`: the same on Llama-2's and
   SmolLM2's pairs (the reference the gap is measured to).
2. The one-style judge (judge=reward_model, rubric helpful_harmless) judges SmolLM2's training-split
   pairs, each shown in a hash-picked order; every pair is a router candidate. "People" (simulated
   from XSTest's own labels: the human-preferred side wins) answer N of them, picked by the
   router's `rank_for_review` with a budget of N (routed, one row per `--rankings` entry:
   `clusters`, the router's default, one most typical pair per k-means cluster of the pairs'
   encoder embeddings; `clusters-uncertain`, the most uncertain per cluster; `uncertainty`, the
   most uncertain first) or at random (`--random-seeds` seeds: mean and spread), written as a real
   review queue and human_labels.jsonl.
3. Retrain with `feedback=[review_answers(that run)]` (weight 1, harm reader frozen) and measure
   agreement on SmolLM2's held-out pairs (never in the pool).
`--validate`: the split to choose a ranking on, which never reads SmolLM2's held-out pairs: the
pool is SmolLM2's training pairs of two thirds of their requests (by a hash), and agreement is
measured on the pairs of the other third.
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
from typing import Callable, Dict, List, Optional

import torch
import yaml

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.config import asset_path
from rlaif_recipes.data import xstest_pairs
from rlaif_recipes.judges.base import Pair
from rlaif_recipes.judges.reward_model import RewardModelJudge, SentenceEncoder, load_heads, read_harm, read_head_config
from rlaif_recipes.judges.router import ReviewQueue, pair_embeddings, pair_id, rank_for_review
from rlaif_recipes.recipes.train_reward_model import train_reward_model

LLAMA, SMOL = "xstest/xstest_v2_completions_llama2orig.csv", "xstest/xstest_smollm2_completions.csv"
METRICS = (("helpful_harmless", "all"), ("false_refusal", "safe"))
RANKINGS = {"clusters": "typical", "clusters-uncertain": "uncertain", "uncertainty": None}


def validation_third(prompt: str) -> bool:
    """--validate: a third of SmolLM2's training requests, by a hash, whose pairs agreement is measured on."""
    return hashlib.sha256(f"validate:{prompt}".encode()).digest()[0] % 3 == 0


def train(out: Path, name: str, styles: List[str], cache: str, feedback_run: Path = None,
          measure: Optional[Callable[[Path], Dict[str, float]]] = None) -> Dict[str, float]:  # fmt: skip
    """Retrain the heads (harm reader frozen from the shipped head); agreement on SmolLM2 held out,
    or by `measure` (--validate, where the held-out pairs are not read: Llama-2's are the eval data)."""
    overrides = [
        f"output_dir={out / name}", f"init_from={asset_path('reward_model')}", f"encoder.cache_path={cache}",
        "train_data.completions=[" + ",".join(asset_path(s) for s in styles) + "]",
        f"eval_data.completions=[{asset_path(LLAMA if measure else SMOL)}]",
    ]  # fmt: skip
    if feedback_run:
        overrides.append(f"feedback=[{{data: {{_component_: rlaif_recipes.data.review_answers, runs: [{feedback_run}]}}, weight: 1.0}}]")
    table = train_reward_model(rlaif_config.load("train_reward_model", overrides))["held_out_agreement"]
    return measure(out / name) if measure else {f"{o}:{g}": table[o][g] for o, g in METRICS}


class ValidationPairs:
    """--validate's agreement: SmolLM2's training pairs of the validation third, scored by a head
    (its embeddings and the frozen harm reader's reading computed once)."""

    def __init__(self, rows: List[Dict], encoder: SentenceEncoder) -> None:
        self.encoder, self.rows = encoder, rows
        prompts = [r["prompt"] for r in rows]
        self.safe = torch.tensor([r["prompt_label"] != "unsafe" for r in rows])
        self.e = {side: (encoder.encode([r[side] for r in rows]), encoder.encode([r[side] for r in rows], part="opening")) for side in ("chosen", "rejected")}
        reader = load_heads(Path(asset_path("reward_model")), read_head_config(Path(asset_path("reward_model"))), encoder).harm
        with torch.no_grad():
            self.harm = read_harm(reader, encoder, prompts)

    @torch.no_grad()
    def __call__(self, head_dir: Path) -> Dict[str, float]:
        heads = load_heads(head_dir, read_head_config(head_dir), self.encoder)
        out = {}
        for objective, group in METRICS:
            agree = heads.scores(objective, self.harm, *self.e["chosen"]) > heads.scores(objective, self.harm, *self.e["rejected"])
            out[f"{objective}:{group}"] = round(agree[self.safe if group == "safe" else slice(None)].float().mean().item(), 4)
        return out


def candidates(head_dir: Path, rows: List[Dict]) -> List[Dict]:
    """The pool's pairs as the one-style judge routes them, with the person's answer."""
    shown = []
    for row in rows:
        swap = hashlib.sha256(row["prompt"].encode()).digest()[0] % 2 == 1
        a, b = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
        shown.append((Pair(row["prompt"], a, b), "B" if swap else "A"))
    judge = RewardModelJudge(str(head_dir), rubric=yaml.safe_load((rlaif_config.CONF_DIR / "rubric" / "helpful_harmless.yaml").read_text()))
    judgments = judge.judge([p for p, _ in shown])
    return [
        {"pair_id": pair_id(p), **vars(p), "reasons": ["low_confidence"], "ai": j.to_dict(), "human": human}
        for (p, human), j in zip(shown, judgments)
    ]


def spread(scores: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each metric over the random seeds, with its standard deviation and range."""
    out = {}
    for k in scores[0]:
        values = [s[k] for s in scores]
        out.update({k: round(statistics.mean(values), 4), f"{k}:sd": round(statistics.pstdev(values), 4),
                    f"{k}:min": min(values), f"{k}:max": max(values)})  # fmt: skip
    return out


def answered_run(out: Path, name: str, picked: List[Dict]) -> Path:
    """A run directory as the router and `rlaif review` leave it: the queue and people's answers."""
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    ReviewQueue(str(run / "review_queue.jsonl")).add([{k: v for k, v in c.items() if k != "human"} for c in picked])
    with open(run / "human_labels.jsonl", "w") as f:
        f.writelines(json.dumps({"pair_id": c["pair_id"], "verdict": c["human"], "annotator": "sim"}) + "\n" for c in picked)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/people_teach")
    parser.add_argument("--ns", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--rankings", nargs="+", choices=sorted(RANKINGS), default=["clusters", "uncertainty"])
    parser.add_argument("--validate", action="store_true", help="measure on a third of the pool's requests, not on SmolLM2's held-out pairs")
    args = parser.parse_args()
    out, started = Path(args.out), time.time()
    cache = str(out / "embeddings.safetensors")
    encoder = SentenceEncoder(cache_path=cache)
    rows = list(xstest_pairs(completions=[asset_path(SMOL)], split="train"))
    measure = None
    if args.validate:
        measure = ValidationPairs([r for r in rows if validation_third(r["prompt"])], encoder)
        rows = [r for r in rows if not validation_third(r["prompt"])]
    table = {"one-style (N=0)": train(out, "one_style", [LLAMA], cache, measure=measure)}
    if not args.validate:
        table["both-styles"] = train(out, "both_styles", [LLAMA, SMOL], cache)
    pool = candidates(out / "one_style", rows)
    picked = {}
    for n in args.ns:
        for ranking in args.rankings:
            within = RANKINGS[ranking]
            embed = (lambda c: pair_embeddings(encoder, c)) if within else None
            picked[f"{ranking} N={n}"] = rank_for_review(pool, budget=n, embed=embed, within=within or "typical")[:n]
            run = answered_run(out, f"run_{ranking}_{n}", picked[f"{ranking} N={n}"])
            table[f"{ranking} N={n}"] = train(out, f"{ranking}_{n}", [LLAMA], cache, run, measure)
        scores = []
        for seed in range(args.random_seeds):
            sample = random.Random(seed).sample(pool, n)
            scores.append(train(out, f"random_{n}_{seed}", [LLAMA], cache, answered_run(out, f"run_random_{n}_{seed}", sample), measure))
        table[f"random N={n}"] = spread(scores)
    where = ("the validation third of SmolLM2's training requests" if args.validate else "SmolLM2's held-out XSTest pairs")
    print(f"\nagreement with the human choice on {where} (pool: {len(pool)} SmolLM2 training pairs; "
          f"random: mean ± sd of {args.random_seeds} seeds)")  # fmt: skip
    key = "helpful_harmless:all"
    base, top = table["one-style (N=0)"], table.get("both-styles")
    print("| heads | " + " | ".join(f"{o} {g}" for o, g in METRICS) + (" | gap recovered (helpful_harmless all) |" if top else " |"))
    print("|---|" + "---:|" * (len(METRICS) + bool(top)))
    for name, r in table.items():
        cells = [f"{r[f'{o}:{g}']:.3f}" + (f" ± {r[f'{o}:{g}:sd']:.3f}" if f"{o}:{g}:sd" in r else "") for o, g in METRICS]
        if top:
            cells.append(f"{(r[key] - base[key]) / (top[key] - base[key]):.2f}" if top[key] != base[key] else "nan")
        print(f"| {name} | " + " | ".join(cells) + " |")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "minutes": round((time.time() - started) / 60, 1), "validate": args.validate, "rows": table,
              "picked": {k: [c["pair_id"] for c in v] for k, v in picked.items()}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"{record['minutes']} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()
