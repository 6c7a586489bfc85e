"""Labelled requests (harmful or benign) for training and checking the judge's harm reader.

Several files, each a source: XSTest's prompts (label safe/unsafe) and the requests collected from
registry packages in rlaif_recipes/assets/harm_prompts (label benign/harmful, with a `source`
column naming where each came from). The split is the same hash of the request text as every
other dataset's, so XSTest's held-out prompts stay held out here too.
"""

from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from datasets import Dataset

from rlaif_recipes.config import built_at
from rlaif_recipes.data.prompts import _FORMATS, is_held_out
from rlaif_recipes.data.tables import check_cap, check_fraction, check_split, kind_of, read_table
from rlaif_recipes.errors import ConfigError, DataError


def harm_requests(
    sources: Sequence[str],
    split: str = "train",
    held_out_fraction: float = 0.3,
    prompt_column: str = "prompt",
    label_column: str = "label",
    harmful_labels: Sequence[str] = ("unsafe", "harmful"),
    benign_labels: Sequence[str] = ("safe", "benign"),
    exclude_sources: Sequence[str] = (),
    max_per_source: Optional[int] = None,
) -> Dataset:
    """Rows with `prompt`, `harmful` (bool) and `source` (the file's `source` column, else its
    name). exclude_sources: leave these out (a leave-one-source-out check); max_per_source: keep the
    first N requests of each (source, label), for quick runs."""
    at = built_at("harm_data")
    check_split(f"{at}.split", split)
    check_fraction(f"{at}.held_out_fraction", held_out_fraction)
    check_cap(f"{at}.max_per_source", max_per_source)
    if isinstance(sources, str) or not sources:
        raise ConfigError(f"{at}.sources={sources!r}: give a list of CSV/JSONL/Parquet files")
    rows: List[Dict[str, object]] = []
    for source in sources:
        rows += _read(Path(source), prompt_column, label_column, set(harmful_labels), set(benign_labels))
    kept, taken = [], Counter()
    for row in rows:
        if row["source"] in exclude_sources:
            continue
        if split != "all" and is_held_out(row["prompt"], held_out_fraction) != (split == "held_out"):
            continue
        key = (row["source"], row["harmful"])
        if max_per_source is None or taken[key] < max_per_source:
            taken[key] += 1
            kept.append(row)
    if not kept:
        raise DataError(f"{at}: no requests left from {list(sources)} (split={split}, exclude_sources={list(exclude_sources)})")
    return Dataset.from_list(kept)


def _read(path: Path, prompt_column: str, label_column: str, harmful: set, benign: set) -> List[Dict[str, object]]:
    at = built_at("harm_data")
    if not path.is_file() or path.suffix not in _FORMATS:
        raise DataError(f"{at}.sources: {path} is not a CSV, JSONL or Parquet file; fix the path")
    ds = read_table(str(path), [path], _FORMATS[path.suffix], f"{at}.sources")
    for column in (prompt_column, label_column):
        if column not in ds.column_names:
            raise DataError(f"{path} has no column '{column}' (columns: {ds.column_names}); set {at}.prompt_column / label_column")
    out = []
    for idx, row in enumerate(ds):
        text, label = row[prompt_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {idx} (0-based): '{prompt_column}' must be non-empty text, got {kind_of(text)}; fix or remove that row")
        if label not in harmful | benign:
            raise DataError(f"{path}: row {idx} (0-based): label {label!r} is neither harmful {sorted(harmful)} nor benign {sorted(benign)}")
        out.append({"prompt": text.strip(), "harmful": label in harmful, "source": row.get("source") or path.stem})
    return out
