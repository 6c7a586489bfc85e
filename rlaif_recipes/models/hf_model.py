"""Build a torchtune decoder from an HF checkpoint's config.json, and map weights between names.

torchtune's model builders (`llama3_2_1b`, ...) hard-code their shapes; these read them from the
checkpoint instead, so any local HF directory of a supported architecture trains in torchtune and
its weights go back to vLLM, transformers and checkpoints under HF names:

- Llama (`model_type: llama`): tied or untied embeddings (SmolLM2, Llama 3.2, the tiny test
  model ...), plain RoPE or Llama-3 RoPE scaling (`rope_scaling` / `rope_parameters`);
- Qwen2 (`model_type: qwen2`): q/k/v biases, tied or untied embeddings.

`check_checkpoint_dir` vets a directory from its config.json and safetensors headers alone, so a
bad checkpoint fails in one line before a vLLM engine starts or gigabytes of weights are read.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tune_config
from torchtune.models import convert_weights
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.models.qwen2 import lora_qwen2, qwen2
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune, qwen2_tune_to_hf
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import get_adapter_params
from torchtune.training import FullModelHFCheckpointer

from rlaif_recipes.errors import CheckpointError, ConfigError

SUPPORTED = "Llama (model_type llama: tied or untied embeddings, plain or llama3 RoPE scaling) and Qwen2 (qwen2)"
_RESTORE_CONFIG = "restore config.json from the original model"
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size: a longer one is garbage


class UnsupportedModelError(CheckpointError, ValueError):
    """An HF checkpoint this package cannot build; the message names what is supported (still a
    ValueError, which callers caught before it was a CheckpointError)."""


def hf_config(checkpoint_dir: str, key: str = "checkpoint_dir") -> Dict[str, Any]:
    """config.json as a dict; a missing or corrupt one is a CheckpointError that says what to do
    (`key`: the setting that named the directory)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        where = "" if Path(checkpoint_dir).is_dir() else " (the directory does not exist)"
        raise CheckpointError(
            f"no config.json in {checkpoint_dir}{where}; point {key} at an HF model directory"
        )
    fix = "restore it from the original model"
    try:
        cfg = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not valid JSON (not UTF-8 text); {fix}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds a JSON {type(cfg).__name__}, not an object; {fix}")
    return cfg


def check_checkpoint_dir(checkpoint_dir: str, model: Optional[DictConfig | Mapping] = None, key: str = "checkpoint_dir") -> None:
    """Fail with one line, before any engine start, model build or weight read, if `checkpoint_dir`
    cannot be loaded (a CheckpointError): config.json missing, corrupt or of an unsupported
    architecture; a shard that model.safetensors.index.json lists is missing; no *.safetensors; a
    weight file with an unreadable header, or not exactly as long as its header says (truncated).

    Given `model` (a config node with `_component_`, as in conf/model/*.yaml), also check that the
    model's weights have the checkpoint's names and shapes, LoRA adapters aside: a ConfigError
    naming the first misfit, or a CheckpointError when `model` reads its shape from this very
    config.json (model=hf), since then config.json disagrees with the weights.

    Cheap: it reads config.json and each file's safetensors header (8 bytes and a JSON header, 30 kB
    for SmolLM2-135M), never a tensor, and builds `model` on the meta device, which allocates no
    weights (timings: bench/RESULTS.md). `key` is the setting that named the directory.
    """
    cfg = _supported_config(checkpoint_dir, key)
    _check_index(Path(checkpoint_dir))
    shapes: Dict[str, List[int]] = {}
    for name in _weight_files(checkpoint_dir):
        shapes.update(_safetensors_shapes(Path(checkpoint_dir) / name))
    if model is not None:
        _check_fit(checkpoint_dir, cfg, shapes, model)


def decoder_from_hf_dir(checkpoint_dir: str, max_seq_len: Optional[int] = None) -> TransformerDecoder:
    """A torchtune decoder shaped like the HF checkpoint in `checkpoint_dir` (random weights)."""
    cfg = _supported_config(checkpoint_dir)
    if cfg["model_type"] == "qwen2":
        return qwen2(**_common_shape(cfg, max_seq_len))
    return _with_rope_scaling(llama3_2(**_llama_shape(cfg, max_seq_len)), cfg)


def lora_decoder_from_hf_dir(
    checkpoint_dir: str,
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    max_seq_len: Optional[int] = None,
) -> TransformerDecoder:
    """The same decoder with torchtune's LoRA adapters; the base weights load unchanged."""
    cfg = _supported_config(checkpoint_dir)
    lora = dict(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    )
    if cfg["model_type"] == "qwen2":
        return lora_qwen2(**lora, **_common_shape(cfg, max_seq_len))
    return _with_rope_scaling(lora_llama3_2(**lora, **_llama_shape(cfg, max_seq_len)), cfg)


def hf_checkpointer(
    checkpoint_dir: str, output_dir: str, checkpoint_files: Optional[List[str]] = None, **checkpointer_args: Any
) -> FullModelHFCheckpointer:
    """torchtune's HF checkpointer with the model type and weight files read from the directory
    (other arguments, e.g. the recipe state torchtune's own recipes resume from, pass through)."""
    cfg = _supported_config(checkpoint_dir)
    files = list(checkpoint_files) if checkpoint_files else _weight_files(checkpoint_dir)
    model_type = "QWEN2" if cfg["model_type"] == "qwen2" else ("LLAMA3_2" if _tied(cfg) else "LLAMA3")
    return _TiedAwareCheckpointer(
        checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type=model_type, output_dir=str(output_dir),
        **checkpointer_args,
    )


class _TiedAwareCheckpointer(FullModelHFCheckpointer):
    """Drops a tied model's redundant `lm_head.weight`, which some HF writers keep beside the embeddings."""

    def load_checkpoint(self) -> Dict[str, Any]:
        state = super().load_checkpoint()
        if _tied(self._config):
            state["model"].pop("output.weight", None)
        return state


def tune_to_hf_state_dict(state_dict: Dict[str, torch.Tensor], checkpoint_dir: str) -> Dict[str, torch.Tensor]:
    """torchtune-named weights -> HF names (what vLLM and transformers load); a tied model has no
    `lm_head.weight`."""
    return _tune_to_hf(state_dict, hf_config(checkpoint_dir))


def tune_to_hf_stream(
    weights: Iterable[Tuple[str, torch.Tensor]], checkpoint_dir: str
) -> Iterator[Tuple[str, torch.Tensor]]:
    """`tune_to_hf_state_dict` one weight at a time, for a stream that never holds the whole model
    (each mapping is per weight: a name, and for Llama's q/k a permutation of that weight alone)."""
    cfg = hf_config(checkpoint_dir)
    for name, value in weights:
        yield from _tune_to_hf({name: value}, cfg).items()


def _tune_to_hf(state_dict: Dict[str, torch.Tensor], cfg: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    if cfg.get("model_type") == "qwen2":
        return qwen2_tune_to_hf(state_dict, **_weight_shape(cfg), tie_word_embeddings=_tied(cfg))
    return convert_weights.tune_to_hf(state_dict, **_weight_shape(cfg))


def hf_to_tune_state_dict(state_dict: Dict[str, torch.Tensor], checkpoint_dir: str) -> Dict[str, torch.Tensor]:
    """HF names -> torchtune names: the inverse of tune_to_hf_state_dict, for reading checkpoints back."""
    return _hf_to_tune(state_dict, hf_config(checkpoint_dir))


def _hf_to_tune(state_dict: Dict[str, torch.Tensor], cfg: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    if cfg.get("model_type") == "qwen2":
        return qwen2_hf_to_tune(state_dict, **_weight_shape(cfg), tie_word_embeddings=_tied(cfg))
    if _tied(cfg):
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    return convert_weights.hf_to_tune(state_dict, **_weight_shape(cfg))


# ---- checking a directory without loading it -------------------------------------------------


def _weight_files(checkpoint_dir: str) -> List[str]:
    files = sorted(p.name for p in Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {checkpoint_dir}; copy the model's weight files there")
    return files


def _check_index(checkpoint_dir: Path) -> None:
    """A sharded checkpoint's index names every shard; one missing means a partial copy."""
    path = checkpoint_dir / "model.safetensors.index.json"
    if not path.is_file():
        return
    try:
        shards = set(json.loads(path.read_bytes())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _copy_again(path, "is not a safetensors index (no weight_map)") from None
    missing = sorted(str(s) for s in shards if not (checkpoint_dir / str(s)).is_file())
    if missing:
        raise _copy_again(path, f"lists {', '.join(missing)}, missing from {checkpoint_dir}")


def _safetensors_shapes(path: Path) -> Dict[str, List[int]]:
    """Tensor shapes from a safetensors header, after checking the file is exactly as long as the
    header says (what safetensors itself demands when it loads the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _copy_again(path, f"is truncated ({size} bytes, its header needs at least 8)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER:
            raise _copy_again(path, f"has an unreadable safetensors header (length {header_len})")
        if 8 + header_len > size:
            raise _copy_again(path, f"is truncated ({size} bytes, its header alone needs {8 + header_len})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:
        raise _copy_again(path, "has an unreadable safetensors header (not JSON)") from None
    try:
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: [int(d) for d in v["shape"]] for k, v in entries.items()}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise _copy_again(path, "has an unreadable safetensors header (not a table of tensors)") from None
    needed = 8 + header_len + end
    if size < needed:
        raise _copy_again(path, f"is truncated ({size} bytes, its header needs {needed})")
    if size > needed:
        raise _copy_again(path, f"is longer than its header says ({size} bytes, its header needs {needed})")
    return shapes


def _copy_again(path: Path, problem: str) -> CheckpointError:
    """A damaged file of the checkpoint: a fresh copy of it is the fix."""
    return CheckpointError(f"{path} {problem}; copy the checkpoint again")


def _check_fit(
    checkpoint_dir: str, cfg: Dict[str, Any], hf_shapes: Dict[str, List[int]], model: DictConfig | Mapping
) -> None:
    """Compare the model config's weights (built on the meta device) with the checkpoint's, by the
    torchtune names the checkpointer would load them under."""
    node = model if isinstance(model, DictConfig) else OmegaConf.create(dict(model))
    with torch.device("meta"):
        built = tune_config.instantiate(node)
    misfit = _first_misfit(
        {k: list(v.shape) for k, v in built.state_dict().items()},
        _tune_shapes(checkpoint_dir, cfg, hf_shapes),
        adapters=set(get_adapter_params(built)),
    )
    if misfit and _reads_shape_from(node, checkpoint_dir):  # model=hf on this directory: config.json is wrong
        raise CheckpointError(f"{_config_misfit(checkpoint_dir)}: {misfit}; {_RESTORE_CONFIG}")
    if misfit:
        name = str(node["_component_"]).rsplit(".", 1)[-1]
        raise ConfigError(
            f"model={name} does not fit {checkpoint_dir}: {misfit}; "
            "use model=hf (it reads its shape from config.json) or the model config that matches"
        )


def _reads_shape_from(node: DictConfig, checkpoint_dir: str) -> bool:
    """Whether the model config builds from this directory's config.json (model=hf, model=hf_lora)."""
    own = node.get("checkpoint_dir")
    return own is not None and Path(str(own)).resolve() == Path(checkpoint_dir).resolve()


def _config_misfit(checkpoint_dir: str) -> str:
    return f"{Path(checkpoint_dir) / 'config.json'} does not match the weights beside it"


def _first_misfit(
    wanted: Dict[str, List[int]], have: Dict[str, List[int]], adapters: Set[str]
) -> Optional[str]:
    """What a strict load_state_dict would trip on first: a shape, then a missing weight (new LoRA
    adapters excepted: they start untrained), then a weight the model has no place for."""
    for key, shape in wanted.items():
        if key in have and have[key] != shape:
            return f"{key} is {shape} in the model, {have[key]} in the checkpoint"
    for key in wanted:
        if key not in have and key not in adapters:
            return f"{key} is in the model, not in the checkpoint"
    for key in have:
        if key not in wanted:
            return f"{key} is in the checkpoint, not in the model"
    return None


def _tune_shapes(
    checkpoint_dir: str, cfg: Dict[str, Any], hf_shapes: Dict[str, List[int]]
) -> Dict[str, List[int]]:
    """The checkpoint's shapes under torchtune names, mapped by the same converter the checkpoint
    loads through, one meta tensor at a time so that a bad weight is named."""
    shapes: Dict[str, List[int]] = {}
    for key, shape in hf_shapes.items():
        try:
            converted = _hf_to_tune({key: torch.empty(shape, device="meta")}, cfg)
        except RuntimeError:  # q/k projections are permuted per head: a shape that config.json does not fit
            raise CheckpointError(
                f"{_config_misfit(checkpoint_dir)}: {key} is {shape}, which its heads and hidden_size do not fit; "
                f"{_RESTORE_CONFIG}"
            ) from None
        except Exception:  # torchtune's name map raises a bare Exception for a name it does not know
            raise CheckpointError(
                f"{checkpoint_dir}: weight {key} is not a {cfg['model_type']} weight; supported: {SUPPORTED}"
            ) from None
        shapes.update({k: list(v.shape) for k, v in converted.items()})
    return shapes


# ---- reading config.json ----------------------------------------------------------------------


def _supported_config(checkpoint_dir: str, key: str = "checkpoint_dir") -> Dict[str, Any]:
    """config.json, after checking that the builders here reproduce the architecture exactly."""
    cfg = hf_config(checkpoint_dir, key)
    kind = cfg.get("model_type")
    problem = None
    if kind not in ("llama", "qwen2"):
        problem = f"model_type {kind!r}"
    elif cfg.get("hidden_act", "silu") != "silu":
        problem = f"hidden_act {cfg['hidden_act']!r}"
    elif kind == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        problem = "attention or MLP biases"
    elif cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        problem = f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads"
    elif kind == "qwen2" and cfg.get("use_sliding_window"):
        problem = "sliding-window attention"
    elif _rope_type(cfg) not in (("default", "llama3") if kind == "llama" else ("default",)):
        problem = f"RoPE scaling {_rope_type(cfg)!r}"
    if problem:
        raise UnsupportedModelError(f"{checkpoint_dir} is not supported ({problem}); supported: {SUPPORTED}")
    return cfg


def _rope_scaling(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """RoPE settings: transformers 5 writes `rope_parameters`, older versions `rope_scaling`."""
    scaling = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling["type"]
    return scaling


def _rope_type(cfg: Dict[str, Any]) -> str:
    return _rope_scaling(cfg).get("rope_type") or "default"


def _rope_base(cfg: Dict[str, Any]) -> float:
    return float(cfg.get("rope_theta") or _rope_scaling(cfg).get("rope_theta", 10000.0))


def _common_shape(cfg: Dict[str, Any], max_seq_len: Optional[int]) -> Dict[str, Any]:
    return dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        embed_dim=cfg["hidden_size"],
        intermediate_dim=cfg["intermediate_size"],
        max_seq_len=max_seq_len or cfg["max_position_embeddings"],
        norm_eps=cfg["rms_norm_eps"],
        rope_base=_rope_base(cfg),
        tie_word_embeddings=_tied(cfg),
    )


def _llama_shape(cfg: Dict[str, Any], max_seq_len: Optional[int]) -> Dict[str, Any]:
    # torchtune's Llama-3.2 builder takes both embedding layouts and Llama-3 scaled RoPE; a scale
    # factor of 1 leaves every frequency as it is (plain RoPE)
    factor = _rope_scaling(cfg).get("factor", 1.0) if _rope_type(cfg) == "llama3" else 1.0
    return {**_common_shape(cfg, max_seq_len), "scale_factor": factor}


def _with_rope_scaling(model: TransformerDecoder, cfg: Dict[str, Any]) -> TransformerDecoder:
    """Set the Llama-3 RoPE settings the builder leaves at Llama 3.1's values (its layers share one
    RoPE module), then rebuild its cache (on the meta device build_policy does it after sharding)."""
    if _rope_type(cfg) != "llama3":
        return model
    scaling = _rope_scaling(cfg)
    rope = model.layers[0].attn.pos_embeddings
    rope.low_freq_factor = scaling.get("low_freq_factor", rope.low_freq_factor)
    rope.high_freq_factor = scaling.get("high_freq_factor", rope.high_freq_factor)
    rope.old_context_len = scaling.get("original_max_position_embeddings", rope.old_context_len)
    rope.rope_init()
    return model


def _weight_shape(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The attention shape torchtune's weight converters need to permute q/k projections."""
    return {
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "dim": cfg["hidden_size"],
        "head_dim": cfg.get("head_dim"),
    }


def _tied(cfg: Dict[str, Any]) -> bool:
    return bool(cfg.get("tie_word_embeddings", False))
