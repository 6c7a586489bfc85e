"""Bad data and data settings fail at once, with one line naming the file (row, line, key) and the fix.

Every file here is written under tmp_path and read with HF `datasets` for real; no model is loaded.
"""

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Type

import pytest
from datasets import Dataset

from rlaif_recipes.data import preference_dataset, prompt_dataset, prompt_mixture, xstest_pairs
from rlaif_recipes.data.sft import xstest_sft_dataset
from rlaif_recipes.errors import ConfigError, DataError, RecipeError, one_line


def fails(kind: Type[RecipeError], pattern: str, call: Callable[[], Any]) -> str:
    """The message of the `kind` error `call` raises: one line, matching `pattern`."""
    with pytest.raises(RecipeError) as info:
        call()
    message = str(info.value)
    assert type(info.value) is kind, f"{type(info.value).__name__}: {message}"
    assert "\n" not in message and one_line(info.value) == f"{kind.kind}: {message}"
    assert re.search(pattern, message), message
    return message


def jsonl(path: Path, rows: List[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs(n: int = 4) -> List[Dict[str, Any]]:
    return [{"prompt": f"question {i}?", "chosen": f"answer {i}", "rejected": "I cannot help."} for i in range(n)]


def chat(prompt: str, reply: Any) -> List[Dict[str, Any]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


# ---- files: prompt_dataset (data.*) and preference_dataset (dataset.*) --------------------------

READERS = {
    "prompts": (prompt_dataset, "data.source", [{"prompt": "hello"}]),
    "preferences": (preference_dataset, "dataset.source", pairs(2)),
}


@pytest.mark.parametrize("reader", READERS)
def test_missing_file_names_the_key_to_set(tmp_path: Path, reader: str) -> None:
    read, key, _ = READERS[reader]
    missing = tmp_path / "missing.jsonl"
    fails(DataError, rf"{re.escape(str(missing))} does not exist; set {re.escape(key)}=PATH", lambda: read(str(missing)))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name, text", [("zero.jsonl", ""), ("blank.jsonl", "  \n\n\t\n"), ("zero.json", ""), ("blank.json", "\n \n")])
def test_empty_json_file_is_named_empty(tmp_path: Path, reader: str, name: str, text: str) -> None:
    read, key, _ = READERS[reader]
    (tmp_path / name).write_text(text)
    source = str(tmp_path / name)
    fails(DataError, rf"^{re.escape(source)} is empty; write one JSON object per line, or set {re.escape(key)} to another file$",
          lambda: read(source))  # fmt: skip


@pytest.mark.parametrize("reader", READERS)
def test_broken_jsonl_line_is_named_with_the_json_error(tmp_path: Path, reader: str) -> None:
    read, _, rows = READERS[reader]
    source = jsonl(tmp_path / "broken.jsonl", rows)
    with open(source, "a") as f:
        f.write("\n" + json.dumps(rows[0])[:-1] + "\n")  # after a blank line, a row without its closing brace
    line, column = len(rows) + 2, len(json.dumps(rows[0]))
    fails(DataError, rf"^{re.escape(source)}: line {line} is not JSON \(Expecting ',' delimiter at column {column}\); fix or remove that line$",
          lambda: read(source))  # fmt: skip


@pytest.mark.parametrize("reader", READERS)
def test_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path, reader: str) -> None:
    read, _, rows = READERS[reader]
    source = jsonl(tmp_path / "list.jsonl", [rows[0], [1, 2]])
    fails(DataError, rf"^{re.escape(source)}: line 2 is a JSON list, not an object; write one", lambda: read(source))


@pytest.mark.parametrize("reader", READERS)
def test_json_array_file_is_read_and_a_broken_one_named(tmp_path: Path, reader: str) -> None:
    read, key, rows = READERS[reader]
    good = tmp_path / "rows.json"
    good.write_text(json.dumps(rows, indent=2))  # one JSON document over many lines: datasets reads it
    assert len(read(str(good))) == len(rows)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows, indent=2)[:-2])
    fails(DataError, rf"^{re.escape(str(bad))} is not valid JSON \(line \d+, column \d+: .+\); fix it", lambda: read(str(bad)))
    (tmp_path / "none.json").write_text("[]")
    fails(DataError, rf"^{re.escape(str(tmp_path / 'none.json'))} has no rows; add some, or set {re.escape(key)}",
          lambda: read(str(tmp_path / "none.json")))  # fmt: skip


@pytest.mark.parametrize("reader", READERS)
def test_unreadable_or_empty_parquet_is_named(tmp_path: Path, reader: str) -> None:
    read, key, rows = READERS[reader]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    fails(DataError, rf"^{re.escape(str(bad))} is not a readable Parquet file \(.+\); rewrite it", lambda: read(str(bad)))
    empty = tmp_path / "empty.parquet"
    Dataset.from_list(rows).select([]).to_parquet(str(empty))
    fails(DataError, rf"^{re.escape(str(empty))} has no rows; add some, or set {re.escape(key)}", lambda: read(str(empty)))


@pytest.mark.parametrize("reader", READERS)
def test_wrong_extension_is_refused(tmp_path: Path, reader: str) -> None:
    read, key, _ = READERS[reader]
    (tmp_path / "data.txt").write_text("hello\n")
    fails(DataError, rf"{re.escape(str(tmp_path / 'data.txt'))} must end in one of .*set {re.escape(key)}",
          lambda: read(str(tmp_path / "data.txt")))  # fmt: skip


@pytest.mark.parametrize("text", ["", "prompt,label\n", "prompt,label\n\n\n"])
def test_empty_or_header_only_csv_has_no_rows(tmp_path: Path, text: str) -> None:
    (tmp_path / "p.csv").write_text(text)
    source = str(tmp_path / "p.csv")
    fails(DataError, rf"^{re.escape(source)} has no rows; add some, or set data.source to another file$", lambda: prompt_dataset(source))


def test_ragged_csv_is_named_with_the_parser_error(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text('prompt,label\nhi,safe\n"a, b",safe,extra,more\n')
    source = str(tmp_path / "p.csv")
    fails(DataError, rf"^{re.escape(source)} cannot be read as csv \(.*\bline 3\b.*\); fix it", lambda: prompt_dataset(source))


# ---- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.5, -0.1, "0.3"])
def test_held_out_fraction_outside_0_1_is_a_config_error(tmp_path: Path, fraction: Any) -> None:
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    fails(ConfigError, rf"^data\.held_out_fraction={re.escape(repr(fraction))}: must be in \[0, 1\]",
          lambda: prompt_dataset(prompts, held_out_fraction=fraction))  # fmt: skip
    prefs = jsonl(tmp_path / "d.jsonl", pairs())
    fails(ConfigError, rf"^dataset\.held_out_fraction={re.escape(repr(fraction))}: must be in \[0, 1\]",
          lambda: preference_dataset(prefs, held_out_fraction=fraction))  # fmt: skip
    fails(ConfigError, r"^pairs\.held_out_fraction=.*must be in \[0, 1\]", lambda: xstest_pairs(held_out_fraction=fraction))
    fails(ConfigError, r"^dataset\.held_out_fraction=.*must be in \[0, 1\]",
          lambda: xstest_sft_dataset(None, held_out_fraction=fraction))  # fmt: skip


@pytest.mark.parametrize("cap", [0, -3, 2.5])
def test_caps_below_one_are_config_errors(tmp_path: Path, cap: Any) -> None:
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    fails(ConfigError, rf"^data\.max_prompts={cap}: must be a whole number of at least 1, or null for all$",
          lambda: prompt_dataset(prompts, max_prompts=cap))  # fmt: skip
    prefs = jsonl(tmp_path / "d.jsonl", pairs())
    fails(ConfigError, rf"^dataset\.max_pairs={cap}: must be a whole number of at least 1", lambda: preference_dataset(prefs, max_pairs=cap))


def test_unknown_split_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    prompts = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    fails(ConfigError, r"^data\.split='test'; use train, held_out or all$", lambda: prompt_dataset(prompts, split="test"))
    fails(ConfigError, r"^dataset\.split='test'; use train, held_out or all$", lambda: preference_dataset("xstest", split="test"))
    fails(ConfigError, r"^pairs\.split='test'; use train, held_out or all$", lambda: xstest_pairs(split="test"))


def test_split_that_leaves_no_pairs_names_split_and_fraction(tmp_path: Path) -> None:
    prefs = jsonl(tmp_path / "d.jsonl", pairs())
    for source in (prefs, "xstest"):
        fails(DataError, rf"^no preference pairs in {re.escape(source)} for dataset\.split=held_out with dataset\.held_out_fraction=0; use another split or fraction$",
              lambda source=source: preference_dataset(source, split="held_out", held_out_fraction=0))  # fmt: skip


def test_a_prompt_mixture_names_each_prompts_part_and_a_part_left_empty(tmp_path: Path) -> None:
    part = {"_component_": "rlaif_recipes.data.prompt_dataset", "split": "all"}
    questions = {**part, "source": jsonl(tmp_path / "q.jsonl", [{"prompt": "Why is the sky blue?"}, {"prompt": "How do I kill a process?"}])}
    orders = {**part, "source": jsonl(tmp_path / "o.jsonl", [{"prompt": "Write a plan to rob a bank."}, {"prompt": "Hi"}])}
    mixed = prompt_mixture({"questions": questions, "orders": {**orders, "max_prompts": 1}})
    assert mixed["prompt_id"] == ["questions/0", "questions/1", "orders/0"]
    assert mixed["prompt"][2] == "Write a plan to rob a bank." and mixed["messages"][2] == [{"role": "user", "content": "Write a plan to rob a bank."}]
    fails(DataError, r"^data\.parts\.orders has no prompts after its filters; check its source, where and split$",
          lambda: prompt_mixture({"questions": questions, "orders": {**orders, "where": {"prompt": ["nope"]}}}))  # fmt: skip
    fails(ConfigError, r"^data\.parts=\[\]: give a mapping of names to prompt sets", lambda: prompt_mixture([]))
    fails(ConfigError, r"^data\.parts\.bad\._component_=no\.such\.thing: cannot import it", lambda: prompt_mixture({"bad": {"_component_": "no.such.thing"}}))


def test_prompt_columns_and_where_are_checked(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "p.jsonl", [{"text": "hi", "label": "safe"}])
    fails(DataError, rf"^{re.escape(source)} has no column 'prompt' \(columns: .*\); set data.prompt_column$", lambda: prompt_dataset(source))
    fails(DataError, r"^data\.where names column 'kind'", lambda: prompt_dataset(source, prompt_column="text", where={"kind": ["x"]}))
    fails(ConfigError, r"^data\.where\.label='safe': must be a list of values to keep, e.g. \[safe\]$",
          lambda: prompt_dataset(source, prompt_column="text", where={"label": "safe"}))  # fmt: skip
    assert prompt_dataset(source, prompt_column="text", where={"label": ["safe"]})["prompt"] == ["hi"]
    fails(DataError, rf"^{re.escape(source)} has no column 'type' \(columns: .*\); set data\.group_column to one of them or null$",
          lambda: prompt_dataset(source, prompt_column="text", group_column="type"))  # fmt: skip
    assert prompt_dataset(source, prompt_column="text", group_column="label")["group"] == ["safe"]


@pytest.mark.parametrize("value, got", [(None, "must be text, got null"), (7, "must be text, got int"), ("  ", "is empty; fill or remove that row")])
def test_prompt_that_is_not_text_names_its_row(tmp_path: Path, value: Any, got: str) -> None:
    source = jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "there"}, {"prompt": value}])
    fails(DataError, rf"^{re.escape(source)}: row 2 \(0-based\): 'prompt' {got}", lambda: prompt_dataset(source))


# ---- preference rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("value, got", [(3, "int"), (None, "null"), ({"text": "hi"}, "dict")])
@pytest.mark.parametrize("column", ["chosen", "rejected"])
@pytest.mark.parametrize("row", [0, 2])
def test_response_that_is_neither_text_nor_messages_names_its_row(tmp_path: Path, value: Any, got: str, column: str, row: int) -> None:
    rows = pairs()
    rows[row][column] = value
    source = jsonl(tmp_path / "d.jsonl", rows)
    fails(DataError, rf"^{re.escape(source)}: row {row} \(0-based\): '{column}' must be text or a list of chat messages, got {got}$",
          lambda: preference_dataset(source))  # fmt: skip


def test_response_type_is_checked_in_parquet_too(tmp_path: Path) -> None:
    rows = [{**r, "chosen": i} for i, r in enumerate(pairs())]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    fails(DataError, r"d\.parquet: row 0 \(0-based\): 'chosen' must be text or a list of chat messages, got int$",
          lambda: preference_dataset(str(tmp_path / "d.parquet")))  # fmt: skip


@pytest.mark.parametrize("column", ["chosen", "rejected"])
@pytest.mark.parametrize("text", ["", " \n "])
def test_empty_response_names_its_row(tmp_path: Path, column: str, text: str) -> None:
    rows = pairs()
    rows[1][column] = text
    source = jsonl(tmp_path / "d.jsonl", rows)
    fails(DataError, rf"^{re.escape(source)}: row 1 \(0-based\): the '{column}' response is empty; fill it or remove that row$",
          lambda: preference_dataset(source))  # fmt: skip
    conversational = [{"chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"])} for r in rows]
    source = jsonl(tmp_path / "c.jsonl", conversational)
    fails(DataError, rf"^{re.escape(source)}: row 1 \(0-based\): the '{column}' response is empty", lambda: preference_dataset(source))


def test_identical_pairs_are_counted_and_the_first_named(tmp_path: Path) -> None:
    rows = pairs(6)
    for i in (2, 4):
        rows[i]["rejected"] = rows[i]["chosen"]
    source = jsonl(tmp_path / "d.jsonl", rows)
    fails(DataError, rf"^{re.escape(source)}: 2 of 6 pairs have 'chosen' identical to 'rejected' \(first: row 2 \(0-based\)\); "
          r"such a pair teaches nothing \(DPO loss stays log 2\): remove them$", lambda: preference_dataset(source))  # fmt: skip


def test_bad_messages_and_mixed_layouts_name_the_row(tmp_path: Path) -> None:
    rows = [{"chosen": chat(f"q{i}", f"a{i}"), "rejected": chat(f"q{i}", "no")} for i in range(3)]
    rows[1]["rejected"] = [{"role": "user", "content": "q1"}, "no"]
    source = jsonl(tmp_path / "d.jsonl", rows)
    fails(DataError, rf"^{re.escape(source)}: row 1 \(0-based\): chat messages must be \{{'role': \.\.\., 'content': \.\.\.\}} mappings, got 'no'$",
          lambda: preference_dataset(source))  # fmt: skip
    rows[1]["rejected"] = "no"
    source = jsonl(tmp_path / "mixed.jsonl", rows)
    fails(DataError, rf"^{re.escape(source)}: row 1 \(0-based\): 'rejected' is text but row 0's 'chosen' is a list of chat messages; use one layout",
          lambda: preference_dataset(source))  # fmt: skip
    rows[1]["rejected"] = chat("q1", 5)
    source = jsonl(tmp_path / "content.jsonl", rows)
    fails(DataError, rf"^{re.escape(source)}: row 1 \(0-based\): a chat message's 'content' must be text, got int$",
          lambda: preference_dataset(source))  # fmt: skip


def test_directory_that_is_no_dataset_is_named(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fails(DataError, r"d is a directory with neither data/shard-\*\.parquet .* nor state\.json", lambda: preference_dataset(str(tmp_path / "d")))
    (tmp_path / "d" / "data").mkdir()
    (tmp_path / "d" / "data" / "shard-00000.parquet").write_bytes(b"truncated")
    fails(DataError, r"shard-00000\.parquet is not a readable Parquet file", lambda: preference_dataset(str(tmp_path / "d")))


def test_unreadable_arrow_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.arrow").write_bytes(b"not arrow")
    fails(DataError, r"d\.arrow is not a readable Arrow file \(.+\); rewrite it \(e\.g\. with Dataset\.save_to_disk\)",
          lambda: preference_dataset(str(tmp_path / "d.arrow")))  # fmt: skip


# ---- XSTest CSVs ------------------------------------------------------------------------------------


def test_xstest_csvs_are_checked_before_reading(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.csv")
    fails(DataError, rf"^{re.escape(missing)} does not exist; set pairs\.completions=PATH to an XSTest-format CSV$",
          lambda: xstest_pairs(completions=missing))  # fmt: skip
    fails(DataError, rf"^{re.escape(missing)} does not exist; set dataset\.completions=PATH",
          lambda: xstest_sft_dataset(None, completions=missing))  # fmt: skip
    (tmp_path / "c.csv").write_text("prompt,completion\nhi,hello\n")
    fails(DataError, r"c\.csv has no column\(s\) \['type', 'final_label'\] \(columns: \['prompt', 'completion'\]\); set pairs\.completions",
          lambda: xstest_pairs(completions=str(tmp_path / "c.csv")))  # fmt: skip
    (tmp_path / "h.csv").write_text("prompt,type,label\n")
    fails(DataError, r"h\.csv has no rows; set pairs\.prompts to an XSTest-format CSV", lambda: xstest_pairs(prompts=str(tmp_path / "h.csv")))
