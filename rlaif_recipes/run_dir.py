"""One output directory, one run: the directory records what produced it, and a later run into it
either continues exactly that work or is refused with one line, before anything expensive starts.

    claim(cfg.output_dir, "judge_pairs", run_identity(cfg, RUNTIME_KEYS, input=...), outputs=("data",))

`run.json` (written when the directory is claimed) holds the recipe and its identity: the inputs
and the settings that decide what the directory holds. Settings that only change how fast or how
safely a run goes (budgets, concurrency, memory, logging cadence) are left out, so raising a judge
budget and re-running continues the same run. A component declares those of its own arguments in
a `RUNTIME_SETTINGS` class attribute (judges: the API limits; samplers: engine memory); a recipe
names its top-level ones in its `RUNTIME_KEYS`.
"""

import contextlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from rlaif_recipes.config import redacted
from rlaif_recipes.distributed import is_distributed
from rlaif_recipes.errors import OutputError
from rlaif_recipes.files import atomic_write_text

RUN_FILE = "run.json"
FORMAT = 1
# what a run writes into its directory before its work starts: a run refused at that point leaves
# only these, and they go again (`discard_unused_claim`)
SCAFFOLDING = (RUN_FILE, "config.yaml")
# (directory, topmost folder the claim created or None) of the run this process claimed fresh
_fresh_claim: Optional[Tuple[Path, Optional[Path]]] = None


class RunIdentity(dict):
    """A run's identity; `derived` names its facts that are no setting (`weights`, `input_run`):
    a refusal names them, but cannot offer them as a setting to go back to."""

    derived: frozenset = frozenset()


def run_identity(cfg: DictConfig, runtime_keys: Iterable[str], **facts: Any) -> RunIdentity:
    """The config minus `runtime_keys` (top level) and each component's RUNTIME_SETTINGS, plus
    derived `facts` (which weights, which input run) that the settings alone do not pin down. A
    fact named like a setting (`input_dir`, resolved) stands for that setting."""
    skip = set(runtime_keys) | {"output_dir", "config_choices"}
    plain = redacted(OmegaConf.create({k: v for k, v in cfg.items() if k not in skip}))
    identity = RunIdentity({**_without_runtime(plain), **facts})
    identity.derived = frozenset(k for k in facts if k not in cfg)
    return identity


def claim(output_dir: str, recipe: str, identity: Mapping[str, Any], outputs: Iterable[str], *, fresh: bool = False) -> Path:
    """Check that `output_dir` can take this run, then record the run there.

    outputs: the entries that hold a run's results. Until one of them holds something, the
    directory is still free (a run that failed its checks may be corrected and run again).
    fresh: the run starts from nothing (training without resume), so it must find no outputs:
    it would mix them with its own, or overwrite them.

    Under torchrun every rank calls it: rank 0 checks and records, the others wait for its
    verdict. So no rank writes into the directory (a checkpointer makes its folder there) before
    rank 0 has looked at it, and every rank stops with the same line when it is refused.
    """
    if not is_distributed():
        return _claim(Path(output_dir), recipe, identity, outputs, fresh)
    refusal = [None]
    if dist.get_rank() == 0:
        try:
            _claim(Path(output_dir), recipe, identity, outputs, fresh)
        except OutputError as e:
            refusal = [str(e)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise OutputError(refusal[0])
    return Path(output_dir) / RUN_FILE


def _claim(out: Path, recipe: str, identity: Mapping[str, Any], outputs: Iterable[str], fresh: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir={out} is a file, not a directory; choose another output_dir")
    _check_writable(out)
    derived = getattr(identity, "derived", frozenset())
    identity = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
    record = out / RUN_FILE
    if record.is_file():
        saved = read_run(out)
        if saved.get("recipe") != recipe:
            raise OutputError(f"{out} holds output of the {saved.get('recipe')} recipe; give this {recipe} run its own output_dir")
        found = [name for name in outputs if _holds_something(out / name)]
        difference = _first_difference(saved.get("identity", {}), identity) if found else None
        if difference is not None:
            key, before, now = difference
            back = "" if key.split(".")[0] in derived else f" (or {key}={_show(before)} to continue that run)"
            raise OutputError(
                f"{out} holds an earlier {recipe} run with {key}={_show(before)}, this run has {key}={_show(now)}; use a new output_dir{back}"
            )
        if found and fresh:
            raise OutputError(
                f"{out} already holds this {recipe} run's output ({', '.join(found)}); continue it with "
                "resume_from_checkpoint=true, or delete it / choose a new output_dir to start over"
            )
        if found:
            return record
    elif out.is_dir() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        raise OutputError(
            f"output_dir={out} is not empty ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) and holds "
            f"no {RUN_FILE}, so it is not a run this {recipe} run can continue; choose a new or empty output_dir"
        )
    global _fresh_claim
    created = next((p for p in (*reversed(out.parents), out) if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    _fresh_claim = (out, created)
    atomic_write_text(record, json.dumps({"format": FORMAT, "recipe": recipe, "identity": identity, "created": time.time()}, indent=2, sort_keys=True))
    return record


def forget_claim() -> None:
    """The run ended: a later run in this process (tests, sweeps) must not discard this one's directory."""
    global _fresh_claim
    _fresh_claim = None


def discard_unused_claim() -> None:
    """After a refusal: the directory this run claimed fresh goes back to how it was found
    (gone, or empty) if it holds only what a run writes before its work starts (run.json,
    config.yaml, empty folders, a judge cache without a judgment). Anything else is kept."""
    if _fresh_claim is None:
        return
    out, created = _fresh_claim
    forget_claim()
    if not out.is_dir() or not all(_unused(p) for p in out.rglob("*")):
        return
    for path in sorted(out.iterdir()):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if created is not None:
        for folder in (out, *out.parents):
            if folder == created.parent or any(folder.iterdir()):
                break
            folder.rmdir()


def _unused(path: Path) -> bool:
    if path.is_dir() or path.name in SCAFFOLDING:
        return True
    if path.name.endswith((".sqlite-wal", ".sqlite-shm")):
        return path.with_name(path.name[: -len("-wal")]).exists()  # a database's journal goes with it
    if path.suffix == ".sqlite":
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                return db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 0
        except sqlite3.Error:
            return False
    return False


def read_run(run_dir: Path) -> Dict[str, Any]:
    """A run directory's record ({} when it has none)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OutputError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); restore it or use a new output_dir") from None


def _holds_something(path: Path) -> bool:
    """A file, or a directory with anything in it (a checkpointer creates its directory empty)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _check_writable(out: Path) -> None:
    """Fail now, not after an engine started, when output_dir cannot be created or written."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"output_dir={out}: {existing} is a file, so the directory cannot be created; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir={out}: {existing} is not writable (permission denied); choose another output_dir")


def _without_runtime(node: Any) -> Any:
    """A plain config copy without each component's RUNTIME_SETTINGS (recursively)."""
    if isinstance(node, (list, ListConfig)):
        return [_without_runtime(v) for v in node]
    if not isinstance(node, (dict, DictConfig)):
        return node
    skip: Tuple[str, ...] = ()
    if isinstance(node.get("_component_"), str):
        try:
            skip = tuple(getattr(_get_component_from_path(node["_component_"]), "RUNTIME_SETTINGS", ()))
        except Exception:  # an unimportable component was already reported by config validation
            skip = ()
    return {k: _without_runtime(v) for k, v in node.items() if k not in skip}


def changed_setting(before: Mapping[str, Any], now: Mapping[str, Any]) -> Optional[str]:
    """The first setting that differs between two recorded identities, as `key: old -> new`; None when alike."""
    difference = _first_difference(before, now)
    return None if difference is None else f"{difference[0]}: {_show(difference[1])} -> {_show(difference[2])}"


def _first_difference(before: Any, now: Any, path: str = "") -> Optional[Tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of the first setting that differs, in sorted key order."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in sorted(set(before) | set(now)):
            found = _first_difference(before.get(key), now.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if before == now else (path, before, now)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
