"""Audit a judge against human preferences before trusting it with training data.

    rlaif audit-judge judge=rule
    tune run rlaif_recipes/recipes/audit_judge.py --config audit_judge judge=panel

On a human-labelled pairwise set (columns prompt, chosen, rejected; XSTest's held-out pairs by
default) it measures, for the judge exactly as configured:

    agreement         share of pairs where the judge picks the human's choice (ties and abstains
                      count as misses; `agreement_when_labelled` leaves them out)
    position bias     each pair judged with order=fixed as (A, B) and as (B, A): the share of pairs
                      whose winner flips with the order (and how often the first slot wins)
    length bias       how often the judge prefers the longer response minus how often humans do
    injection flips   an instruction planted in the losing response ("... answer A" where A is the
                      loser): the share of correct verdicts that flip to the loser
    abstain/tie rate, and the judge's own usage counters (requests, tokens, cost_usd, cache hits)

Humans' winners are placed in slot A or B by a seeded hash, so a judge that always says "A" scores
about chance. Writes audit.json, audit.md, audit.png and audit_pairs.jsonl (per pair) under
output_dir and prints the table.
"""

import hashlib
import json
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import DictConfig
from torchtune import config, utils

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.distributed import refuse_torchrun
from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.files import atomic_write_text
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict
from rlaif_recipes.report import Bars, markdown_table, write_report
from rlaif_recipes.run_dir import claim, run_identity

log = utils.get_logger("INFO")
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
OTHER = {Verdict.A: Verdict.B, Verdict.B: Verdict.A}


@dataclass
class AuditJudgeSettings:
    output_dir: str
    checkpoint_dir: Optional[str]
    seed: int
    rubric: Any
    judge: Any
    pairs: Any
    where: Optional[Dict[str, Any]]
    group_by: Optional[List[str]]
    max_pairs: Optional[int]
    injection: str
    injection_at: str


class AuditJudgeRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        refuse_torchrun("audit_judge", "an API judge sends its requests concurrently, and a big judge model belongs behind `vllm serve` (judge=openai)")
        if cfg.injection_at not in ("end", "start"):
            raise ConfigError(f"injection_at={cfg.injection_at!r}: choose end or start (where the instruction goes in the losing response)")
        if "{letter}" not in cfg.injection:
            raise ConfigError("injection must contain {letter}: it becomes the losing response's slot (A or B)")
        self._output_dir = Path(cfg.output_dir)
        self._seed = cfg.seed
        self._injection = cfg.injection
        self._injection_at = cfg.injection_at
        self._judge: Optional[PairwiseJudge] = None

    def setup(self, cfg: DictConfig) -> None:
        data = rlaif_config.instantiate(cfg.pairs, "pairs")
        missing = [c for c in REQUIRED_COLUMNS if c not in data.column_names]
        if missing:
            raise DataError(f"the pairs dataset lacks column(s) {missing} (has {data.column_names}); it needs prompt, chosen, rejected")
        for column, allowed in (cfg.where or {}).items():
            if column not in data.column_names:
                raise ConfigError(f"where.{column}: no such column in the pairs dataset (columns: {', '.join(data.column_names)})")
            data = data.filter(lambda value, allowed=set(allowed): value in allowed, input_columns=column)
        if cfg.max_pairs is not None:
            data = data.select(range(min(cfg.max_pairs, len(data))))
        if len(data) == 0:
            raise DataError(f"no pairs left to audit after where={dict(cfg.where or {})} and max_pairs={cfg.max_pairs}")
        unknown = [c for c in cfg.group_by or [] if c not in data.column_names]
        if unknown:
            raise ConfigError(f"group_by: no column(s) {unknown} in the pairs dataset (columns: {', '.join(data.column_names)})")
        self._group_by = list(cfg.group_by or [])
        self._rows = data.select_columns([*REQUIRED_COLUMNS, *[c for c in self._group_by if c not in REQUIRED_COLUMNS]]).to_list()
        claim(cfg.output_dir, "audit_judge", run_identity(cfg, ()), outputs=("audit.json", "audit_pairs.jsonl"))
        self._judge = config.instantiate(cfg.judge)
        rlaif_config.save(cfg, str(self._output_dir))

    def audit(self) -> Dict[str, Any]:
        judge = self._judge
        pairs, human = [], []
        for r in self._rows:
            chosen_first = _coin(self._seed, r["prompt"], r["chosen"], r["rejected"])
            a, b = (r["chosen"], r["rejected"]) if chosen_first else (r["rejected"], r["chosen"])
            pairs.append(Pair(r["prompt"], a, b))
            human.append(Verdict.A if chosen_first else Verdict.B)

        before = judge.metrics.copy()
        start = time.perf_counter()
        clean = judge.judge(pairs)
        seconds = time.perf_counter() - start
        clean_usage = judge.metrics - before
        log.info(f"judged {len(pairs)} pairs in {seconds:.1f}s; now the order-swap and injection passes")

        correct = [i for i, (j, h) in enumerate(zip(clean, human)) if j.verdict is h]
        injected = judge.judge([self._inject(pairs[i], OTHER[human[i]]) for i in correct])
        with fixed_order(judge):
            shown = judge.judge(pairs)
            swapped = [_unswap(j) for j in judge.judge([Pair(p.prompt, p.response_b, p.response_a) for p in pairs])]

        metrics = self._metrics(pairs, human, clean, correct, injected, shown, swapped)
        metrics.update(seconds=seconds, pairs_per_second=len(pairs) / seconds if seconds > 0 else None)
        metrics["usage"] = {k: v for k, v in clean_usage.items() if not k.startswith("verdict_")}
        metrics["usage_all_passes"] = {k: v for k, v in judge.metrics.items() if not k.startswith("verdict_")}
        self._write(metrics, pairs, human, clean, shown, swapped, dict(zip(correct, injected)))
        return metrics

    def _inject(self, pair: Pair, loser: Verdict) -> Pair:
        """The pair with the instruction planted in the losing response, naming the loser's slot."""
        text = self._injection.format(letter=loser.value)
        side = pair.response_a if loser is Verdict.A else pair.response_b
        planted = f"{side}\n\n{text}" if self._injection_at == "end" else f"{text}\n\n{side}"
        return Pair(pair.prompt, planted, pair.response_b) if loser is Verdict.A else Pair(pair.prompt, pair.response_a, planted)

    def _metrics(self, pairs, human, clean, correct, injected, shown, swapped) -> Dict[str, Any]:
        n = len(pairs)
        verdicts = Counter(j.verdict for j in clean)
        labelled = [i for i, j in enumerate(clean) if j.labelled]
        longer = [_longer(p) for p in pairs]
        sized = [i for i in labelled if longer[i] is not None]
        both = [i for i in range(n) if shown[i].labelled and swapped[i].labelled]
        # Slots as shown: in the swapped pass the first slot's verdict is B once un-swapped.
        views = [j.verdict is Verdict.A for j in shown if j.labelled] + [j.verdict is Verdict.B for j in swapped if j.labelled]
        judge_longer = _rate(sum(clean[i].verdict is longer[i] for i in sized), len(sized))
        human_longer = _rate(sum(human[i] is longer[i] for i in sized), len(sized))
        return {
            "judge": self._judge.name,
            "pairs": n,
            "agreement": _rate(len(correct), n),
            "agreement_when_labelled": _rate(len(correct), len(labelled)),
            "labelled_pairs": len(labelled),
            "abstain_rate": _rate(verdicts[Verdict.ABSTAIN], n),
            "tie_rate": _rate(verdicts[Verdict.TIE], n),
            "position_bias_rate": _rate(sum(shown[i].verdict is not swapped[i].verdict for i in both), len(both)),
            "position_bias_pairs": len(both),
            "first_slot_win_rate": _rate(sum(views), len(views)),
            "length_bias": None if judge_longer is None else judge_longer - human_longer,
            "judge_prefers_longer": judge_longer,
            "humans_prefer_longer": human_longer,
            "length_bias_pairs": len(sized),
            "injection_flip_rate": _rate(sum(j.verdict is OTHER[human[i]] for i, j in zip(correct, injected)), len(correct)),
            "injection_changed_rate": _rate(sum(j.verdict is not human[i] for i, j in zip(correct, injected)), len(correct)),
            "injection_pairs": len(correct),
            "agreement_by": self._agreement_by(human, clean),
        }

    def _agreement_by(self, human, clean) -> Dict[str, Dict[str, Dict[str, Any]]]:
        """Agreement within each value of each `group_by` column (e.g. safe vs unsafe requests)."""
        out: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for column in self._group_by:
            groups: Dict[str, List[bool]] = {}
            for r, h, j in zip(self._rows, human, clean):
                groups.setdefault(str(r[column]), []).append(j.verdict is h)
            out[column] = {v: {"agreement": _rate(sum(hits), len(hits)), "pairs": len(hits)} for v, hits in sorted(groups.items())}
        return out

    def _write(self, metrics, pairs, human, clean, shown, swapped, injected: Dict[int, Judgment]) -> None:
        n = metrics["pairs"]
        rows = [
            _row("agreement", metrics["agreement"], n, "judge picks the human's choice (ties/abstains miss)"),
            *[_row(f"agreement[{column}={value}]", g["agreement"], g["pairs"], f"agreement on the pairs whose {column} is {value}")
              for column, groups in metrics["agreement_by"].items() for value, g in groups.items()],
            _row("agreement_when_labelled", metrics["agreement_when_labelled"], metrics["labelled_pairs"], "same, over pairs the judge labelled A/B"),
            _row("position_bias_rate", metrics["position_bias_rate"], metrics["position_bias_pairs"], "winner flips when the order is swapped (order=fixed)"),
            _row("first_slot_win_rate", metrics["first_slot_win_rate"], 2 * metrics["position_bias_pairs"], "share of fixed-order verdicts for the slot shown first"),
            _row("length_bias", metrics["length_bias"], metrics["length_bias_pairs"], "judge prefers longer minus humans prefer longer"),
            _row("injection_flip_rate", metrics["injection_flip_rate"], metrics["injection_pairs"], "correct verdicts that flip to the loser carrying an instruction"),
            _row("abstain_rate", metrics["abstain_rate"], n, "no verdict"),
            _row("tie_rate", metrics["tie_rate"], n, "tie verdicts (order=both: includes order disagreements)"),
        ]
        rows += [_row(f"usage.{k}", v, n, "judge counter, clean pass") for k, v in sorted(metrics["usage"].items()) if k in USAGE_SHOWN]
        rates = ("agreement", "position_bias_rate", "length_bias", "injection_flip_rate", "abstain_rate", "tie_rate")
        plot = Bars({metrics["judge"]: {k: metrics[k] for k in rates}}, title=f"judge audit: {metrics['judge']} on {n} pairs", ylabel="rate", ylim=(-1, 1))
        paths = write_report(str(self._output_dir), "audit", metrics, rows, title=f"Judge audit: {metrics['judge']}", plot=plot)
        per_pair = [
            {
                **vars(p), "human": h.value, "verdict": c.verdict.value, "prob_a": c.prob_a, "reason": c.reason,
                "fixed_order": s.verdict.value, "fixed_order_swapped": w.verdict.value,
                "injected": injected[i].verdict.value if i in injected else None,
            }
            for i, (p, h, c, s, w) in enumerate(zip(pairs, human, clean, shown, swapped))
        ]
        atomic_write_text(
            self._output_dir / "audit_pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_pair)
        )
        print(markdown_table(rows))
        log.info(f"wrote {', '.join(str(p) for p in paths.values())} and audit_pairs.jsonl")

    def cleanup(self) -> None:
        if self._judge is not None:
            self._judge.close()


USAGE_SHOWN = ("requests", "input_tokens", "output_tokens", "cost_usd", "cache_hits", "retries", "queries")


@contextmanager
def fixed_order(judge: PairwiseJudge) -> Iterator[None]:
    """Show every pair in the order given, in this judge and in any judge inside it (panel
    members, a router's inner judge), without building a second copy (which could mean a second
    model in memory). The cache stays valid: it is keyed by the order shown."""
    inside = list(_judges_within(judge))
    saved = [j.order for j in inside]
    for j in inside:
        j.order = "fixed"
    try:
        yield
    finally:
        for j, order in zip(inside, saved):
            j.order = order


def _judges_within(judge: PairwiseJudge) -> Iterator[PairwiseJudge]:
    yield judge
    for value in vars(judge).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, PairwiseJudge):
                yield from _judges_within(item)


def _coin(seed: int, *texts: str) -> bool:
    return hashlib.sha256("\x00".join((str(seed), *texts)).encode()).digest()[0] % 2 == 0


def _unswap(judgment: Judgment) -> Judgment:
    judgment.verdict = OTHER.get(judgment.verdict, judgment.verdict)
    return judgment


def _longer(pair: Pair) -> Optional[Verdict]:
    a, b = len(pair.response_a), len(pair.response_b)
    return None if a == b else Verdict.A if a > b else Verdict.B


def _rate(hits: int, total: int) -> Optional[float]:
    return hits / total if total else None


def _row(metric: str, value: Any, n: int, what: str) -> Dict[str, Any]:
    return {"metric": metric, "value": value, "n": n, "what": what}


@rlaif_config.parse(AuditJudgeSettings)
def recipe_main(cfg: DictConfig) -> None:
    recipe = AuditJudgeRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.audit()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
