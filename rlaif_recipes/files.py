"""Small file helpers shared across the package."""

import hashlib
from pathlib import Path


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
