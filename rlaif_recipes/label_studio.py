"""The review queue to Label Studio and back, for labelling teams that work there.

    rlaif review RUN_DIR --export-label-studio tasks.json    # + label_config.xml beside it
    rlaif review RUN_DIR --import-label-studio export.json   # Label Studio's JSON export

Each pending pair becomes a task whose two responses are shown as "first" and "second" in a random
order (seeded by the pair, the AI's verdict left out, as in `rlaif review`); the task keeps the
order in `data.swapped`, so an answer maps back to A / B. The labelling config asks one of
first / second / tie (a `Choices` tag); an export made with Label Studio's `Pairwise` template
(left / right) is read too. Imported answers are appended to the human-labels file the router
reads, with the annotator Label Studio recorded.
"""

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from rlaif_recipes.errors import DataError
from rlaif_recipes.files import atomic_write_text
from rlaif_recipes.review import (
    append_label,
    check_writable,
    load_queue,
    pending,
    queue_and_labels,
    shown_order,
    verdict_of,
)

LABEL_CONFIG = """<View>
  <Header value="Which response is better for this request?"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="First response"/>
  <Text name="first" value="$first"/>
  <Header value="Second response"/>
  <Text name="second" value="$second"/>
  <Choices name="verdict" toName="prompt" choice="single" required="true">
    <Choice value="first"/>
    <Choice value="second"/>
    <Choice value="tie"/>
  </Choices>
</View>
"""


def export_tasks(target: str, out: str, labels: Optional[str] = None) -> int:
    """Write the pending pairs as Label Studio tasks (and the labelling config beside them)."""
    queue, labels_path = queue_and_labels(target, labels)
    tasks = []
    for entry in pending(load_queue(queue), labels_path):
        swapped, first, second = shown_order(entry)
        tasks.append({"data": {"pair_id": entry["pair_id"], "prompt": entry["prompt"], "first": first, "second": second, "swapped": swapped}})
    path = Path(out)
    atomic_write_text(path, json.dumps(tasks, indent=2, ensure_ascii=False))
    atomic_write_text(path.with_name("label_config.xml"), LABEL_CONFIG)
    return len(tasks)


def import_annotations(target: str, export: str, labels: Optional[str] = None) -> str:
    """Append the verdicts of a Label Studio JSON export to the human labels; returns what it did,
    with how many tasks it skipped and why. Nothing imported from a non-empty export is an error."""
    queue, labels_path = queue_and_labels(target, labels)
    try:
        tasks = json.loads(Path(export).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{export} is not a Label Studio JSON export ({e}); export the project as JSON") from None
    if not isinstance(tasks, list):
        raise DataError(f"{export} is not a Label Studio JSON export (a list of tasks); export the project as JSON")
    check_writable(labels_path)
    entries = load_queue(queue)
    queued = {e["pair_id"] for e in entries}
    waiting = {e["pair_id"] for e in pending(entries, labels_path)}
    added, skipped = 0, Counter()
    for task in tasks:
        data = task.get("data") if isinstance(task, dict) else None
        pair = data.get("pair_id") if isinstance(data, dict) else None
        answer = _latest_answer(task.get("annotations") or []) if pair in waiting else None
        if answer is None:
            skipped[_why_skipped(pair, queued, waiting)] += 1
            continue
        choice, annotator = answer
        append_label(labels_path, {"pair_id": pair, "verdict": verdict_of(choice, bool(data.get("swapped"))), "annotator": annotator,
                                   "labelled_at": time.time(), "tool": "label_studio"})  # fmt: skip
        waiting.discard(pair)  # a task exported twice counts once
        added += 1
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    report = f"added {added} human label(s) from {len(tasks)} task(s) in {export}" + (f"; skipped {sum(skipped.values())}: {why}" if why else "")
    if tasks and not added:
        raise DataError(f"{report}; nothing imported: export the project that was made from {queue}'s tasks, after labelling")
    return report


def _why_skipped(pair: Any, queued: Set[str], waiting: Set[str]) -> str:
    if pair is None:
        return "without a pair_id (not a task exported by rlaif review)"
    if pair not in queued:
        return "with a pair_id not in the queue (unknown pair id)"
    if pair not in waiting:
        return "already labelled"
    return "without a choice (no annotation, cancelled, or no first/second/tie)"


def _latest_answer(annotations: List[Dict[str, Any]]) -> Optional[tuple]:
    """(first | second | tie, annotator) of the newest annotation that was not cancelled."""
    for annotation in reversed(annotations):
        if annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result", []):
            value = result.get("value", {})
            choice = (value.get("choices") or [None])[0] if result.get("type") == "choices" else {
                "left": "first", "right": "second"}.get(value.get("selected"))  # fmt: skip
            if choice in ("first", "second", "tie"):
                who = annotation.get("completed_by")
                return choice, str(who.get("email") or who.get("id")) if isinstance(who, dict) else str(who)
    return None
