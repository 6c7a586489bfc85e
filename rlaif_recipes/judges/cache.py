"""A persistent judgment cache in SQLite, so re-runs and resumed runs never pay twice.

Keys hash everything that decides a verdict: the judge's identity (class, model, rubric and
version, settings), the prompt, and both responses in the order shown. Each judgment is committed
as soon as it arrives, so a killed run loses at most the requests in flight.

One process (judge_pairs, a one-process online_dpo): one file in WAL mode, which several processes
on one host may read and write at once. Under torchrun each rank keeps a file of its own
(`judge_cache.sqlite` -> `judge_cache.rank-1.sqlite`) in rollback-journal mode: WAL's shared-memory
index needs every process on one host, and a multi-node run's output_dir sits on storage several
hosts share. Nothing is lost by the split: a rank's prompts and samples depend only on the seed,
the step and its rank, so a resumed run on as many ranks finds each judgment in its rank's file.
"""

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional


def cache_key(identity: Mapping[str, Any], prompt: str, first: str, second: str) -> str:
    blob = json.dumps({"judge": identity, "prompt": prompt, "first": first, "second": second}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def rank_path(path: Path) -> Path:
    """The cache file of this process: `path` itself, or under torchrun the rank's own file."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return path
    return path.with_name(f"{path.stem}.rank-{int(os.environ['RANK'])}{path.suffix}")


_BUSY_TIMEOUT_S = 60.0


def _execute_until_unlocked(db: sqlite3.Connection, statement: str) -> None:
    """Run a set-up statement, retrying while another process holds the file.

    SQLite answers `PRAGMA journal_mode=WAL` with "database is locked" at once, without waiting
    out the busy timeout, when several processes open a new cache file together.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            db.execute(statement)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class JudgmentCache:
    def __init__(self, path: str) -> None:
        self.path = rank_path(Path(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        for statement in (
            f"PRAGMA journal_mode={'WAL' if self.path == Path(path) else 'DELETE'}",
            "PRAGMA synchronous=NORMAL",
            "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)",
        ):
            _execute_until_unlocked(self._db, statement)

    def get_many(self, keys: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        keys = list(keys)
        found: Dict[str, Dict[str, Any]] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                rows = self._db.execute(
                    f"SELECT key, value FROM judgments WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.get_many([key]).get(key)

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments (key, value, created) VALUES (?, ?, ?)",
                (key, json.dumps(value, sort_keys=True), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
