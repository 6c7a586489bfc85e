"""`rlaif review QUEUE_OR_RUN_DIR`: a person labels the router's review queue in the terminal.

Each pending pair (queued, not yet labelled) shows the request and the two responses in a random
order (seeded by the pair, so a re-run shows it the same way) with the AI's verdict hidden unless
`--show-ai`, so the person is not anchored on it. One key and Enter answers: `1` / `2` for the
response shown first / second, `t` tie, `s` skip, `q` quit. Each answer is appended to the
human-labels file the router reads (one JSON line, under a file lock, flushed to disk) the moment
it is given, so a re-run continues where the last one stopped and Ctrl-C loses nothing.

Several people may label one queue at once, each with their own `rlaif review`: a pair on someone's
screen is leased to them (a lock on one byte of `<labels>.leases`, which the OS drops when their
process ends, kill -9 included), so the others pass over it, and a pair answered meanwhile is not
shown again. Every answer is kept once, with its annotator. A line of the queue that cannot be read
is named on stderr and skipped.
"""

import fcntl
import hashlib
import os
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from rlaif_recipes.errors import DataError, OutputError
from rlaif_recipes.judges.review_queue import (
    QUEUE_FIELDS,
    append_json_lines,
    human_label_lines,
    locked_for_append,
    read_human_labels,
    read_queue,
)

KEYS = "[1] first  [2] second  [t] tie  [s] skip  [q] quit"


def queue_and_labels(target: str, labels: Optional[str] = None) -> Tuple[Path, Path]:
    """A run directory (its review_queue.jsonl and human_labels.jsonl) or a queue file."""
    path = Path(target)
    queue = path / "review_queue.jsonl" if path.is_dir() else path
    if not queue.is_file():
        raise DataError(f"no review queue at {queue}; pass a run's output_dir (judge=router) or its review_queue.jsonl")
    return queue, Path(labels) if labels else queue.parent / "human_labels.jsonl"


def load_queue(queue: Path) -> List[Dict[str, Any]]:
    """The queue's entries; a line that is not one is named on stderr, not dropped in silence."""
    entries, bad = read_queue(queue, QUEUE_FIELDS)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"warning: {queue}: line(s) {shown} are not queue entries (not JSON, or no pair_id, prompt, response_a and "
              "response_b); skipped: fix or remove them", file=sys.stderr, flush=True)  # fmt: skip
    return entries


JOIN_RULE = "majority of annotators (each one's last vote); split votes and tie majorities skipped"


@dataclass
class Answered:
    """A queued pair people answered with a winner."""

    entry: Dict[str, Any]  # the queue entry: pair_id, prompt, response_a, response_b, ai
    verdict: str  # "A" or "B", as the entry shows the pair
    annotators: List[str]  # those who chose it
    votes: int  # annotators who answered the pair

    @property
    def chosen(self) -> str:
        return self.entry["response_a" if self.verdict == "A" else "response_b"]

    @property
    def rejected(self) -> str:
        return self.entry["response_b" if self.verdict == "A" else "response_a"]


def answered_pairs(targets: Sequence[Tuple[Path, Path]]) -> Tuple[List[Answered], Dict[str, int]]:
    """The one join of review queues with people's answers that training (`review_answers`) and
    audits (`reviewed_pairs`) share, with what it read and skipped. `targets`: (queue, labels) files.
    Strict: a label line that is not an answer, or whose pair id is in none of the queues (it
    belongs to another run), is an error naming its file and line. Several annotators on one pair:
    the majority of their votes, each one's last vote counting once (JOIN_RULE); a pair whose votes
    split evenly, or whose majority says tie, is skipped and counted: there is no winner to learn or
    audit."""
    queued: Dict[str, Dict[str, Any]] = {}
    for queue, _ in targets:
        queued.update((e["pair_id"], e) for e in load_queue(queue))
    votes: Dict[str, Dict[str, str]] = {}  # pair_id -> annotator -> verdict (their last one)
    counts: Counter = Counter()
    for labels in dict.fromkeys(labels for _, labels in targets):  # a labels file several runs share is read once
        for n, row in human_label_lines(labels):
            if row["pair_id"] not in queued:
                raise DataError(f"{labels}: line {n}: pair_id {row['pair_id']} is in none of the review queues of "
                                f"{[str(q) for q, _ in targets]}; add the run it belongs to, or remove that line")  # fmt: skip
            counts["answers"] += 1
            votes.setdefault(row["pair_id"], {})[row.get("annotator") or "unknown"] = row["verdict"]
    out = []
    for pid, by_annotator in votes.items():
        tally = Counter(by_annotator.values()).most_common()
        counts["pairs_answered"] += 1
        counts["several_annotators"] += len(by_annotator) > 1
        if len(tally) > 1 and tally[0][1] == tally[1][1]:
            counts["skipped_split_votes"] += 1
        elif tally[0][0] == "tie":
            counts["skipped_ties"] += 1
        else:
            verdict = tally[0][0]
            out.append(Answered(queued[pid], verdict, sorted(a for a, v in by_annotator.items() if v == verdict), len(by_annotator)))
    counts["pairs"] = len(out)
    return out, dict(counts)


def pending(entries: List[Dict[str, Any]], labels: Path) -> List[Dict[str, Any]]:
    done = read_human_labels(str(labels))
    return [e for e in entries if e["pair_id"] not in done]


def check_writable(labels: Path) -> None:
    """Before the first pair shows: an answer that cannot be written would be lost. Nothing is
    created (someone else's session may be writing the file at this moment)."""
    why = None
    if labels.exists():
        try:
            with open(labels, "a", encoding="utf-8"):
                pass
        except OSError as e:
            why = e.strerror
    elif not labels.parent.is_dir():
        why = f"{labels.parent} is not a directory"
    elif not os.access(labels.parent, os.W_OK | os.X_OK):
        why = f"{labels.parent} is not writable"
    if why:
        raise OutputError(f"cannot write human labels to {labels} ({why}); fix its permissions or pass --labels PATH")


class Leases:
    """Pairs on someone's screen: a lock on one byte of `<labels>.leases` per pair, taken without
    waiting. The OS releases a process's locks when it ends, so a killed session leaves none."""

    def __init__(self, labels: Path) -> None:
        self._file = open(f"{labels}.leases", "ab")  # noqa: SIM115 (held for the session: closing it drops every lease)

    def take(self, pair: str) -> bool:
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _slot(pair))
        except OSError:  # held by another process
            return False
        return True

    def release(self, pair: str) -> None:
        fcntl.lockf(self._file, fcntl.LOCK_UN, 1, _slot(pair))

    def close(self) -> None:
        self._file.close()


def _slot(pair: str) -> int:
    return int(pair[:8], 16)  # pair ids are hex digests


def shown_order(entry: Dict[str, Any]) -> Tuple[bool, str, str]:
    """(swapped, first, second): the two responses in the order a person sees them, random but
    fixed by the pair, so no position always holds the AI's pick."""
    swapped = hashlib.sha256(entry["pair_id"].encode()).digest()[0] % 2 == 1
    return (swapped, entry["response_b"], entry["response_a"]) if swapped else (swapped, entry["response_a"], entry["response_b"])


def verdict_of(choice: str, swapped: bool) -> str:
    """A person's first / second / tie as the queue's A / B / tie."""
    return "tie" if choice == "tie" else ("A", "B")[(choice == "second") != swapped]


def append_label(labels: Path, label: Dict[str, Any]) -> None:
    """One whole line per answer, under an exclusive lock, on disk before the next pair shows."""
    labels.parent.mkdir(parents=True, exist_ok=True)
    with locked_for_append(labels) as f:
        append_json_lines(f, labels, [label])


def review(target: str, annotator: str, labels: Optional[str] = None, show_ai: bool = False,
           stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:  # fmt: skip
    """The labelling session; returns how many pairs were labelled."""
    queue, labels_path = queue_and_labels(target, labels)
    check_writable(labels_path)
    entries = load_queue(queue)
    todo = pending(entries, labels_path)
    if not todo:
        print(f"nothing to review: all {len(entries)} queued pair(s) in {queue} are labelled in {labels_path}", file=stdout)
        return 0
    print(f"{len(todo)} of {len(entries)} queued pair(s) to label; answers go to {labels_path}", file=stdout)
    labelled, busy = 0, 0
    leases = Leases(labels_path)
    try:
        for n, entry in enumerate(todo, 1):
            if not leases.take(entry["pair_id"]):
                busy += 1  # on someone else's screen
                continue
            try:
                if entry["pair_id"] in read_human_labels(str(labels_path)):
                    continue  # answered by someone else since this session started
                answer = _show_and_ask(n, len(todo), entry, show_ai, stdin, stdout)
                if answer == "q":
                    break
                if answer != "s":
                    append_label(labels_path, {"pair_id": entry["pair_id"], "verdict": answer, "annotator": annotator, "labelled_at": time.time()})
                    labelled += 1
            finally:
                leases.release(entry["pair_id"])
    except (KeyboardInterrupt, EOFError):
        print("", file=stdout)
    finally:
        leases.close()
    left = len(pending(entries, labels_path))
    others = f", {busy} of them on someone else's screen" if busy else ""
    print(f"labelled {labelled} this session; {left} left{others} (re-run to continue)", file=stdout, flush=True)
    return labelled


def _show_and_ask(n: int, of: int, entry: Dict[str, Any], show_ai: bool, stdin: TextIO, stdout: TextIO) -> str:
    """The pair's card and the person's answer: a verdict (A / B / tie), `s` or `q`."""
    swapped, first, second = shown_order(entry)
    print(_card(n, of, entry, [first, second], show_ai), file=stdout, flush=True)
    answer = _ask(stdin, stdout)
    return answer if answer in ("s", "q") else verdict_of({"1": "first", "2": "second", "t": "tie"}[answer], swapped)


def _card(n: int, of: int, entry: Dict[str, Any], shown: List[str], show_ai: bool) -> str:
    wrap = lambda text: textwrap.indent(textwrap.fill(text, 96, replace_whitespace=False), "    ")  # noqa: E731
    lines = [f"\n--- pair {n} of {of} (routed: {', '.join(entry.get('reasons') or []) or 'doubtful'})", "request:", wrap(entry["prompt"]),
             "[1] first response:", wrap(shown[0]), "[2] second response:", wrap(shown[1])]  # fmt: skip
    if show_ai:
        lines.append(f"(AI judge said {entry['ai']['verdict']} in the original order, P(A)={entry['ai'].get('prob_a')})")
    return "\n".join(lines)


def _ask(stdin: TextIO, stdout: TextIO) -> str:
    while True:
        print(f"{KEYS} > ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            raise EOFError
        key = line.strip().lower()[:1]
        if key in ("1", "2", "t", "s", "q"):
            return key
        print(f"'{line.strip()}' is not an answer", file=stdout)
