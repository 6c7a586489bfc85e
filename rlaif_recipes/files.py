"""Small file helpers shared across the package: hashing, weight stamps, atomic writes."""

import hashlib
import os
from pathlib import Path
from typing import Callable


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weight files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_stamp(checkpoint_dir: str) -> str:
    """Which weights: the directory plus size and mtime of its weight files (cheap, unlike a hash)."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    stamp = ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    return f"{Path(checkpoint_dir).resolve()}[{stamp}]"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(tmp)` on a hidden sibling, then rename it into place, so a
    reader (or a re-run after a kill) never sees half a file. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
