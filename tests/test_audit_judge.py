"""`rlaif audit-judge`: the audit's numbers for judges whose behaviour is known in advance."""

import json
import os
from pathlib import Path
from typing import List

import pytest
from conftest import run_cli

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.data import xstest_pairs
from rlaif_recipes.judges.rules import is_refusal
from rlaif_recipes.recipes.audit_judge import AuditJudgeRecipe, AuditJudgeSettings
from rlaif_recipes.report import Bars, read_report, write_report

TESTS = Path(__file__).resolve().parent


def safe_held_out() -> List[dict]:
    return [r for r in xstest_pairs(split="held_out") if r["prompt_label"] == "safe"]


def audit_cli(tmp_path: Path, monkeypatch, *overrides: str) -> dict:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))  # test judges
    result = run_cli(["rlaif", "audit-judge", f"output_dir={tmp_path / 'out'}", *overrides], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert {"audit.json", "audit.md", "audit.png", "audit_pairs.jsonl", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert (out / "audit.png").read_bytes()[:4] == b"\x89PNG"
    assert "| position_bias_rate |" in result.stdout and "| position_bias_rate |" in (out / "audit.md").read_text()
    return read_report(str(out), "audit")["metrics"]


def audit_in_process(tmp_path: Path, *overrides: str) -> dict:
    cfg = rlaif_config.load("audit_judge", [f"output_dir={tmp_path / 'out'}", *overrides], AuditJudgeSettings)
    recipe = AuditJudgeRecipe(cfg)
    try:
        recipe.setup(cfg)
        return recipe.audit()
    finally:
        recipe.cleanup()


def per_pair(tmp_path: Path) -> List[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "audit_pairs.jsonl").read_text().splitlines()]


def test_audit_rule_judge_end_to_end(tmp_path: Path, monkeypatch) -> None:
    m = audit_cli(tmp_path, monkeypatch, "judge=rule")
    rows = safe_held_out()
    refused = [(is_refusal(r["chosen"]), is_refusal(r["rejected"])) for r in rows]
    assert m["pairs"] == len(rows) > 30
    assert m["agreement"] == pytest.approx(sum(not c and r for c, r in refused) / len(rows))
    assert m["tie_rate"] == pytest.approx(sum(c == r for c, r in refused) / len(rows))
    assert 0.5 < m["agreement"] < 1 and m["abstain_rate"] == 0
    # A rule scores each response alone: no position bias; a planted instruction at the end of a
    # refusal leaves it a refusal, so no flips either.
    assert m["position_bias_rate"] == 0 and m["first_slot_win_rate"] == pytest.approx(0.5)
    assert m["injection_flip_rate"] == 0 and m["injection_pairs"] == round(m["agreement"] * len(rows))
    labelled = [(r, c) for r, (c, rr) in zip(rows, refused) if c != rr and len(r["chosen"]) != len(r["rejected"])]
    judge_longer = sum((len(r["rejected"]) > len(r["chosen"])) == c for r, c in labelled) / len(labelled)
    human_longer = sum(len(r["chosen"]) > len(r["rejected"]) for r, _ in labelled) / len(labelled)
    assert m["length_bias"] == pytest.approx(judge_longer - human_longer)
    assert m["usage"]["queries"] == len(rows)


def test_audit_reports_agreement_per_prompt_kind_beside_the_total(tmp_path: Path) -> None:
    m = audit_in_process(tmp_path, "judge=rule", "where=null", "group_by=[prompt_label,source]")
    by_kind = m["agreement_by"]["prompt_label"]
    assert set(by_kind) == {"safe", "unsafe"} and sum(g["pairs"] for g in by_kind.values()) == m["pairs"]
    # The rule always prefers answers: right on safe requests, wrong on unsafe ones; the total mixes them.
    assert by_kind["unsafe"]["agreement"] < 0.1 < by_kind["safe"]["agreement"]
    total = sum(g["agreement"] * g["pairs"] for g in by_kind.values()) / m["pairs"]
    assert m["agreement"] == pytest.approx(total)
    assert list(m["agreement_by"]["source"]) == ["xstest_v2_completions_llama2orig"]
    with pytest.raises(ValueError, match="group_by: no column"):
        audit_in_process(tmp_path, "judge=rule", "group_by=[nope]")


def test_audit_always_a_judge_shows_position_bias(tmp_path: Path, monkeypatch) -> None:
    m = audit_cli(tmp_path, monkeypatch, "judge._component_=test_panel_router.AlwaysA", "~judge.rule", "judge.order=fixed", "max_pairs=40")
    pairs = per_pair(tmp_path)
    chosen = {r["prompt"]: r["chosen"] for r in safe_held_out()}
    assert all(p["response_" + p["human"].lower()] == chosen[p["prompt"]] for p in pairs)
    human_a = sum(p["human"] == "A" for p in pairs)
    assert m["pairs"] == len(pairs) == 40 and 0.25 < human_a / 40 < 0.75  # winners are spread over both slots
    assert m["position_bias_rate"] == 1.0 and m["first_slot_win_rate"] == 1.0 and m["position_bias_pairs"] == 40
    assert m["agreement"] == human_a / 40 and m["tie_rate"] == 0
    assert m["injection_pairs"] == human_a and m["injection_flip_rate"] == 0  # it ignores the text entirely
    sized = [p for p in pairs if len(p["response_a"]) != len(p["response_b"])]
    a_longer = sum(len(p["response_a"]) > len(p["response_b"]) for p in sized) / len(sized)
    human_longer = sum(len(p["response_" + p["human"].lower()]) > len(p["response_" + ("b" if p["human"] == "A" else "a")]) for p in sized) / len(sized)
    assert m["length_bias"] == pytest.approx(a_longer - human_longer)
    assert m["usage"]["requests"] == 40 and m["usage_all_passes"]["requests"] == 40 + human_a + 40  # swapped order: 40 new; shown order: cached


def test_audit_counts_injection_flips_of_a_judge_that_obeys_responses(tmp_path: Path) -> None:
    m = audit_in_process(tmp_path, "judge._component_=test_panel_router.Gullible", "~judge.rule", "judge.order=fixed")
    rule = audit_in_process(tmp_path / "rule", "judge=rule")
    assert m["agreement"] == rule["agreement"] and m["injection_pairs"] == rule["injection_pairs"] > 0
    assert m["injection_flip_rate"] == 1.0 and rule["injection_flip_rate"] == 0
    injected = [p for p in per_pair(tmp_path) if p["injected"] is not None]
    assert len(injected) == m["injection_pairs"] and all(p["injected"] != p["human"] == p["verdict"] for p in injected)


def test_audit_runs_composite_judges_and_order_both(tmp_path: Path) -> None:
    both = audit_in_process(tmp_path / "both", "judge._component_=test_panel_router.AlwaysA", "~judge.rule", "judge.order=both", "max_pairs=20")
    assert both["tie_rate"] == 1.0 and both["position_bias_rate"] == 1.0  # order=both hides the bias as ties
    routed = audit_in_process(tmp_path / "router", "judge=router", "max_pairs=20")
    queue = (tmp_path / "router" / "out" / "review_queue.jsonl").read_text().splitlines()
    assert routed["abstain_rate"] == sum(p["verdict"] == "abstain" for p in per_pair(tmp_path / "router")) / 20
    assert routed["abstain_rate"] > 0 and len(queue) > 0 and routed["usage"]["routed"] > 0
    panel = audit_in_process(tmp_path / "panel", "judge=panel", "max_pairs=20")
    assert panel["pairs"] == 20 and panel["usage"]["RuleJudge#1.queries"] == 20


def test_audit_names_a_bad_filter_before_judging(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"where.nope: no such column"):
        audit_in_process(tmp_path, "~where", "+where={nope: [x]}")


def test_report_writes_strict_json_markdown_and_png_atomically(tmp_path: Path) -> None:
    metrics = {"agreement": 0.5, "undefined": float("nan"), "counts": {"requests": 3}}
    paths = write_report(str(tmp_path), "r", metrics, [{"metric": "a|b", "value": 1 / 3}], title="T",
                         plot=Bars({"x": {"agreement": 0.5, "undefined": None}, "y": {"agreement": 0.25}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]  # no temp files left
    doc = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["metrics"] == {"agreement": 0.5, "undefined": None, "counts": {"requests": 3}}
    assert "| a\\|b | 0.3333 |" in paths["md"].read_text() and "![T](r.png)" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
