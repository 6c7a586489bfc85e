"""Prompt datasets from local CSV/JSONL/Parquet files, with a stable held-out split.

The split is decided by a hash of the prompt text, not by a seed or the file order, so every stage
(SFT, RLAIF, evaluation) agrees on which prompts are held out, run after run.
"""

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from datasets import Dataset, concatenate_datasets

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.data.tables import check_cap, check_fraction, check_split, kind_of, read_table
from rlaif_recipes.errors import ConfigError, DataError

_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def is_held_out(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prompt_dataset(
    source: str,
    prompt_column: str = "prompt",
    split: str = "all",
    held_out_fraction: float = 0.3,
    where: Optional[Dict[str, List[str]]] = None,
    system_prompt: Optional[str] = None,
    max_prompts: Optional[int] = None,
    group_column: Optional[str] = None,
) -> Dataset:
    """Rows with `prompt_id`, `prompt` (the text) and `messages` (chat messages for the sampler).

    split: "train", "held_out" or "all". where: keep rows whose column value is in a list,
    e.g. {"label": ["safe"]}. group_column: a column copied to each row as `group` (XSTest's
    `type`), so a report can say which kinds of request a policy refuses.
    """
    at = rlaif_config.built_at("data")
    check_split(f"{at}.split", split)
    check_fraction(f"{at}.held_out_fraction", held_out_fraction)
    check_cap(f"{at}.max_prompts", max_prompts)
    for column, allowed in (where or {}).items():
        if isinstance(allowed, str) or not isinstance(allowed, Sequence):
            raise ConfigError(f"{at}.where.{column}={allowed!r}: must be a list of values to keep, e.g. [{allowed}]")
    path = Path(source)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"prompt file {source} {problem}; set {at}.source=PATH to a CSV, JSONL or Parquet file")
    if path.suffix not in _FORMATS:
        raise DataError(f"prompt file {source} must end in one of {sorted(_FORMATS)}; set {at}.source to such a file")
    ds = read_table(source, [path], _FORMATS[path.suffix], f"{at}.source")
    if prompt_column not in ds.column_names:
        raise DataError(f"{source} has no column '{prompt_column}' (columns: {ds.column_names}); set {at}.prompt_column")
    if group_column is not None and group_column not in ds.column_names:
        raise DataError(f"{source} has no column '{group_column}' (columns: {ds.column_names}); set {at}.group_column to one of them or null")
    for idx, text in enumerate(ds[prompt_column]):
        if not isinstance(text, str):
            raise DataError(f"{source}: row {idx} (0-based): '{prompt_column}' must be text, got {kind_of(text)}; fix or remove that row")
        if not text.strip():
            raise DataError(f"{source}: row {idx} (0-based): '{prompt_column}' is empty; fill or remove that row")
    for column, allowed in (where or {}).items():
        if column not in ds.column_names:
            raise DataError(f"{at}.where names column '{column}', which {source} lacks (columns: {ds.column_names})")
        ds = ds.filter(lambda row, column=column, keep=set(allowed): row[column] in keep)
    if split != "all":
        want_held_out = split == "held_out"
        ds = ds.filter(lambda row: is_held_out(row[prompt_column], held_out_fraction) == want_held_out)
    if max_prompts is not None:
        ds = ds.select(range(min(max_prompts, len(ds))))

    def to_messages(row: dict, idx: int) -> dict:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": row[prompt_column]})
        group = {"group": str(row[group_column])} if group_column is not None else {}
        return {"prompt_id": str(row.get("id", idx)), "prompt": row[prompt_column], "messages": messages, **group}

    return ds.map(to_messages, with_indices=True, remove_columns=ds.column_names)


def prompt_mixture(parts: Mapping[str, Any]) -> Dataset:
    """Several prompt sets as one, as a team's real prompt set mixes kinds and styles (e.g. XSTest's
    short questions with harmful instructions from another source). parts: name -> a prompt set's
    config (`_component_: rlaif_recipes.data.prompt_dataset` and its keys); each prompt's id becomes
    `name/id`, so ids stay unique and say where a prompt came from."""
    at = rlaif_config.built_at("data")
    if not isinstance(parts, Mapping) or not parts:
        raise ConfigError(f"{at}.parts={parts!r}: give a mapping of names to prompt sets, e.g. {{xstest: {{_component_: ...}}}}")
    built = []
    for name, spec in parts.items():
        ds = rlaif_config.build(spec, f"{at}.parts.{name}")
        if not isinstance(ds, Dataset):
            raise ConfigError(f"{at}.parts.{name} must build a prompt dataset (e.g. _component_: rlaif_recipes.data.prompt_dataset)")
        if len(ds) == 0:
            raise DataError(f"{at}.parts.{name} has no prompts after its filters; check its source, where and split")
        built.append(ds.map(lambda row, name=name: {"prompt_id": f"{name}/{row['prompt_id']}"}))
    return concatenate_datasets(built)


def prompts_fingerprint(prompts: Dataset) -> str:
    """Identifies a prompt set (ids and texts): a resumed run's data position, or a directory of
    shards, only means something on the same one."""
    digest = hashlib.sha256()
    for pid, text in zip(prompts["prompt_id"], prompts["prompt"]):
        digest.update(f"{pid}\x00{text}\x00".encode())
    return f"{len(prompts)}:{digest.hexdigest()[:16]}"
