"""`rlaif review`, driven as a person drives it: through a pseudo-terminal, keys and Ctrl-C."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlaif_recipes.judges import Pair, RouterJudge, RuleJudge, Verdict
from rlaif_recipes.judges.router import PromptMatches

PAIRS = [Pair(f"How do I bake bread number {i}?", f"Mix flour, water and yeast, then bake loaf {i}.", "I can't help with that.")
         for i in range(3)]  # fmt: skip


def routed_run(tmp_path: Path) -> Path:
    """A run directory whose router sent every pair to people (a high-stakes pattern every request matches)."""
    rule = RuleJudge(rule="rlaif_recipes.judges.rules.answers_instead_of_refusing", order="fixed")
    router = RouterJudge(rule, review_path=str(tmp_path / "review_queue.jsonl"),
                         human_labels_path=str(tmp_path / "human_labels.jsonl"), high_stakes=[PromptMatches(["bread"])])  # fmt: skip
    assert all(j.verdict is Verdict.ABSTAIN for j in router.judge(PAIRS))
    return tmp_path


class Terminal:
    """`rlaif review` on a pseudo-terminal: what a person sees, and keys typed into it."""

    def __init__(self, run_dir: Path) -> None:
        master, slave = pty.openpty()
        exe = Path(sys.executable).parent / "rlaif"
        self.proc = subprocess.Popen([str(exe), "review", str(run_dir), "--annotator", "ana"], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True)  # fmt: skip
        os.close(slave)
        self.master, self.seen = master, ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"never saw {text!r}; screen:\n{self.seen[-2000:]}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the program ended
                    break
        return self.seen

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def shown_first(screen: str, pair_number: int) -> str:
    card = screen.split(f"--- pair {pair_number} of")[1]
    return card.split("[1] first response:")[1].split("[2] second response:")[0].strip()


def labels(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "human_labels.jsonl").read_text().splitlines()]


def test_a_person_labels_the_queue_stops_with_ctrl_c_and_a_rerun_continues(tmp_path: Path) -> None:
    run_dir = routed_run(tmp_path)
    term = Terminal(run_dir)
    screen = term.read_until("> ")
    assert "3 of 3 queued pair(s) to label" in screen and "--- pair 1 of 3" in screen and "AI judge" not in screen
    answer_first = "Mix flour" in shown_first(screen, 1)
    term.type("1\n" if answer_first else "2\n")  # the person prefers the answer, wherever it is shown
    term.read_until("--- pair 2 of 3")
    term.type("x\n")
    term.read_until("'x' is not an answer")
    term.type("s\n")  # skipped: stays in the queue
    term.read_until("--- pair 3 of 3")
    os.killpg(term.proc.pid, signal.SIGINT)  # Ctrl-C in the middle of pair 3
    term.read_until("labelled 1 this session; 2 left")
    assert term.close() == 0
    first = labels(run_dir)
    assert len(first) == 1 and first[0]["verdict"] == "A" and first[0]["annotator"] == "ana"  # A: the answer, as queued

    term = Terminal(run_dir)  # the re-run shows only what is left
    screen = term.read_until("> ")
    assert "2 of 3 queued pair(s) to label" in screen
    term.type("t\n")
    term.read_until("--- pair 2 of 2")
    term.type("q\n")
    term.read_until("labelled 1 this session; 1 left")
    assert term.close() == 0
    assert [label["verdict"] for label in labels(run_dir)] == ["A", "tie"]

    # the router takes the people's labels on its next run
    rule = RuleJudge(rule="rlaif_recipes.judges.rules.answers_instead_of_refusing", order="fixed")
    router = RouterJudge(rule, review_path=str(run_dir / "review_queue.jsonl"), human_labels_path=str(run_dir / "human_labels.jsonl"),
                         high_stakes=[PromptMatches(["bread"])])  # fmt: skip
    judged = router.judge(PAIRS)
    assert sorted(j.source for j in judged) == ["ai", "human", "human"] and Verdict.A in [j.verdict for j in judged]


def test_label_studio_round_trip_feeds_the_router_and_the_audit(tmp_path: Path) -> None:
    """Export the queue as Label Studio tasks, answer them as Label Studio's JSON export records
    answers (one in its Choices layout, one in its Pairwise layout, one cancelled), import them back."""
    run_dir = routed_run(tmp_path)
    exe = str(Path(sys.executable).parent / "rlaif")
    tasks_path = tmp_path / "tasks.json"
    out = subprocess.run([exe, "review", str(run_dir), "--export-label-studio", str(tasks_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "wrote 3 task(s)" in out.stdout, out.stderr[-2000:]
    tasks = json.loads(tasks_path.read_text())
    assert "<Choices name=\"verdict\"" in (tmp_path / "label_config.xml").read_text()
    assert all("ai" not in t["data"] and {"prompt", "first", "second", "swapped"} <= set(t["data"]) for t in tasks)

    def answering(task, result, cancelled=False):  # Label Studio's export: the task plus its annotations
        return {**task, "id": 1, "annotations": [{"result": [result], "was_cancelled": cancelled, "completed_by": {"email": "lee@team"}}]}

    def the_answer(task):  # the annotator picks the real answer, wherever Label Studio showed it
        return "first" if "Mix flour" in task["data"]["first"] else "second"

    export = [
        answering(tasks[0], {"from_name": "verdict", "to_name": "prompt", "type": "choices", "value": {"choices": [the_answer(tasks[0])]}}),
        answering(tasks[1], {"from_name": "pw", "to_name": "first,second", "type": "pairwise",
                             "value": {"selected": "left" if the_answer(tasks[1]) == "first" else "right"}}),  # fmt: skip
        answering(tasks[2], {"type": "choices", "value": {"choices": ["tie"]}}, cancelled=True),
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    out = subprocess.run([exe, "review", str(run_dir), "--import-label-studio", str(tmp_path / "export.json")], capture_output=True, text=True)
    assert out.returncode == 0 and "added 2 human label(s)" in out.stdout, out.stderr[-2000:]
    got = labels(run_dir)
    assert [(g["verdict"], g["annotator"], g["tool"]) for g in got] == [("A", "lee@team", "label_studio")] * 2

    rule = RuleJudge(rule="rlaif_recipes.judges.rules.answers_instead_of_refusing", order="fixed")
    router = RouterJudge(rule, review_path=str(run_dir / "review_queue.jsonl"), human_labels_path=str(run_dir / "human_labels.jsonl"),
                         high_stakes=[PromptMatches(["bread"])])  # fmt: skip
    judged = router.judge(PAIRS)
    humans = [j for j in judged if j.source == "human"]
    assert len(humans) == 2 and all(j.verdict is Verdict.A for j in humans)  # the people's verdicts, ready for the audit

    # the audit scores the AI judge against the people: a second annotator prefers the refusal on
    # the third pair (the rule judge disagrees there), and a tie is left out
    third = next(e for e in map(json.loads, (run_dir / "review_queue.jsonl").read_text().splitlines()) if "number 2" in e["prompt"])
    with open(run_dir / "human_labels.jsonl", "a") as f:
        f.write(json.dumps({"pair_id": third["pair_id"], "verdict": "B", "annotator": "sam"}) + "\n")
    audit = subprocess.run([exe, "run", "audit_judge", f"output_dir={tmp_path / 'audit'}", "judge=rule",
                            "pairs=reviewed", f"pairs.target={run_dir}", "where=null",
                            "group_by=[annotator]"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert audit.returncode == 0, audit.stderr[-3000:]
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())["metrics"]
    assert report["pairs"] == 3 and report["agreement"] == pytest.approx(2 / 3)
    assert report["agreement_by"]["annotator"] == {"lee@team": {"agreement": 1.0, "pairs": 2}, "sam": {"agreement": 0.0, "pairs": 1}}
