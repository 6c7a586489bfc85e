"""Judge the responses `generate_pairs` sampled and write a preference dataset (Parquet shards).

    tune run rlaif_recipes/recipes/judge_pairs.py --config judge_pairs input_dir=outputs/generate_pairs
    rlaif run judge_pairs judge=openai input_dir=... output_dir=...

Each prompt's n responses become at most one preference pair. With n = 2 the judge compares the
two. With n > 2 it compares every pair (round robin); the response with the most wins and the one
with the fewest form the pair, because the widest gap is the clearest signal, and that pair's own
head-to-head judgment labels it, never a label the judge did not state. This is online_dpo's
`pick_pair`, so offline and online training pick pairs the same way. Identical responses are a tie
without asking the judge. Ties and abstains are left out of the preference file and written to
output_dir/dropped for inspection.

Rows carry `chosen` / `rejected` as chat conversations (prompt messages + one assistant message),
the layout torchtune's `preference_dataset` reads and TRL's DPO trainers take (they split the
shared prompt off themselves), plus texts, token ids, P(chosen preferred), whether both orders
agreed, and provenance (ai/human, judge, judge model, rubric version, sampling policy).

Input is streamed one shard at a time; each output shard mirrors its input shard and is written
atomically. A shard is done when it is written and none of its prompts abstained, so a re-run
judges the shards that are missing or hold abstains (an unreachable endpoint, an unparseable reply,
a pair waiting for a human label), and the judgment cache makes every verdict already paid for
free. A run in which the judge abstained on every comparison exits with an error. When a judge
budget runs out (`judge.stopped`), the shard in progress is not written; finished shards are kept
and the run exits with status 3 (BUDGET_EXIT) naming the budget. Raise the budget and re-run to
finish. The output directory belongs to one input and one judge (`rlaif_recipes.run_dir`): a run
with another judge, rubric or input_dir is refused before any judge is built.
"""

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig
from torchtune import config, utils
from tqdm import tqdm

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.distributed import refuse_torchrun
from rlaif_recipes.errors import ConfigError, DataError, JudgeError
from rlaif_recipes.files import atomic_write, atomic_write_text
from rlaif_recipes.judges.api import APIJudge
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict
from rlaif_recipes.recipes.online_dpo import pick_pair
from rlaif_recipes.run_dir import claim, read_run, run_identity

log = utils.get_logger("INFO")

BUDGET_EXIT = 3  # exit status when the judge's budget ran out before every shard was judged
# settings that do not change the verdicts: a run may change them and continue the directory
# (the judge's own, such as budgets and concurrency, are its RUNTIME_SETTINGS)
RUNTIME_KEYS = ("batch_size", "input_dir", "dry_run")
INPUT_COLUMNS = ["prompt_id", "prompt", "messages", "prompt_token_ids", "responses", "response_token_ids", "finish_reasons", "policy"]
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TOKENS = pa.list_(pa.int64())
PREFERENCE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),  # the user's request as text
        ("chosen", MESSAGES),  # prompt messages + the preferred assistant message
        ("rejected", MESSAGES),  # prompt messages + the other assistant message
        ("chosen_text", pa.string()),
        ("rejected_text", pa.string()),
        ("prompt_token_ids", TOKENS),
        ("chosen_token_ids", TOKENS),
        ("rejected_token_ids", TOKENS),
        ("chosen_finish_reason", pa.string()),
        ("rejected_finish_reason", pa.string()),
        ("prob_chosen", pa.float64()),  # the judge's P(chosen preferred); 1.0 for a verdict without one
        ("orders_agree", pa.bool_()),  # judged in both orders: did they agree (null: one order)
        ("rationale", pa.string()),
        ("source", pa.string()),  # "ai" or "human"
        ("judge", pa.string()),
        ("judge_model", pa.string()),
        ("rubric", pa.string()),  # name@version
        ("policy", pa.string()),  # which weights sampled the responses
        ("num_responses", pa.int64()),
    ]
)
DROPPED_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("verdict", pa.string()),  # "tie" or "abstain"
        ("reason", pa.string()),
        ("judge", pa.string()),
        ("judge_model", pa.string()),
        ("rubric", pa.string()),
        ("policy", pa.string()),
    ]
)


@dataclass
class JudgePairsSettings:
    input_dir: str
    output_dir: str
    seed: int
    checkpoint_dir: str
    batch_size: int
    dry_run: bool
    judge: Any
    rubric: Any


class JudgePairsRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        """Every check that needs no judge: settings, input, output directory."""
        refuse_torchrun("judge_pairs", "an API judge sends its requests concurrently, and a big judge model belongs behind `vllm serve` (judge=openai)")
        if cfg.batch_size < 1:
            raise ConfigError(f"batch_size={cfg.batch_size}: the judge needs at least 1 pair per call")
        self._input_shards = _input_shards(Path(cfg.input_dir))
        self._output_dir = Path(cfg.output_dir)
        self._batch_size = cfg.batch_size
        self._judge: Optional[PairwiseJudge] = None
        self._seconds = 0.0
        self._asked = self._abstained = 0  # this run's comparisons put to the judge, and its abstains
        self._abstain_reasons: Counter = Counter()
        identity = run_identity(cfg, RUNTIME_KEYS, input_dir=str(Path(cfg.input_dir).resolve()), input_run=read_run(Path(cfg.input_dir)).get("identity"))
        claim(cfg.output_dir, "judge_pairs", identity, outputs=("data", "dropped"))

    def setup(self, cfg: DictConfig) -> None:
        self._judge = config.instantiate(cfg.judge)
        rlaif_config.save(cfg, str(self._output_dir))

    def cost_estimate(self) -> Optional[str]:
        """What an API judge will be paid for on the shards still to judge (None for local judges)."""
        if not isinstance(self._judge, APIJudge) and getattr(self._judge, "escalate", None) is None:  # a cascade's API tier
            return None
        todo = [s for s in self._input_shards if not self._done(s.name)]
        pairs = [Pair(r["prompt"], r["responses"][i], r["responses"][j])
                 for shard in todo for r in pq.read_table(shard, columns=["prompt", "responses"]).to_pylist()
                 for i, j in combinations(range(len(r["responses"])), 2) if r["responses"][i] != r["responses"][j]]  # fmt: skip
        return self._judge.estimate(pairs, f"{len(todo)} shard(s)")

    def judge_pairs(self) -> Optional[str]:
        """Judge every shard not done; returns the judge's stop message if its budget ran out."""
        data_dir, dropped_dir = self._output_dir / "data", self._output_dir / "dropped"
        data_dir.mkdir(parents=True, exist_ok=True)
        dropped_dir.mkdir(parents=True, exist_ok=True)
        todo = [s for s in self._input_shards if not self._done(s.name)]
        log.info(f"{len(self._input_shards) - len(todo)} of {len(self._input_shards)} shards already judged")
        bar = tqdm(total=sum(pq.ParquetFile(s).metadata.num_rows for s in todo), desc="judge", unit="prompt")
        start = time.perf_counter()
        try:
            for shard in todo:
                rows = pq.read_table(shard, columns=INPUT_COLUMNS).to_pylist()
                kept, dropped = self._judge_shard(rows, bar)
                if self._judge.stopped:
                    return self._judge.stopped
                _write(dropped, DROPPED_SCHEMA, dropped_dir / shard.name)
                _write(kept, PREFERENCE_SCHEMA, data_dir / shard.name)  # last: its presence marks the shard done
            return None
        finally:
            self._seconds = time.perf_counter() - start
            bar.close()

    def _judge_shard(self, rows: List[Dict[str, Any]], bar: tqdm) -> Tuple[List[Dict], List[Dict]]:
        kept, dropped = [], []
        for batch in _batches(rows, self._batch_size):
            comparisons = [(b, i, j) for b, r in enumerate(batch) for i, j in combinations(range(len(r["responses"])), 2)]
            asked = [Pair(batch[b]["prompt"], batch[b]["responses"][i], batch[b]["responses"][j]) for b, i, j in comparisons]
            distinct = [k for k, pair in enumerate(asked) if pair.response_a != pair.response_b]
            judged = dict(zip(distinct, self._judge.judge([asked[k] for k in distinct]) if distinct else []))
            abstains = [j for j in judged.values() if j.verdict is Verdict.ABSTAIN]
            self._asked += len(judged)
            self._abstained += len(abstains)
            self._abstain_reasons.update(j.reason or "no reason given" for j in abstains)
            per_prompt: List[Dict[Tuple[int, int], Judgment]] = [{} for _ in batch]
            for k, (b, i, j) in enumerate(comparisons):
                per_prompt[b][(i, j)] = judged[k] if k in judged else self._identical()
            for r, judgments in zip(batch, per_prompt):
                row, drop = self._preference(r, judgments)
                (kept if row else dropped).append(row or drop)
            bar.update(len(batch))
        return kept, dropped

    def _identical(self) -> Judgment:
        return Judgment(Verdict.TIE, prob_a=0.5, reason="identical responses", judge=self._judge.name,
                        model=self._judge.model, rubric=self._judge.rubric and self._judge.rubric.id)

    def _preference(self, r: Dict[str, Any], judged: Dict[Tuple[int, int], Judgment]) -> Tuple[Optional[Dict], Dict]:
        """The preference row for one prompt, or None and the row for the dropped file."""
        n = len(r["responses"])
        if n < 2:
            return None, _dropped(r, Judgment.abstain(f"only {n} response(s); a pair needs 2"))
        pick = pick_pair(n, judged)
        if not pick.labelled:
            reasons = dict.fromkeys(j.reason for j in judged.values() if not j.labelled and j.reason)
            return None, _dropped(r, Judgment(Verdict(pick.status), reason="; ".join(reasons) or None, **_provenance(judged)))
        chosen, rejected = pick.chosen, pick.rejected
        head_to_head = judged[(min(chosen, rejected), max(chosen, rejected))]

        def conversation(k: int) -> List[Dict[str, str]]:
            return [*r["messages"], {"role": "assistant", "content": r["responses"][k]}]

        row = {
            "prompt_id": r["prompt_id"], "prompt": r["prompt"],
            "chosen": conversation(chosen), "rejected": conversation(rejected),
            "chosen_text": r["responses"][chosen], "rejected_text": r["responses"][rejected],
            "prompt_token_ids": r["prompt_token_ids"],
            "chosen_token_ids": r["response_token_ids"][chosen], "rejected_token_ids": r["response_token_ids"][rejected],
            "chosen_finish_reason": r["finish_reasons"][chosen], "rejected_finish_reason": r["finish_reasons"][rejected],
            "prob_chosen": pick.prob_chosen, "orders_agree": head_to_head.orders_agree, "rationale": head_to_head.rationale,
            "source": head_to_head.source, "judge": head_to_head.judge, "judge_model": head_to_head.model,
            "rubric": head_to_head.rubric, "policy": r["policy"], "num_responses": n,
        }
        return row, {}

    def _done(self, shard_name: str) -> bool:
        """Written, and no prompt in it abstained (an abstain is asked again on the next run)."""
        data, dropped = self._output_dir / "data" / shard_name, self._output_dir / "dropped" / shard_name
        if not (data.exists() and dropped.exists()):
            return False
        return Verdict.ABSTAIN.value not in pq.read_table(dropped, columns=["verdict"]).column("verdict").to_pylist()

    def check_judged_anything(self) -> None:
        """A judge that abstained on every comparison it was asked failed: say why, exit non-zero."""
        if self._asked and self._abstained == self._asked:
            reason, count = self._abstain_reasons.most_common(1)[0]
            raise JudgeError(
                f"the judge abstained on all {self._asked} comparisons of this run (most often: {reason!r}, {count}x); "
                "fix the judge and re-run the same command: shards with abstains are judged again"
            )

    def summary(self) -> Dict[str, Any]:
        """Counts over every written shard (not only this run's), plus this run's judge metrics."""
        data = sorted((self._output_dir / "data").glob("shard-*.parquet"))
        verdicts: Counter = Counter()
        for path in sorted((self._output_dir / "dropped").glob("shard-*.parquet")):
            verdicts.update(pq.read_table(path, columns=["verdict"]).column("verdict").to_pylist())
        done = sum(self._done(p.name) for p in data)  # each reads its dropped shard: once per shard
        return {
            "shards_done": done,
            "shards_with_abstains": len(data) - done,
            "shards_total": len(self._input_shards),
            "preferences": sum(pq.ParquetFile(p).metadata.num_rows for p in data),
            "ties": verdicts[Verdict.TIE.value],
            "abstains": verdicts[Verdict.ABSTAIN.value],
            "judge": self._judge.name,
            "judge_metrics": dict(self._judge.metrics),  # this run only, like seconds
            "seconds": round(self._seconds, 3),  # this run's judging and writing, without start-up
        }

    def cleanup(self) -> None:
        if self._judge is not None:
            self._judge.close()


def _provenance(judged: Dict[Tuple[int, int], Judgment]) -> Dict[str, Any]:
    first = next(iter(judged.values()))
    return {"judge": first.judge, "model": first.model, "rubric": first.rubric}


def _dropped(r: Dict[str, Any], judgment: Judgment) -> Dict[str, Any]:
    return {
        "prompt_id": r["prompt_id"], "prompt": r["prompt"], "responses": r["responses"],
        "verdict": judgment.verdict.value, "reason": judgment.reason, "judge": judgment.judge,
        "judge_model": judgment.model, "rubric": judgment.rubric, "policy": r["policy"],
    }


def _batches(rows: Sequence[Dict[str, Any]], pairs_per_batch: int) -> List[List[Dict[str, Any]]]:
    """Whole prompts per judge call, about `pairs_per_batch` comparisons each."""
    batches, current, size = [], [], 0
    for r in rows:
        current.append(r)
        size += len(r["responses"]) * (len(r["responses"]) - 1) // 2
        if size >= pairs_per_batch:
            batches.append(current)
            current, size = [], 0
    return batches + [current] if current else batches


def _input_shards(input_dir: Path) -> List[Path]:
    """The generate_pairs shards to judge, checked before any judge is built."""
    shards = sorted((input_dir / "data").glob("shard-*.parquet"))
    if not shards:
        raise DataError(
            f"no generated shards in {input_dir / 'data'}; set input_dir to a generate_pairs output_dir "
            "(run `rlaif run generate_pairs` first)"
        )
    missing = [c for c in INPUT_COLUMNS if c not in pq.read_schema(shards[0]).names]
    if missing:
        raise DataError(f"{shards[0]} lacks column(s) {missing}; input_dir must hold generate_pairs output")
    return shards


def _write(rows: List[Dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """Atomically; an empty shard has no row group at all (HF datasets fails on an empty one)."""

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))

    atomic_write(path, write)


def load_preferences(output_dir: str, dropped: bool = False):
    """The preference pairs (or, with dropped=True, the ties and abstains) as one HF dataset."""
    from datasets import Dataset, load_dataset

    files = sorted((Path(output_dir) / ("dropped" if dropped else "data")).glob("shard-*.parquet"))
    if not any(pq.ParquetFile(f).metadata.num_rows for f in files):  # load_dataset rejects "no data"
        return Dataset(pa.Table.from_pylist([], schema=DROPPED_SCHEMA if dropped else PREFERENCE_SCHEMA))
    return load_dataset("parquet", data_files=[str(f) for f in files], split="train")


@rlaif_config.parse(JudgePairsSettings)
def recipe_main(cfg: DictConfig) -> int:
    recipe = JudgePairsRecipe(cfg)
    try:
        recipe.setup(cfg)
        estimate = recipe.cost_estimate()
        if estimate:
            log.info(estimate)
        if cfg.dry_run:
            log.info("dry_run=true: nothing was judged")
            return 0
        stopped = recipe.judge_pairs()
        summary = recipe.summary()
        atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    finally:
        recipe.cleanup()
    written = summary["shards_done"] + summary["shards_with_abstains"]
    log.info(
        f"{summary['preferences']} preference pairs, {summary['ties']} ties and {summary['abstains']} abstains "
        f"dropped, in {written} of {summary['shards_total']} shards under {cfg.output_dir}"
    )
    if summary["shards_with_abstains"]:
        log.warning(f"{summary['shards_with_abstains']} shard(s) hold abstains (see dropped/): re-run the same command "
                    "to ask the judge again; verdicts already given come from the cache")
    if stopped:
        log.error(f"judge budget reached: {stopped}. Kept {written} written shards; raise the budget and re-run "
                  "the same command to judge the rest (judgments already paid for are cached).")
        return BUDGET_EXIT
    recipe.check_judged_anything()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
