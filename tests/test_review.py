"""`rlaif review`, driven as a person drives it: through a pseudo-terminal, keys and Ctrl-C."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli

from rlaif_recipes.judges import Pair, RouterJudge, RuleJudge, Verdict
from rlaif_recipes.judges.review_queue import read_human_labels
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


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`rlaif review` on a pseudo-terminal: what a person sees, and keys typed into it."""

    def __init__(self, run_dir: Path, annotator: str = "ana", *args: str) -> None:
        master, slave = pty.openpty()
        exe = Path(sys.executable).parent / "rlaif"
        # Ctrl-C as at a person's terminal: a test runner started in the background (a shell's `&`
        # without job control) passes SIGINT on ignored, and Python then installs no handler for it.
        self.proc = subprocess.Popen([str(exe), "review", str(run_dir), "--annotator", annotator, *args], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
        os.close(slave)
        self.master, self.seen = master, ""

    def read_until(self, text: str, timeout: float = 120, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen[since:]:
            assert time.monotonic() < deadline, f"never saw {text!r}; screen:\n{self.seen[-2000:]}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the program ended
                    break
        return self.seen

    def read_card(self) -> str:
        """The next pair's card once it is on screen whole: its request (the pair's identity)."""
        start = len(self.seen)
        self.read_until("--- pair ", since=start)
        at = start + self.seen[start:].index("--- pair ")
        self.read_until("> ", since=at)
        return self.seen[at:].split("request:")[1].split("[1] first response:")[0].strip()

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


def error_lines(result: subprocess.CompletedProcess) -> list:
    return [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prompt_on_screen(screen: str, pair_number: int) -> str:
    return screen.split(f"--- pair {pair_number} of")[1].split("request:")[1].split("[1] first response:")[0].strip()


def test_a_corrupt_queue_line_is_named_and_skipped_visibly(tmp_path: Path) -> None:
    run_dir = routed_run(tmp_path)
    queue = run_dir / "review_queue.jsonl"
    lines = queue.read_text().splitlines(keepends=True)
    queue.write_text(lines[0] + '{"pair_id": "torn", "prom\n' + "".join(lines[1:]))
    before = queue.read_bytes()
    term = Terminal(run_dir)
    screen = term.read_until("> ")
    assert f"warning: {queue}: line(s) 2 are not queue entries (not JSON, or no pair_id, prompt, response_a and response_b); skipped" in screen
    assert "3 of 3 queued pair(s) to label" in screen
    term.type("q\n")
    term.read_until("labelled 0 this session; 3 left")
    assert term.close() == 0 and queue.read_bytes() == before


def test_unwritable_labels_are_refused_before_the_first_pair_shows(tmp_path: Path) -> None:
    run_dir = routed_run(tmp_path)
    (run_dir / "labels_dir").mkdir()
    before = snapshot(run_dir)
    result = run_cli(["rlaif", "review", str(run_dir), "--labels", str(run_dir / "labels_dir")], cwd=tmp_path)
    assert result.returncode == 2 and "--- pair" not in result.stdout
    assert error_lines(result) == [
        f"rlaif: error: cannot write human labels to {run_dir / 'labels_dir'} (Is a directory); fix its permissions or pass --labels PATH"]
    assert snapshot(run_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_a_read_only_labels_file_is_refused_before_the_first_pair_shows(tmp_path: Path) -> None:
    run_dir = routed_run(tmp_path)
    labels_file = run_dir / "human_labels.jsonl"
    labels_file.write_text("")
    labels_file.chmod(0o444)
    result = run_cli(["rlaif", "review", str(run_dir)], cwd=tmp_path)
    assert result.returncode == 2 and "--- pair" not in result.stdout
    assert error_lines(result) == [
        f"rlaif: error: cannot write human labels to {labels_file} (Permission denied); fix its permissions or pass --labels PATH"]


def test_an_import_of_unknown_tasks_says_what_was_skipped_and_fails(tmp_path: Path) -> None:
    run_dir = routed_run(tmp_path)
    choice = {"result": [{"type": "choices", "value": {"choices": ["first"]}}], "completed_by": 7}
    export = [{"data": {"pair_id": "0123456789abcdef01234567", "swapped": False}, "annotations": [choice]},
              {"data": {"pair_id": "fedcba9876543210fedcba98"}, "annotations": [choice]}]  # fmt: skip
    queued = json.loads((run_dir / "review_queue.jsonl").read_text().splitlines()[0])
    export.append({"data": {"pair_id": queued["pair_id"]}, "annotations": []})  # exported, never answered
    (tmp_path / "export.json").write_text(json.dumps(export))
    before = snapshot(run_dir)
    result = run_cli(["rlaif", "review", str(run_dir), "--import-label-studio", str(tmp_path / "export.json")], cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result) == [
        f"rlaif: error: added 0 human label(s) from 3 task(s) in {tmp_path / 'export.json'}; skipped 3: 2 with a pair_id not in the "
        "queue (unknown pair id); 1 without a choice (no annotation, cancelled, or no first/second/tie); nothing imported: export the "
        f"project that was made from {run_dir / 'review_queue.jsonl'}'s tasks, after labelling"]
    assert snapshot(run_dir) == before


def test_two_people_label_one_queue_at_once_while_the_router_reads_their_answers(tmp_path: Path) -> None:
    """Two `rlaif review` processes on one queue: a pair on one screen is passed over by the other,
    every answer is kept once with its annotator, and a router reading the labels meanwhile
    (a judge_pairs re-run) reads whole lines only."""
    run_dir = routed_run(tmp_path)
    reads, errors, stop = [], [], threading.Event()

    def router_reading() -> None:
        while not stop.is_set():
            try:
                reads.append(len(read_human_labels(str(run_dir / "human_labels.jsonl"))))
            except Exception as e:  # a torn line would be a DataError here
                errors.append(e)
            time.sleep(0.01)

    reader = threading.Thread(target=router_reading)
    reader.start()
    try:
        ana = Terminal(run_dir, "ana")
        ana_first = ana.read_card()
        bo = Terminal(run_dir, "bo")
        bo_first = bo.read_card()
        assert bo_first != ana_first  # ana's pair is leased to her: bo gets the next one
        ana.type("t\n")  # ana answers and goes on past bo's pair to the one nobody holds
        ana_second = ana.read_card()
        assert ana_second not in (ana_first, bo_first)
        bo.type("1\n")  # bo answers; the rest are answered or on ana's screen: bo is done
        bo.read_until("labelled 1 this session; 1 left, 1 of them on someone else's screen")
        assert bo.close() == 0
        ana.type("2\n")
        ana.read_until("labelled 2 this session; 0 left")
        assert ana.close() == 0
    finally:
        stop.set()
        reader.join()
    got = labels(run_dir)
    assert sorted(g["annotator"] for g in got) == ["ana", "ana", "bo"] and len({g["pair_id"] for g in got}) == 3
    assert errors == [] and reads == sorted(reads) and reads[-1] == 3  # whole lines only, none ever lost
    rule = RuleJudge(rule="rlaif_recipes.judges.rules.answers_instead_of_refusing", order="fixed")
    router = RouterJudge(rule, review_path=str(run_dir / "review_queue.jsonl"), human_labels_path=str(run_dir / "human_labels.jsonl"),
                         high_stakes=[PromptMatches(["bread"])])  # fmt: skip
    assert sorted(j.judge for j in router.judge(PAIRS)) == ["ana", "ana", "bo"]
