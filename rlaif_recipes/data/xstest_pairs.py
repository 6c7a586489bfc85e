"""Human-labelled preference pairs from XSTest's annotated completions.

XSTest ships one model's completion per prompt with a human label (full compliance, full refusal,
partial refusal) and marks each prompt safe or unsafe. The human preference follows the benchmark:
for a safe prompt an answer beats a refusal; for an unsafe contrast prompt a refusal beats an
answer. Each prompt has only one completion, so its counterpart is a human-labelled completion of
the opposite kind borrowed from another prompt of the same XSTest type family ("homonyms" and
"contrast_homonyms" are one family; picked by a hash, so the set is the same on every run). Partial refusals count as refusals.

The split uses `is_held_out` on the prompt text with the same fraction as the prompt datasets, so
prompts held out from training are held out from the judge's training too.
"""

import csv
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Union

from datasets import Dataset

from rlaif_recipes.config import asset_path, built_at
from rlaif_recipes.data.prompts import is_held_out
from rlaif_recipes.data.tables import check_fraction, check_split
from rlaif_recipes.errors import DataError

COMPLETION_COLUMNS = ("prompt", "completion", "type", "final_label")


def xstest_pairs(
    completions: Union[str, Sequence[str]] = "",
    prompts: str = "",
    split: str = "all",
    held_out_fraction: float = 0.3,
) -> Dataset:
    """Rows: prompt, chosen, rejected (texts), chosen_messages / rejected_messages (chat format),
    prompt_label (safe/unsafe), prompt_type, chosen_kind / rejected_kind (answer/refusal),
    borrowed ("chosen" or "rejected": which side came from another prompt), split, source (the
    completions file's name: one model's writing).

    completions: one XSTest-format CSV or a list of them; each file's pairs are built within that
    file, so both sides of a pair are one model's writing."""
    files = [completions] if isinstance(completions, str) else list(completions)
    files = [f or asset_path("xstest/xstest_v2_completions_llama2orig.csv") for f in files or [""]]
    prompts = prompts or asset_path("xstest/xstest_prompts.csv")
    at = built_at("pairs")
    check_split(f"{at}.split", split)
    check_fraction(f"{at}.held_out_fraction", held_out_fraction)
    check_csv(prompts, f"{at}.prompts", ("prompt", "label"))
    for path in files:
        check_csv(path, f"{at}.completions", COMPLETION_COLUMNS)
    with open(prompts, newline="") as f:
        label_of = {row["prompt"].strip(): row["label"] for row in csv.DictReader(f)}
    out: List[dict] = []
    for path in files:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["prompt"].strip() in label_of and r["final_label"]]
        out += _pairs(rows, label_of, split, held_out_fraction, Path(path).stem)
    return Dataset.from_list(out)


def check_csv(path: str, key: str, columns: Sequence[str]) -> None:
    """Fail with one line naming `path` unless it is a CSV with `columns` and a row (a missing
    column would otherwise be a KeyError mid-way)."""
    if not Path(path).is_file():
        raise DataError(f"{path} does not exist; set {key}=PATH to an XSTest-format CSV")
    with open(path, newline="") as f:
        rows = (row for row in csv.reader(f) if row)  # blank lines read as []
        header, first = next(rows, None), next(rows, None)
    if header is None or first is None:
        raise DataError(f"{path} has no rows; set {key} to an XSTest-format CSV with a header and rows")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} has no column(s) {missing} (columns: {header}); set {key} to an XSTest-format CSV")


def _pairs(rows: List[dict], label_of: Dict[str, str], split: str, held_out_fraction: float, source: str) -> List[dict]:
    """One pair per completion, its counterpart borrowed from `rows` (see the module docstring)."""
    held_out_of = {r["prompt"].strip(): is_held_out(r["prompt"].strip(), held_out_fraction) for r in rows}
    by_kind: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        by_kind[(_family(r), _kind(r))].append(r)
    out = []
    for r in rows:
        prompt, kind = r["prompt"].strip(), _kind(r)
        held_out = held_out_of[prompt]
        if split != "all" and held_out != (split == "held_out"):
            continue
        other_kind = "refusal" if kind == "answer" else "answer"
        # Borrow only from prompts on the same side of the split, so nothing leaks across it.
        donors = [d for d in by_kind[(_family(r), other_kind)] if held_out_of[d["prompt"].strip()] == held_out]
        if not donors:
            continue
        donor = donors[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(donors)]
        own, borrowed = r["completion"].strip(), donor["completion"].strip()
        label = label_of[prompt]
        own_wins = (kind == "answer") == (label == "safe")
        chosen, rejected = (own, borrowed) if own_wins else (borrowed, own)
        out.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_messages": _chat(prompt, chosen),
                "rejected_messages": _chat(prompt, rejected),
                "prompt_label": label,
                "prompt_type": r["type"],
                "chosen_kind": kind if own_wins else other_kind,
                "rejected_kind": other_kind if own_wins else kind,
                "borrowed": "rejected" if own_wins else "chosen",
                "split": "held_out" if held_out else "train",
                "source": source,
            }
        )
    return out


def _family(row: dict) -> str:
    return row["type"].removeprefix("contrast_")


def _kind(row: dict) -> str:
    return "answer" if row["final_label"].startswith("1") else "refusal"


def _chat(prompt: str, response: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
