"""judge_pairs: generated responses -> a preference dataset that HF datasets, torchtune and the
dpo recipe read; resume, budget stop, n > 2 pairing, ties and abstains, human labels."""

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from servers import FaultServer

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import DataError
from rlaif_recipes.judges import Pair
from rlaif_recipes.judges.review_queue import pair_id
from rlaif_recipes.recipes import judge_pairs as jp
from rlaif_recipes.recipes.generate_pairs import load_generated

SHORTER = "judge.rule=rlaif_recipes.judges.rules.shorter"


def run_recipe(monkeypatch, *overrides: str) -> int:
    """The recipe in this process, exactly as `tune run ... --config judge_pairs ARGS` calls it."""
    monkeypatch.setattr(sys, "argv", ["judge_pairs", "--config", "judge_pairs", *overrides])
    return jp.recipe_main()


def write_generated(out: Path, shards: List[List[Dict]]) -> Path:
    """generate_pairs-shaped shards from hand-written rows: {prompt_id, prompt, responses}."""
    (out / "data").mkdir(parents=True)
    for s, rows in enumerate(shards):
        table = pa.table({
            "prompt_id": [r["prompt_id"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "messages": [[{"role": "user", "content": r["prompt"]}] for r in rows],
            "prompt_token_ids": [[1, 2, 3] for _ in rows],
            "responses": [r["responses"] for r in rows],
            "response_token_ids": [[[len(t)] for t in r["responses"]] for r in rows],
            "finish_reasons": [["stop"] * len(r["responses"]) for r in rows],
            "sampling": ["{}"] * len(rows),
            "policy": ["hand-written"] * len(rows),
        })  # fmt: skip
        pq.write_table(table, out / "data" / f"shard-{s:05d}.parquet")
    return out


@pytest.fixture(scope="module")
def generated(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "gen"
    result = run_cli(["tune", "run", "rlaif_recipes/recipes/generate_pairs.py", "--config", "generate_pairs",
                      f"checkpoint_dir={tiny_model_dir}", f"output_dir={out}", "data.max_prompts=12", "prompts_per_shard=4",
                      "sampler.max_tokens=8", "n=2"], cwd=out.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def judged(generated: Path) -> Path:
    out = generated.parent / "judged"
    result = run_cli(["tune", "run", "rlaif_recipes/recipes/judge_pairs.py", "--config", "judge_pairs",
                      f"input_dir={generated}", f"output_dir={out}", SHORTER], cwd=generated.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


class ChatTokenizer:
    """torchtune's ModelTokenizer protocol over the tiny checkpoint's HF tokenizer (message by
    message, so torchtune's own masking of the prompt applies)."""

    def __init__(self, checkpoint_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        self.max_seq_len = None

    def tokenize_messages(self, messages, **_):
        ids, mask = [], []
        for m in messages:
            t = self.tok.encode(m.text_content, add_special_tokens=False)
            ids += t
            mask += [m.masked] * len(t)
        return ids, mask


@pytest.mark.slow
def test_generated_pairs_become_a_preference_dataset_torchtune_and_dpo_read(
    judged: Path, generated: Path, tiny_model_dir: Path
) -> None:
    gen = {r["prompt_id"]: r for r in load_generated(str(generated))}
    prefs, dropped = jp.load_preferences(str(judged)), jp.load_preferences(str(judged), dropped=True)
    assert len(prefs) > 0 and len(prefs) + len(dropped) == len(gen) == 12
    assert sorted(p.name for p in (judged / "data").iterdir()) == sorted(
        p.name for p in (generated / "data").iterdir()
    )
    for row in prefs:
        g = gen[row["prompt_id"]]
        c, r = g["responses"].index(row["chosen_text"]), g["responses"].index(row["rejected_text"])
        assert len(row["chosen_text"]) < len(row["rejected_text"])  # the rule: shorter wins
        assert row["chosen"] == [*g["messages"], {"role": "assistant", "content": row["chosen_text"]}]
        assert row["rejected"] == [*g["messages"], {"role": "assistant", "content": row["rejected_text"]}]
        assert (row["chosen_token_ids"], row["rejected_token_ids"]) == (
            g["response_token_ids"][c],
            g["response_token_ids"][r],
        )
        assert row["prompt_token_ids"] == g["prompt_token_ids"]
        assert (row["source"], row["judge"], row["judge_model"]) == (
            "ai",
            "RuleJudge",
            "rlaif_recipes.judges.rules.shorter",
        )
        assert (row["rubric"], row["policy"], row["prob_chosen"]) == ("false_refusal@v1", g["policy"], 1.0)
    for row in dropped:
        assert row["verdict"] == "tie" and len(set(map(len, row["responses"]))) == 1
    summary = json.loads((judged / "summary.json").read_text())
    assert (summary["preferences"], summary["ties"], summary["shards_done"]) == (len(prefs), len(dropped), 3)

    # torchtune: its preference_dataset builder over the Parquet shards, columns as they are.
    from torchtune.datasets import preference_dataset

    ds = preference_dataset(
        ChatTokenizer(tiny_model_dir), source="parquet", data_files=str(judged / "data" / "*.parquet")
    )
    sample = ds[0]
    trained = [t for t in sample["chosen_labels"] if t != -100]  # the prompt is masked, the answer is not
    assert ChatTokenizer(tiny_model_dir).tok.decode(trained) == prefs[0]["chosen_text"]
    assert len(sample["chosen_input_ids"]) > len(trained)

    # TRL's conversational layout: the shared prompt turns, then one assistant turn each.
    for row in prefs:
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1]["role"] == "assistant"

    # this project's dpo recipe reads the output directory (dataset.source=OUTPUT_DIR) or one shard.
    from rlaif_recipes.data import preference_dataset as dpo_dataset

    expected = [(r["chosen_text"], r["rejected_text"]) for r in prefs]
    assert [(r["chosen"], r["rejected"]) for r in dpo_dataset(str(judged))] == expected
    shard = next(p for p in sorted((judged / "data").iterdir()) if pq.ParquetFile(p).metadata.num_rows)
    assert [(r["chosen"], r["rejected"]) for r in dpo_dataset(str(shard))] == expected[
        : pq.ParquetFile(shard).metadata.num_rows
    ]


@pytest.mark.slow
def test_resume_rejudges_only_the_missing_shard_from_the_cache(
    judged: Path, monkeypatch, tmp_path: Path
) -> None:
    out = tmp_path / "judged"
    shutil.copytree(judged, out)
    before = jp.load_preferences(str(out)).to_list()
    shards = sorted((out / "data").iterdir())
    kept = {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]}
    shards[1].unlink()
    (out / "data" / ".shard-00001.parquet.tmp").write_bytes(b"partial")
    cfg = rlaif_config.load(
        "judge_pairs",
        [f"input_dir={judged.parent / 'gen'}", f"output_dir={out}", SHORTER],
        jp.JudgePairsSettings,
    )
    recipe = jp.JudgePairsRecipe(cfg)
    recipe.setup(cfg)
    assert recipe.judge_pairs() is None
    metrics = recipe.summary()["judge_metrics"]
    recipe.cleanup()
    redone = pq.ParquetFile(judged / "data" / "shard-00001.parquet").metadata.num_rows
    redone += pq.ParquetFile(judged / "dropped" / "shard-00001.parquet").metadata.num_rows
    assert metrics["pairs"] <= redone and metrics["cache_hits"] == metrics["queries"] == metrics["pairs"] > 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir() if p.name in kept} == kept
    assert jp.load_preferences(str(out)).to_list() == before


def test_n3_round_robin_ties_abstains_and_human_labels_through_the_router(
    tmp_path: Path, monkeypatch
) -> None:
    rows = [
        {
            "prompt_id": "3way",
            "prompt": "Name a colour.",
            "responses": ["Red, a warm one", "Red", "Red is the colour of fire."],
        },
        {
            "prompt_id": "same",
            "prompt": "Say hi.",
            "responses": ["hi", "hi"],
        },  # identical: a tie, the judge is not asked
        {
            "prompt_id": "even",
            "prompt": "Pick one.",
            "responses": ["cat", "dog"],
        },  # equal length: the rule ties, the router routes
        {
            "prompt_id": "human",
            "prompt": "And now?",
            "responses": ["yes", "no!"],
        },  # a person decided this one
    ]
    gen = write_generated(tmp_path / "gen", [rows[:2], rows[2:]])
    labels = tmp_path / "human.jsonl"
    labels.write_text(
        json.dumps({"pair_id": pair_id(Pair("And now?", "yes", "no!")), "verdict": "B", "annotator": "ann"})
        + "\n"
    )
    rc = run_recipe(monkeypatch, f"input_dir={gen}", f"output_dir={tmp_path / 'out'}", "judge=router", "batch_size=2",
                    "judge.judge.rule=rlaif_recipes.judges.rules.shorter", f"judge.human_labels_path={labels}")  # fmt: skip
    assert rc == 0
    prefs = {r["prompt_id"]: r for r in jp.load_preferences(str(tmp_path / "out"))}
    dropped = {r["prompt_id"]: r for r in jp.load_preferences(str(tmp_path / "out"), dropped=True)}
    # 3 responses: shortest ("Red") has 2 wins, longest 0: they form the pair, shortest chosen.
    assert (prefs["3way"]["chosen_text"], prefs["3way"]["rejected_text"], prefs["3way"]["num_responses"]) == (
        "Red", "Red is the colour of fire.", 3)  # fmt: skip
    assert (prefs["3way"]["source"], prefs["3way"]["judge"]) == ("ai", "RuleJudge")
    assert (prefs["human"]["chosen_text"], prefs["human"]["source"], prefs["human"]["judge"]) == (
        "no!",
        "human",
        "ann",
    )
    assert (dropped["same"]["verdict"], dropped["same"]["reason"]) == ("tie", "identical responses")
    assert dropped["even"]["verdict"] == "abstain" and "review" in dropped["even"]["reason"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["preferences"], summary["ties"], summary["abstains"]) == (2, 1, 1)
    assert summary["judge_metrics"]["pairs"] == 3 + 1 + 1  # 3way's 3 comparisons, even, human; not "same"


def test_budget_stop_keeps_finished_shards_and_a_rerun_finishes_from_the_cache(
    tmp_path: Path, monkeypatch
) -> None:
    shards = [[{"prompt_id": f"{s}-{i}", "prompt": f"Question {s}.{i}?", "responses": [f"plain {s}{i}", f"WINNER {s}{i}"]}
               for i in range(4)] for s in range(3)]  # fmt: skip
    gen = write_generated(tmp_path / "gen", shards)
    out = tmp_path / "out"
    with FaultServer(marker="WINNER") as server:
        args = [f"input_dir={gen}", f"output_dir={out}", "judge=openai", f"judge.base_url={server.url}/v1",
                "judge.api_key_env=null", "judge.structured=none", "judge.order=fixed", "batch_size=4"]  # fmt: skip
        assert run_recipe(monkeypatch, *args, "judge.max_requests=6") == jp.BUDGET_EXIT
        assert [p.name for p in sorted((out / "data").iterdir())] == ["shard-00000.parquet"]
        paid = len([e for e in server.log if e["api"] == "openai"])
        assert paid == 6
        assert run_recipe(monkeypatch, *args) == 0
        assert (
            len(server.log) - paid == 12 - 6
        )  # the 2 judged pairs of the unfinished shard came from the cache
    prefs = jp.load_preferences(str(out))
    assert len(prefs) == 12 and all(r["chosen_text"].startswith("WINNER") for r in prefs)
    assert all(r["judge_model"] == "judge" and r["prob_chosen"] > 0.5 for r in prefs)


def test_bad_input_dir_fails_before_the_judge_is_built(tmp_path: Path) -> None:
    cfg = rlaif_config.load(
        "judge_pairs", [f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o'}"], jp.JudgePairsSettings
    )
    with pytest.raises(DataError, match="no generated shards in .*; set input_dir to a generate_pairs output_dir"):
        jp.JudgePairsRecipe(cfg)
