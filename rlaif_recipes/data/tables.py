"""Reading local data files with one clear line for what is wrong with them.

HF `datasets` reports an empty, truncated or malformed file from deep inside (a StopIteration, an
Arrow error) without naming the line; `read_table` checks first. The `check_*` helpers refuse
settings that would silently select nothing or everything. Shared by the prompt, preference and
XSTest readers, so a bad file or setting fails before any model is loaded.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from rlaif_recipes.errors import ConfigError, DataError


def check_split(key: str, split: str) -> None:
    if split not in ("train", "held_out", "all"):
        raise ConfigError(f"{key}={split!r}; use train, held_out or all")


def check_fraction(key: str, fraction: Any) -> None:
    """`is_held_out` silently holds out nothing (or everything) for a fraction outside [0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(f"{key}={fraction!r}: must be in [0, 1] (the share of prompts held out of training, e.g. 0.3)")


def check_cap(key: str, cap: Any) -> None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"{key}={cap!r}: must be a whole number of at least 1, or null for all")


def kind_of(value: Any) -> str:
    """A value's type as a message names it (JSON's null for None)."""
    return "null" if value is None else type(value).__name__


def read_table(source: str, files: Sequence[Path], fmt: str, key: str) -> Dataset:
    """The rows of `files` (an HF `datasets` format), checked first: datasets reports an empty,
    truncated or malformed file from deep inside (a StopIteration, an Arrow error), naming no line."""
    if not any([_has_rows(path, fmt, key) for path in files]):  # a list: every file is checked
        raise DataError(f"{source} has no rows; add some, or set {key} to another file")
    try:
        return load_dataset(fmt, data_files=[str(p) for p in files], split="train")
    except (DatasetGenerationError, pa.ArrowException) as err:
        cause = str(err.__cause__ or err).strip().splitlines()
        raise DataError(f"{source} cannot be read as {fmt} ({cause[0] if cause else type(err).__name__}); fix it or set {key} to another file") from err


def _has_rows(path: Path, fmt: str, key: str) -> bool:
    if fmt == "json":
        return _json_has_rows(path, key)
    if fmt == "csv":
        with open(path, "rb") as f:
            lines = (line for line in f if line.strip())
            return next(lines, None) is not None and next(lines, None) is not None  # a header and a row
    try:
        if fmt == "parquet":
            return pq.ParquetFile(path).metadata.num_rows > 0
        with pa.memory_map(str(path)) as src:  # the stream format save_to_disk writes, else the file format
            try:
                return pa.ipc.open_stream(src).read_all().num_rows > 0
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_file(src).read_all().num_rows > 0
    except pa.ArrowException as err:
        name, tool = ("Parquet", "Dataset.to_parquet") if fmt == "parquet" else ("Arrow", "Dataset.save_to_disk")
        raise DataError(f"{path} is not a readable {name} file ({err}); rewrite it (e.g. with {tool}) or set {key} to another file") from err


def _json_has_rows(path: Path, key: str) -> bool:
    """JSON Lines, streamed and parsed line by line; or one JSON array of rows (datasets reads both)."""
    rows = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if rows == 0 and line.lstrip().startswith(b"["):
                return _json_array_has_rows(path)
            try:
                row = json.loads(line.rstrip(b"\r\n"))  # so a column counts within this line
            except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                reason = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
                raise DataError(f"{path}: line {n} is not JSON ({reason}); fix or remove that line") from err
            if not isinstance(row, dict):
                raise DataError(f'{path}: line {n} is a JSON {kind_of(row)}, not an object; write one {{"column": value, ...}} object per line')
            rows += 1
    if rows == 0:
        raise DataError(f"{path} is empty; write one JSON object per line, or set {key} to another file")
    return True


def _json_array_has_rows(path: Path) -> bool:
    try:
        rows = json.loads(path.read_bytes())
    except ValueError as err:
        reason = f"line {err.lineno}, column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
        raise DataError(f"{path} is not valid JSON ({reason}); fix it, or write one JSON object per line") from err
    return len(rows) > 0
