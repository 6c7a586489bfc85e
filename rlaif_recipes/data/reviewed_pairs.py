"""The pairs people answered in review, as a human-labelled set for `audit_judge`.

`rlaif review` (or a Label Studio import) writes human_labels.jsonl beside the router's
review_queue.jsonl. Joined on pair_id (`rlaif_recipes.review.answered_pairs`, the strict join
that training on people's answers uses too) they are pairs with a person's winner: prompt, chosen,
rejected, plus who answered and what the AI judge had said. Several annotators on one pair: the
majority of their votes (each one's last vote counts once), and `annotator` names those who chose
it; ties and split votes are left out (an audit needs a winner) and counted in the log line. A
label whose pair is not in the queue is an error naming its file and line.

    rlaif audit-judge pairs=reviewed pairs.target=outputs/judge_pairs where=null group_by=[annotator]
"""

import logging
from typing import Optional, Sequence, Union

from datasets import Dataset

from rlaif_recipes.errors import DataError
from rlaif_recipes.review import answered_pairs, queue_and_labels

log = logging.getLogger(__name__)


def reviewed_pairs(target: Union[str, Sequence[str]], labels: Optional[str] = None) -> Dataset:
    """`target`: a run directory (its review_queue.jsonl and human_labels.jsonl) or a queue file,
    or a list of them (runs that share one labels file); `labels`: the human-labels file when it
    is elsewhere."""
    targets = [target] if isinstance(target, str) else list(target)
    files = [queue_and_labels(t, labels) for t in targets]
    answered, counts = answered_pairs(files)
    labels_path = ", ".join(sorted({str(lab) for _, lab in files}))
    queue = ", ".join(str(q) for q, _ in files)
    rows = [
        {
            "pair_id": a.entry["pair_id"],
            "prompt": a.entry["prompt"],
            "chosen": a.chosen,
            "rejected": a.rejected,
            "annotator": ",".join(a.annotators),
            "ai_verdict": a.entry["ai"]["verdict"],
        }
        for a in answered
    ]
    log.info("reviewed pairs from %s: %s", labels_path, counts)
    if not rows:
        raise DataError(f"{labels_path} holds no answered pair of {queue} with a winner ({counts}); "
                        f"label some with `rlaif review {targets[0]}` first")
    return Dataset.from_list(rows)
