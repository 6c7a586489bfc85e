"""`rlaif review QUEUE_OR_RUN_DIR`: a person labels the router's review queue in the terminal.

Each pending pair (queued, not yet labelled) shows the request and the two responses in a random
order (seeded by the pair, so a re-run shows it the same way) with the AI's verdict hidden unless
`--show-ai`, so the person is not anchored on it. One key and Enter answers: `1` / `2` for the
response shown first / second, `t` tie, `s` skip, `q` quit. Each answer is appended to the
human-labels file the router reads (one JSON line, under a file lock, flushed to disk) the moment
it is given, so a re-run continues where the last one stopped and Ctrl-C loses nothing.
"""

import fcntl
import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple

from rlaif_recipes.errors import DataError
from rlaif_recipes.judges.router import ReviewQueue, read_human_labels

KEYS = "[1] first  [2] second  [t] tie  [s] skip  [q] quit"


def queue_and_labels(target: str, labels: Optional[str] = None) -> Tuple[Path, Path]:
    """A run directory (its review_queue.jsonl and human_labels.jsonl) or a queue file."""
    path = Path(target)
    queue = path / "review_queue.jsonl" if path.is_dir() else path
    if not queue.is_file():
        raise DataError(f"no review queue at {queue}; pass a run's output_dir (judge=router) or its review_queue.jsonl")
    return queue, Path(labels) if labels else queue.parent / "human_labels.jsonl"


def pending(queue: Path, labels: Path) -> List[Dict[str, Any]]:
    done = read_human_labels(str(labels))
    return [e for e in ReviewQueue(str(queue)).entries() if e["pair_id"] not in done]


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
    with open(labels, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(json.dumps(label, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def review(target: str, annotator: str, labels: Optional[str] = None, show_ai: bool = False,
           stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:  # fmt: skip
    """The labelling session; returns how many pairs were labelled."""
    queue, labels_path = queue_and_labels(target, labels)
    todo = pending(queue, labels_path)
    total = len(ReviewQueue(str(queue)).entries())
    if not todo:
        print(f"nothing to review: all {total} queued pair(s) in {queue} are labelled in {labels_path}", file=stdout)
        return 0
    print(f"{len(todo)} of {total} queued pair(s) to label; answers go to {labels_path}", file=stdout)
    labelled = 0
    try:
        for n, entry in enumerate(todo, 1):
            swapped, first, second = shown_order(entry)
            print(_card(n, len(todo), entry, [first, second], show_ai), file=stdout, flush=True)
            answer = _ask(stdin, stdout)
            if answer == "q":
                break
            if answer == "s":
                continue
            verdict = verdict_of({"1": "first", "2": "second", "t": "tie"}[answer], swapped)
            append_label(labels_path, {"pair_id": entry["pair_id"], "verdict": verdict, "annotator": annotator, "labelled_at": time.time()})
            labelled += 1
    except (KeyboardInterrupt, EOFError):
        print("", file=stdout)
    left = len(pending(queue, labels_path))
    print(f"labelled {labelled} this session; {left} left (re-run to continue)", file=stdout, flush=True)
    return labelled


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
