"""`judge=router`: an AI judge labels every pair; the doubtful and the high-stakes ones go to people.

A pair is routed to the human-review queue when the AI judgment is
    low_confidence   |P(A) - 0.5| < min_confidence (ties included, except a judge's settled ties: two
                     replies alike by the rubric; skipped if the judge gives no P(A)),
    orders_disagree  the two orders of an order=both judge picked different winners,
    abstained        the judge gave no verdict,
    high_stakes      a rule says so (e.g. `PromptMatches` on the request).
The queue is a JSONL file, one line per pair, keyed by a stable `pair_id` (hash of the prompt and
both responses, in order), with the texts, the AI judgment and the reasons; re-runs never add a
pair twice. `export_review_queue` turns it into an HF dataset for a labelling tool.

People answer in `human_labels_path` (JSONL: pair_id, verdict A/B/tie, optional annotator and note;
A and B as in the queue entry). A human label wins over the AI label for that pair: source="human",
judge=annotator. A routed pair still waiting abstains ("awaiting human review"), or with
`pending: ai` keeps the AI label and says in `reason` that it is under review.

The router caches nothing itself: the inner judge caches its calls, and a cached router verdict
would hide human labels that arrive later.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.judges.base import Judgment, Pair, PairwiseJudge, Verdict
from rlaif_recipes.judges.composite import ask_member, build_judge

PENDING = ("abstain", "ai")
AWAITING = "awaiting human review"
HUMAN_VERDICTS = {"A": Verdict.A, "B": Verdict.B, "tie": Verdict.TIE}


def pair_id(pair: Pair) -> str:
    """Stable id of a pair as shown (prompt, response A, response B)."""
    blob = json.dumps([pair.prompt, pair.response_a, pair.response_b])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class PromptMatches:
    """High-stakes rule: the request matches any of these regular expressions (case-insensitive)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        if not patterns:
            raise ConfigError("PromptMatches needs at least one pattern (patterns=[...])")
        try:
            self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"PromptMatches: bad regular expression in {list(patterns)}: {e}") from None

    def __call__(self, pair: Pair) -> bool:
        return self.pattern.search(pair.prompt) is not None


class RouterJudge(PairwiseJudge):
    delegates_order = True  # the inner judge handles the order; the router sees each pair once
    RUNTIME_SETTINGS = PairwiseJudge.RUNTIME_SETTINGS + ("review_path",)

    def __init__(
        self,
        judge: Union[PairwiseJudge, Mapping[str, Any]],
        review_path: str,
        human_labels_path: Optional[str] = None,
        min_confidence: float = 0.0,
        high_stakes: Sequence[Union[str, Mapping[str, Any], Callable[[Pair], bool]]] = (),
        pending: str = "abstain",
        name: Optional[str] = None,
    ) -> None:
        if pending not in PENDING:
            raise ConfigError(f"judge.pending={pending!r}: choose one of {', '.join(PENDING)}")
        if not 0 <= min_confidence <= 0.5:
            raise ConfigError(f"judge.min_confidence={min_confidence}: must be in [0, 0.5] (a margin around P(A)=0.5)")
        self.inner = build_judge(judge, "judge.judge")
        super().__init__(rubric=self.inner.rubric, order="fixed", name=name)
        self.rules = [rlaif_config.build(r, f"judge.high_stakes[{i}]") for i, r in enumerate(high_stakes)]
        for spec, rule in zip(high_stakes, self.rules):
            if not callable(rule):
                raise ConfigError(f"judge.high_stakes: {spec!r} is not callable; give a dotted path or {{_component_: ...}} of a rule(pair) -> bool")
        self.min_confidence = min_confidence
        self.pending = pending
        self.queue = ReviewQueue(review_path)
        self.human_labels_path = human_labels_path
        read_human_labels(human_labels_path)  # a malformed file fails now, before any judging

    @property
    def model(self) -> Optional[str]:
        return None  # AI judgments carry the inner judge's model; human ones have none

    def identity(self) -> Dict[str, Any]:
        """The inner judge as built (its identity pins down its weights; a config does not)."""
        return {**super().identity(), "judge": self.inner.identity()}

    def close(self) -> None:
        self.inner.close()

    def reasons(self, pair: Pair, judgment: Judgment) -> List[str]:
        """Why this AI judgment needs a person (empty: it does not)."""
        found = []
        if judgment.verdict is Verdict.ABSTAIN:
            found.append("abstained")
        elif judgment.settled is None and judgment.prob_a is not None and abs(judgment.prob_a - 0.5) < self.min_confidence:
            found.append("low_confidence")
        if judgment.orders_agree is False:
            found.append("orders_disagree")
        found += [f"high_stakes:{_rule_name(r)}" for r in self.rules if r(pair)]
        return found

    def _compare(self, pairs: List[Pair], record: Callable[[int, Judgment], None]) -> None:
        ai = ask_member(self, self.inner.name, self.inner, pairs)
        self.stopped = self.inner.stopped
        humans = read_human_labels(self.human_labels_path)
        routed = []
        for i, (pair, judgment) in enumerate(zip(pairs, ai)):
            pid = pair_id(pair)
            why = self.reasons(pair, judgment)
            for r in why:
                self.count(f"routed_{r}", 1)
            self.count("routed", bool(why))
            if pid in humans:
                self.count("human_labels", 1)
                record(i, self._human(humans[pid], judgment))
                continue
            if why:
                routed.append({"pair_id": pid, **vars(pair), "reasons": why, "ai": judgment.to_dict()})
                if self.pending == "abstain":
                    self.count("awaiting_review", 1)
                    judgment = Judgment.abstain(f"{AWAITING} ({', '.join(why)})", usage=judgment.usage, rubric=judgment.rubric)
                else:
                    judgment.reason = f"under human review ({', '.join(why)})" + (f"; {judgment.reason}" if judgment.reason else "")
            record(i, judgment)
        self.count("queued", self.queue.add(routed))

    def _human(self, label: Mapping[str, Any], ai: Judgment) -> Judgment:
        verdict = HUMAN_VERDICTS[label["verdict"]]
        return Judgment(
            verdict,
            prob_a={Verdict.A: 1.0, Verdict.B: 0.0, Verdict.TIE: 0.5}[verdict],
            rationale=label.get("note"),
            source="human",
            judge=label.get("annotator") or "human",
            rubric=ai.rubric,
            usage=ai.usage,
        )


class ReviewQueue:
    """The JSONL review queue: appended under an exclusive file lock, one whole line per write,
    so several processes can route into one file; a line torn by a crash is skipped on reading."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        try:  # now, not when the first doubtful pair arrives mid-run
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a"):
                pass
        except OSError as e:
            raise ConfigError(f"judge.review_path={path}: cannot write there ({e.strerror}); choose a writable path") from None

    def entries(self) -> List[Dict[str, Any]]:
        return read_queue(self.path)[0]

    def add(self, entries: List[Dict[str, Any]]) -> int:
        """Append the entries whose pair_id is not queued yet; returns how many were new."""
        if not entries:
            return 0
        with self._locked() as f:
            queued = {e["pair_id"] for e in self.entries()}
            new = []
            for e in entries:
                if e["pair_id"] not in queued:
                    queued.add(e["pair_id"])
                    new.append({**e, "queued_at": time.time()})
            if new:
                f.seek(0, os.SEEK_END)
                torn = f.tell() > 0 and last_byte(self.path) != b"\n"
                f.write(("\n" if torn else "") + "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in new))
                f.flush()
                os.fsync(f.fileno())
        return len(new)

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


QUEUE_FIELDS = ("pair_id", "prompt", "response_a", "response_b")


def read_queue(path: Path, fields: Sequence[str] = ("pair_id",)) -> Tuple[List[Dict[str, Any]], List[int]]:
    """(entries, numbers of the lines that are not an entry with these text `fields`): a line torn
    by a crash, or edited by hand, is left out, and the caller says so."""
    bad: List[int] = []
    entries = []
    for n, row in _read_jsonl(Path(path), strict=False, bad=bad):
        if isinstance(row, dict) and all(isinstance(row.get(k), str) for k in fields):
            entries.append(row)
        else:
            bad.append(n)
    return entries, sorted(bad)


def read_human_labels(path: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """pair_id -> {verdict, annotator, note}; the last label for a pair wins. A missing file is empty.
    Read under a shared lock: a label being appended (under the exclusive one) is read whole or not at all."""
    labels: Dict[str, Dict[str, Any]] = {}
    if not path:
        return labels
    for n, row in _read_jsonl(Path(path), strict=True, shared_lock=True):
        if not isinstance(row, dict) or "pair_id" not in row or row.get("verdict") not in HUMAN_VERDICTS:
            raise DataError(
                f"{path}: line {n} needs pair_id and verdict (one of {', '.join(HUMAN_VERDICTS)}), got {row!r}; fix or remove that line"
            )
        labels[row["pair_id"]] = row
    return labels


def export_review_queue(review_path: str, out_dir: str, human_labels_path: Optional[str] = None):
    """The review queue as an HF dataset saved under `out_dir` (pairs already labelled by a person
    in `human_labels_path` left out). Returns the dataset."""
    from datasets import Dataset

    done = read_human_labels(human_labels_path)
    rows = [
        {
            "pair_id": e["pair_id"],
            "prompt": e["prompt"],
            "response_a": e["response_a"],
            "response_b": e["response_b"],
            "reasons": e["reasons"],
            "ai_verdict": e["ai"]["verdict"],
            "ai_prob_a": e["ai"].get("prob_a"),
            "ai_judge": e["ai"].get("judge"),
            "ai_rationale": e["ai"].get("rationale"),
        }
        for e in ReviewQueue(review_path).entries()
        if e["pair_id"] not in done
    ]
    columns = ["pair_id", "prompt", "response_a", "response_b", "reasons", "ai_verdict", "ai_prob_a", "ai_judge", "ai_rationale"]
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns})
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return dataset


def _read_jsonl(path: Path, strict: bool, bad: Optional[List[int]] = None, shared_lock: bool = False) -> Iterator[Tuple[int, Any]]:
    """(line number, row) of each line; a line that is not JSON raises (strict) or goes to `bad`."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        if shared_lock:
            fcntl.flock(f, fcntl.LOCK_SH)
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            if strict:
                raise DataError(f"{path}: line {n} is not JSON ({e.msg}); fix or remove that line") from None
            if bad is not None:
                bad.append(n)


def last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _rule_name(rule: Any) -> str:
    return getattr(rule, "__name__", type(rule).__name__)
