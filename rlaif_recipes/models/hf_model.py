"""Build a torchtune decoder from an HF checkpoint's config.json, and map weights between names.

torchtune's model builders (`llama3_2_1b`, ...) hard-code their shapes; these read them from the
checkpoint instead, so any local HF directory of a supported architecture trains in torchtune and
its weights go back to vLLM, transformers and checkpoints under HF names:

- Llama (`model_type: llama`): tied or untied embeddings (SmolLM2, Llama 3.2, the tiny test
  model ...), plain RoPE or Llama-3 RoPE scaling (`rope_scaling` / `rope_parameters`);
- Qwen2 (`model_type: qwen2`): q/k/v biases, tied or untied embeddings.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune.models import convert_weights
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.models.qwen2 import lora_qwen2, qwen2
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune, qwen2_tune_to_hf
from torchtune.modules import TransformerDecoder
from torchtune.training import FullModelHFCheckpointer

SUPPORTED = "Llama (model_type llama: tied or untied embeddings, plain or llama3 RoPE scaling) and Qwen2 (qwen2)"


class UnsupportedModelError(ValueError):
    """An HF checkpoint this package cannot build; the message names what is supported."""


def hf_config(checkpoint_dir: str) -> Dict[str, Any]:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}; point checkpoint_dir at an HF model directory")
    return json.loads(path.read_text())


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
    files = list(checkpoint_files) if checkpoint_files else sorted(p.name for p in Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {checkpoint_dir}; it needs the model's weight files")
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
    cfg = hf_config(checkpoint_dir)
    if cfg.get("model_type") == "qwen2":
        return qwen2_tune_to_hf(state_dict, **_weight_shape(cfg), tie_word_embeddings=_tied(cfg))
    return convert_weights.tune_to_hf(state_dict, **_weight_shape(cfg))


def hf_to_tune_state_dict(state_dict: Dict[str, torch.Tensor], checkpoint_dir: str) -> Dict[str, torch.Tensor]:
    """HF names -> torchtune names: the inverse of tune_to_hf_state_dict, for reading checkpoints back."""
    cfg = hf_config(checkpoint_dir)
    if cfg.get("model_type") == "qwen2":
        return qwen2_hf_to_tune(state_dict, **_weight_shape(cfg), tie_word_embeddings=_tied(cfg))
    if _tied(cfg):
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    return convert_weights.hf_to_tune(state_dict, **_weight_shape(cfg))


# ---- reading config.json ----------------------------------------------------------------------


def _supported_config(checkpoint_dir: str) -> Dict[str, Any]:
    """config.json, after checking that the builders here reproduce the architecture exactly."""
    cfg = hf_config(checkpoint_dir)
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
