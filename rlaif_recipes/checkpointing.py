"""Training checkpoints that are HF model directories, plus the state for an exact resume.

Shared by the `dpo` and `online_dpo` recipes. Stable API:

    ckpt = CheckpointManager(output_dir, source_dir=checkpoint_dir, fingerprint={...}, keep_last=2)
    ckpt.save(step, model_state, training_state)  # one rank (rank 0); returns the directory
    ckpt.latest()                                 # newest *complete* checkpoint dir, or None
    ckpt.load(path=None)                          # -> Checkpoint(path, step, model, state, manifest), memory-mapped
    ckpt.check_room(checkpoint_bytes(model, 2.0), planned_saves(step, max_steps, every))  # at setup, before training
    rng_state() / set_rng_state(state)            # python, numpy, torch (CPU + CUDA) generators
    restore_rng_state(states, rank, world_size)   # this rank's, from a checkpoint's list of every rank's
    gather_optimizer_state(model, opt)            # full optimizer state (FSDP2 or not; rank 0)
    load_optimizer_state(model, opt, state)       # back into a (sharded) optimizer

A checkpoint is `output_dir/step_0000010/`:

    model.safetensors      weights under HF names: vLLM and transformers load the dir as it is
    config.json, tokenizer.json, ...   copied from `source_dir`
    training_state.pt      optimizer, scheduler, RNG, data position and any extra state
    checkpoint.json        manifest: format, step, fingerprint, size of every file

It is written in a hidden `.step_0000010.partial-PID` directory (manifest last) and renamed into
place, so a crash never leaves a directory that looks finished. A disk too small for it is one
`CheckpointError`: at setup for the checkpoints the whole run keeps (`check_room`), and again at
each save, before a byte is written; a write the disk still cannot hold leaves no partial
directory behind. `latest()` also re-checks every manifest and file size, and skips anything
incomplete. `load()` turns a corrupt or incompatible
checkpoint (fingerprint differs: another model, LoRA settings, recipe) into one-line
`CheckpointError`s that say what to do.
"""

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torchtune.utils import get_logger

from rlaif_recipes.errors import CheckpointError, ConfigError, disk_full_error
from rlaif_recipes.models.hf_model import hf_to_tune_state_dict, tune_to_hf_state_dict

log = get_logger("INFO")

FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FULL = 2**20  # fewer free bytes than this after a failed write: the disk is what failed it
# HF side files a loader needs beside the weights (config, tokenizer, generation defaults, and the
# chat template, which transformers 5 writes as chat_template.jinja)
_SIDE_FILES = re.compile(r"^(?!.*\.index\.json$).*\.json$|^tokenizer.*|.*\.tiktoken$|^merges\.txt$|^vocab\.txt$|.*\.jinja$")

StateDict = Dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: StateDict  # torchtune names, full tensors on CPU
    state: Dict[str, Any]  # what was passed as training_state
    manifest: Dict[str, Any]


class CheckpointManager:
    """Writes, finds and reads checkpoints under `output_dir` (see the module docstring).

    Args:
        output_dir: where step_* directories go.
        source_dir: the HF checkpoint training started from (config and tokenizer files are
            copied from it; its config.json maps weight names).
        fingerprint: JSON-able facts a resumed run must share with the saved one (model shape,
            LoRA settings, recipe ...); a mismatch is a CheckpointError on load.
        keep_last: keep only this many newest checkpoints (None: all).
        to_hf / from_hf: weight-name converters (default: Llama or Qwen2 by config.json, torchtune <-> HF).
    """

    def __init__(
        self,
        output_dir: str,
        source_dir: str,
        *,
        fingerprint: Optional[Mapping[str, Any]] = None,
        keep_last: Optional[int] = None,
        to_hf: Callable[[StateDict, str], StateDict] = tune_to_hf_state_dict,
        from_hf: Callable[[StateDict, str], StateDict] = hf_to_tune_state_dict,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ConfigError(f"keep_last_checkpoints={keep_last}: keep at least 1 checkpoint, or null for all")
        self.output_dir = Path(output_dir)
        self.source_dir = str(source_dir)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint or {}), sort_keys=True))
        self.keep_last = keep_last
        self._to_hf, self._from_hf = to_hf, from_hf

    def save(self, step: int, model_state: StateDict, training_state: Optional[Dict[str, Any]] = None) -> Path:
        """Write checkpoint `step` atomically. Call on one rank with full (gathered) weights."""
        final = self.output_dir / f"step_{step:07d}"
        tmp = self.output_dir / f".{final.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        side_files = [f for f in sorted(Path(self.source_dir).iterdir()) if f.is_file() and _SIDE_FILES.match(f.name) and f.name != MANIFEST]
        hf = {k: v.detach().to("cpu").contiguous() for k, v in self._to_hf(dict(model_state), self.source_dir).items()}
        need = tensor_bytes(hf) + tensor_bytes(training_state) + sum(f.stat().st_size for f in side_files)
        self._check_free(need, f"checkpoint step {step} needs about {_mb(need)}")
        try:
            tmp.mkdir(parents=True)
            for f in side_files:
                shutil.copy2(f, tmp / f.name)
            save_file(hf, str(tmp / WEIGHTS), metadata={"format": "pt"})
            torch.save({"step": step, **(training_state or {})}, tmp / TRAINING_STATE)
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "fingerprint": self.fingerprint,
                "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())},
                "created": time.time(),
            }
            _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2))
            for name in (WEIGHTS, TRAINING_STATE):
                _fsync(tmp / name)
        except Exception as e:
            disk_full = _free_bytes(self.output_dir) < _FULL or disk_full_error(e) is not None
            shutil.rmtree(tmp, ignore_errors=True)
            if not disk_full:
                raise
            raise CheckpointError(
                f"the disk under {self.output_dir} filled while checkpoint step {step} was written (about "
                f"{_mb(need)}); the partial write is removed and the checkpoints before it are intact: free disk "
                "space and resume (resume_from_checkpoint=true)"
            ) from None
        if final.exists():  # re-saving a step: move the old one aside first (rename needs a free name)
            old = self.output_dir / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync_dir(self.output_dir)
        self._prune()
        return final

    def check_room(self, each_bytes: int, saves: int) -> None:
        """Fail before training when the disk cannot hold this run's checkpoints: the ones it keeps
        (keep_last, or all `saves`) and one more being written; the ones it will prune count as room."""
        kept = saves if self.keep_last is None else min(saves, self.keep_last)
        existing = self._step_dirs()
        prunable = sum(_dir_bytes(p) for p in existing) if self.keep_last is not None else 0
        need = max(each_bytes, (kept + 1) * each_bytes - prunable)
        self._check_free(
            need,
            f"this run's checkpoints need about {_mb(need)} ({kept} kept by keep_last_checkpoints={self.keep_last} "
            f"and one being written, about {_mb(each_bytes)} each: weights and optimizer state)",
        )

    def _check_free(self, need: int, what: str) -> None:
        free = _free_bytes(self.output_dir)
        if need > free:
            raise CheckpointError(
                f"{what}, and the disk under {self.output_dir} has {_mb(free)} free; free disk space, lower "
                "keep_last_checkpoints, or choose an output_dir on a larger disk"
            )

    def latest(self) -> Optional[Path]:
        """Newest complete checkpoint; incomplete or foreign directories are skipped (and logged)."""
        for path in sorted(self._step_dirs(), key=_step_of, reverse=True):
            problem = _problem(path)
            if problem is None:
                return path
            log.warning(f"skipping checkpoint {path}: {problem}")
        return None

    def load(self, path: Optional[str] = None) -> Checkpoint:
        """Read a checkpoint (default: latest) after checking it is complete and compatible."""
        if path is None:
            found = self.latest()
            if found is None:
                raise CheckpointError(
                    f"no complete checkpoint in {self.output_dir} to resume from; "
                    "set resume_from_checkpoint=false to start fresh, or point output_dir at the run to resume"
                )
            path = found
        path = Path(path)
        problem = _problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}; delete it to resume from an earlier one")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest["format"] != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format {manifest['format']}, this version reads {FORMAT_VERSION}; "
                "resume with the version that wrote it"
            )
        for key in sorted(set(manifest["fingerprint"]) | set(self.fingerprint)):
            saved, now = manifest["fingerprint"].get(key), self.fingerprint.get(key)
            if saved != now:
                raise CheckpointError(
                    f"checkpoint {path} is incompatible: it was written with {key}={saved}, this run has "
                    f"{key}={now}; resume with the same setting or use a new output_dir"
                )
        try:
            # memory-mapped, both: every rank loads the checkpoint, but only rank 0 uses the optimizer
            # state and each rank its own shards of the weights; pages nobody touches are never read
            hf = load_file(str(path / WEIGHTS))
            state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # safetensors / pickle errors are long: name the file instead
            raise CheckpointError(
                f"checkpoint {path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "delete it to resume from an earlier one"
            ) from None
        return Checkpoint(path, manifest["step"], self._from_hf(hf, self.source_dir), state, manifest)

    def _step_dirs(self):
        if not self.output_dir.is_dir():
            return []
        return [p for p in self.output_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        complete = sorted((p for p in self._step_dirs() if _problem(p) is None), key=_step_of)
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def checkpoint_bytes(model: nn.Module, state_per_weight: float) -> int:
    """About what one checkpoint of `model` takes on disk: every weight, and the optimizer's state,
    `state_per_weight` bytes per byte of trained weight (`policy.check_optimizer`'s measure: AdamW 2,
    SGD with momentum 1); each save checks its exact size again."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + int(state_per_weight * trained)


def planned_saves(start: int, end: int, every: Optional[int]) -> int:
    """How many checkpoints steps start+1..end write: every `every` steps and at the end."""
    return len({s for s in range(start + 1, end + 1) if every and s % every == 0} | {end})


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested dict / list (what a checkpoint file holds, headers aside)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path`, or would once it is created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (not a checkpoint, or its write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is truncated or changed ({f.stat().st_size} bytes, manifest says {size})"
    return None


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)


# ---- state an exact resume needs besides weights ---------------------------------------------


def rng_state() -> Dict[str, Any]:
    """Every generator a training step may draw from (in a form `torch.load(weights_only=True)` reads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(states: List[Mapping[str, Any]], rank: int, world_size: int) -> None:
    """This rank's generators from a checkpoint holding every rank's; after a change of world
    size there is no state for this rank, so the fresh (seeded) generators stay, and the log says so."""
    if len(states) == world_size:
        set_rng_state(states[rank])
    elif rank == 0:
        log.info(f"checkpoint has RNG states of {len(states)} rank(s), this run has {world_size}: fresh seeded RNG states")


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer's full state keyed by parameter name; under FSDP2 a collective (every rank
    calls it) that returns the state on rank 0 and {} elsewhere. Name-keyed, so a run can resume
    on another world size."""
    distributed = dist.is_available() and dist.is_initialized()
    # a single process already holds full tensors: the "local" state is the full one
    options = StateDictOptions(full_state_dict=distributed, cpu_offload=distributed, broadcast_from_rank0=distributed)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return state if not distributed or dist.get_rank() == 0 else {}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Inverse of `gather_optimizer_state` (under FSDP2 every rank calls it; rank 0's state is used)."""
    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=distributed, broadcast_from_rank0=distributed)
    set_optimizer_state_dict(model, optimizer, state, options=options)
