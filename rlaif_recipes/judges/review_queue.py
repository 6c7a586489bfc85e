"""The review queue and people's answers, as files several processes share.

The queue (`judge.review_path`) is JSONL, one line per routed pair, keyed by `pair_id`, appended
under an exclusive lock; people's answers (`human_labels_path`) are JSONL too, read under a shared
lock. `rlaif review` and the Label Studio bridge use only this module, so an annotator's command
starts without importing torch or a judge.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from rlaif_recipes.errors import ConfigError, DataError
from rlaif_recipes.judges.base import Pair, Verdict

HUMAN_VERDICTS = {"A": Verdict.A, "B": Verdict.B, "tie": Verdict.TIE}


def pair_id(pair: Pair) -> str:
    """Stable id of a pair as shown (prompt, response A, response B)."""
    blob = json.dumps([pair.prompt, pair.response_a, pair.response_b])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


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

    def add(
        self,
        entries: List[Dict[str, Any]],
        max_total: Optional[int] = None,
        max_new: Optional[int] = None,
        max_per_prompt: Optional[int] = None,
    ) -> "Queued":
        """Append, in order, the entries whose pair_id is not queued yet, while the queue holds
        fewer than `max_total` entries, this call added fewer than `max_new` and the entry's request
        has fewer than `max_per_prompt` entries; returns how many were added and which of
        `entries` are in the queue now. The limits are checked under the lock, so several
        processes routing into one file share one budget."""
        if not entries:
            return Queued(0, set())
        with locked_for_append(self.path) as f:
            existing = self.entries()
            queued = {e["pair_id"] for e in existing}
            per_prompt = Counter(prompt_key(e["prompt"]) for e in existing if isinstance(e.get("prompt"), str))
            new = []
            for e in entries:
                key = prompt_key(e.get("prompt") or "")
                if e["pair_id"] in queued or (max_total is not None and len(queued) >= max_total):
                    continue
                if (max_new is not None and len(new) >= max_new) or (max_per_prompt is not None and per_prompt[key] >= max_per_prompt):
                    continue
                queued.add(e["pair_id"])
                per_prompt[key] += 1
                new.append({**e, "queued_at": time.time()})
            if new:
                append_json_lines(f, self.path, new)
        return Queued(len(new), {e["pair_id"] for e in entries} & queued)


@dataclass
class Queued:
    added: int
    ids: Set[str]  # of the entries offered, those in the queue now (added by this call or before)


def prompt_key(prompt: str) -> str:
    """A request with case, spaces and punctuation aside: pairs of near-identical requests share it."""
    return " ".join(re.sub(r"[^\w\s]", " ", prompt.lower()).split())


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
    """pair_id -> {verdict, annotator, note}; the last label for a pair wins. A missing file is empty."""
    return {row["pair_id"]: row for _, row in human_label_lines(Path(path))} if path else {}


def human_label_lines(path: Path) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, answer) of each line of a human-labels file, every annotator's every answer; a
    line that is not an answer is an error naming it. Read under a shared lock: an answer being
    appended (under the exclusive one) is read whole or not at all."""
    for n, row in _read_jsonl(path, strict=True, shared_lock=True):
        if not isinstance(row, dict) or "pair_id" not in row or row.get("verdict") not in HUMAN_VERDICTS:
            raise DataError(
                f"{path}: line {n} needs pair_id and verdict (one of {', '.join(HUMAN_VERDICTS)}), got {row!r}; fix or remove that line"
            )
        yield n, row


def export_review_queue(review_path: str, out_dir: str, human_labels_path: Optional[str] = None):
    """The review queue as an HF dataset saved under `out_dir` (pairs already labelled by a person
    in `human_labels_path` left out). Returns the dataset."""
    from datasets import Dataset

    done = read_human_labels(human_labels_path)
    entries = [e for e in ReviewQueue(review_path).entries() if e["pair_id"] not in done]
    dataset = Dataset.from_dict(
        {
            **{k: [e[k] for e in entries] for k in ("pair_id", "prompt", "response_a", "response_b", "reasons")},
            **{f"ai_{k}": [e["ai"].get(k) for e in entries] for k in ("verdict", "prob_a", "judge", "rationale")},
        }
    )
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


@contextmanager
def locked_for_append(path: Path) -> Iterator[BinaryIO]:
    """`path` open for appending under an exclusive lock: what writers of one file take in turn."""
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_json_lines(f: BinaryIO, path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append `rows` as whole JSON lines to `f` (from `locked_for_append(path)`), on disk before this
    returns; a last line cut by a crash is ended first, so it stays apart from the new ones."""
    torn = f.seek(0, os.SEEK_END) > 0 and _last_byte(path) != b"\n"
    f.write((("\n" if torn else "") + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)).encode())
    f.flush()
    os.fsync(f.fileno())


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
