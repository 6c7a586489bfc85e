"""People's answers as training data for the reward model (`rlaif train-reward-model feedback=[...]`).

Two kinds of source, each a `LabelledSource` (the rows, what was skipped and why, provenance):

- `review_answers(runs)`: the pairs of one or more run directories' review queues joined with the
  answers people gave (`rlaif review`, Label Studio), by the strict join audits share
  (`rlaif_recipes.review.answered_pairs`): several annotators on one pair are resolved by majority
  of their votes (each annotator's last vote counts once); a pair whose votes split evenly is
  skipped and counted, and so is a pair the majority calls a tie (a tie says neither reply is
  better: no preference to learn). An answer whose pair id is in none of the queues is an error
  naming its file and line: it belongs to another run, and training on the queues given would
  silently drop it. Each pair trains the objective of the rubric the run judged it by (the queue
  entry's AI judgment records it).
- `labelled_responses(path)`: a team's own file (CSV/JSONL/Parquet) of request, response and
  label answer/refusal: what the reward model's answer head reads. A team's harmful/benign request
  labels go to the harm reader instead, as one more file in `harm_data.sources`.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from datasets import Dataset

from rlaif_recipes.data.prompts import _FORMATS
from rlaif_recipes.data.tables import kind_of, read_table
from rlaif_recipes.errors import DataError
from rlaif_recipes.files import file_sha256
from rlaif_recipes.review import JOIN_RULE, answered_pairs, queue_and_labels

ANSWER_LABELS = {"answer": 1.0, "refusal": 0.0}


@dataclass
class LabelledSource:
    """Rows to train on: pairs (prompt, chosen, rejected, objective) or responses (prompt,
    response, answers); `counts` says what was read and skipped, `provenance` where it came from."""

    rows: Dataset
    counts: Dict[str, int] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)


def review_answers(runs: Union[str, Sequence[str]], objective: Optional[str] = None) -> LabelledSource:
    """`runs`: run directories (or review_queue.jsonl files), each with its human_labels.jsonl
    beside the queue. `objective`: train every pair on this one, instead of its run's rubric."""
    runs = [runs] if isinstance(runs, str) else list(runs)
    if not runs:
        raise DataError("review_answers needs at least one run directory (runs=[outputs/RUN])")
    files = [queue_and_labels(run) for run in runs]
    answered, counts = answered_pairs(files)
    rows = [
        {
            "pair_id": a.entry["pair_id"],
            "prompt": a.entry["prompt"],
            "chosen": a.chosen,
            "rejected": a.rejected,
            "objective": objective or ((a.entry.get("ai") or {}).get("rubric") or "").split("@")[0],
            "votes": a.votes,
        }
        for a in answered
    ]
    if not rows:
        raise DataError(f"the review answers of {runs} hold no pair with a winner ({dict(counts)}); "
                        f"label some with `rlaif review {runs[0]}` first")  # fmt: skip
    provenance = {
        "runs": [str(r) for r in runs],
        "files": {str(p): file_sha256(p) for q, lab in files for p in (q, lab) if p.is_file()},
        "rule": JOIN_RULE,
    }
    return LabelledSource(Dataset.from_list(rows), counts, provenance)


def labelled_responses(
    path: str,
    prompt_column: str = "prompt",
    response_column: str = "response",
    label_column: str = "label",
) -> LabelledSource:
    """A team's labelled responses: each row a request, a response and answer/refusal."""
    file = Path(path)
    if file.suffix not in _FORMATS or not file.is_file():
        raise DataError(f"labelled_responses: {path} must be an existing {'/'.join(sorted(_FORMATS))} file")
    table = read_table(path, [file], _FORMATS[file.suffix], "path")
    missing = [c for c in (prompt_column, response_column, label_column) if c not in table.column_names]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (columns: {table.column_names}); set prompt_column, "
                        "response_column and label_column")  # fmt: skip
    rows = []
    for i, row in enumerate(table):
        label = row[label_column]
        if label not in ANSWER_LABELS or not isinstance(row[prompt_column], str) or not isinstance(row[response_column], str):
            raise DataError(f"{path}: row {i + 1}: needs text {prompt_column} and {response_column} and {label_column} one of "
                            f"{', '.join(ANSWER_LABELS)}, got {label_column}={label!r} ({kind_of(row[response_column])} response); "
                            "fix or remove that row")  # fmt: skip
        rows.append({"prompt": row[prompt_column], "response": row[response_column], "answers": ANSWER_LABELS[label]})
    counts = dict(Counter(r["answers"] == 1.0 for r in rows))
    return LabelledSource(
        Dataset.from_list(rows),
        {"responses": len(rows), "answers": counts.get(True, 0), "refusals": counts.get(False, 0)},
        {"file": str(file), "sha256": file_sha256(file)},
    )

