"""Prompt datasets from local CSV/JSONL/Parquet files, with a stable held-out split.

The split is decided by a hash of the prompt text, not by a seed or the file order, so every stage
(SFT, RLAIF, evaluation) agrees on which prompts are held out, run after run.
"""

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

from datasets import Dataset, load_dataset

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
) -> Dataset:
    """Rows with `prompt_id`, `prompt` (the text) and `messages` (chat messages for the sampler).

    split: "train", "held_out" or "all". where: keep rows whose column value is in a list,
    e.g. {"label": ["safe"]}.
    """
    path = Path(source)
    if path.suffix not in _FORMATS:
        raise ValueError(f"prompt file {source} must end in one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist; set data.source=PATH")
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"data.split={split!r}; use train, held_out or all")
    ds = load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
    if prompt_column not in ds.column_names:
        raise ValueError(f"{source} has no column '{prompt_column}' (columns: {ds.column_names}); set data.prompt_column")
    for column, allowed in (where or {}).items():
        if column not in ds.column_names:
            raise ValueError(f"data.where names column '{column}', which {source} lacks (columns: {ds.column_names})")
        ds = ds.filter(lambda row, column=column, keep=set(allowed): row[column] in keep)
    if split != "all":
        want_held_out = split == "held_out"
        ds = ds.filter(lambda row: is_held_out(row[prompt_column], held_out_fraction) == want_held_out)
    if max_prompts is not None:
        ds = ds.select(range(min(max_prompts, len(ds))))

    def to_messages(row: dict, idx: int) -> dict:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": row[prompt_column]})
        return {"prompt_id": str(row.get("id", idx)), "prompt": row[prompt_column], "messages": messages}

    return ds.map(to_messages, with_indices=True, remove_columns=ds.column_names)
