"""The pairs people answered in review, as a human-labelled set for `audit_judge`.

`rlaif review` (or a Label Studio import) writes human_labels.jsonl beside the router's
review_queue.jsonl. Joined on pair_id they are pairs with a person's winner: prompt, chosen,
rejected, plus who answered and what the AI judge had said. Ties are left out (an audit needs a
winner) and counted in the log line; so are labels whose pair is not in the queue.

    rlaif audit-judge pairs=reviewed pairs.target=outputs/judge_pairs where=null group_by=[annotator]
"""

import logging
from typing import Optional

from datasets import Dataset

from rlaif_recipes.errors import DataError
from rlaif_recipes.judges.router import ReviewQueue, read_human_labels
from rlaif_recipes.review import queue_and_labels

log = logging.getLogger(__name__)


def reviewed_pairs(target: str, labels: Optional[str] = None) -> Dataset:
    """`target`: a run directory (its review_queue.jsonl and human_labels.jsonl) or a queue file;
    `labels`: the human-labels file when it is elsewhere."""
    queue, labels_path = queue_and_labels(target, labels)
    answers = read_human_labels(str(labels_path))
    queued = {e["pair_id"]: e for e in ReviewQueue(str(queue)).entries()}
    rows, ties, unknown = [], 0, 0
    for pid, label in answers.items():
        entry = queued.get(pid)
        if entry is None:
            unknown += 1
        elif label["verdict"] == "tie":
            ties += 1
        else:
            a_wins = label["verdict"] == "A"
            rows.append({
                "pair_id": pid,
                "prompt": entry["prompt"],
                "chosen": entry["response_a"] if a_wins else entry["response_b"],
                "rejected": entry["response_b"] if a_wins else entry["response_a"],
                "annotator": label.get("annotator") or "unknown",
                "ai_verdict": entry["ai"]["verdict"],
            })
    log.info("reviewed pairs from %s: %d with a winner, %d ties left out, %d labels for pairs not in the queue",
             labels_path, len(rows), ties, unknown)
    if not rows:
        raise DataError(f"{labels_path} holds no answered pair of {queue} with a winner ({ties} ties); "
                        f"label some with `rlaif review {target}` first")
    return Dataset.from_list(rows)
