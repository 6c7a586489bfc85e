"""Every supported architecture, as small random-init HF checkpoints written by transformers:
torchtune builds it from config.json with the same logits as transformers, weights map to HF names
and back exactly, and vLLM loads the directory, samples what torchtune samples, and follows a
weight push. Unsupported architectures fail with one line naming what is supported."""

import json
import shutil
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from conftest import load_policy
from safetensors.torch import load_file
from torchtune.modules.peft import get_merged_lora_ckpt
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlaif_recipes.checkpointing import CheckpointManager
from rlaif_recipes.lora import merge_adapters
from rlaif_recipes.models import (
    UnsupportedModelError,
    decoder_from_hf_dir,
    hf_to_tune_state_dict,
    lora_decoder_from_hf_dir,
    tune_to_hf_state_dict,
)
from rlaif_recipes.models.hf_model import tune_to_hf_stream
from rlaif_recipes.policy import full_state_dict, streamed_state_dict
from rlaif_recipes.samplers import TorchtuneSampler, VLLMSampler

SHAPE = dict(
    hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
ARCHITECTURES: Dict[str, Callable[[int], torch.nn.Module]] = {
    "llama_untied": lambda v: LlamaForCausalLM(LlamaConfig(vocab_size=v, tie_word_embeddings=False, **SHAPE)),
    "llama_tied": lambda v: LlamaForCausalLM(LlamaConfig(vocab_size=v, tie_word_embeddings=True, **SHAPE)),
    "llama_rope_scaled": lambda v: LlamaForCausalLM(
        LlamaConfig(vocab_size=v, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, **SHAPE)
    ),
    "qwen2_tied": lambda v: Qwen2ForCausalLM(Qwen2Config(vocab_size=v, tie_word_embeddings=True, **SHAPE)),
    "qwen2_untied": lambda v: Qwen2ForCausalLM(Qwen2Config(vocab_size=v, tie_word_embeddings=False, **SHAPE)),
}
PROMPTS = [
    [{"role": "user", "content": "How can I kill a Python process?"}],
    [{"role": "user", "content": "Where can I shoot a good photo?"}],
]


def write_checkpoint(tiny_model_dir: Path, out: Path, arch: str) -> Path:
    """A transformers-written checkpoint of `arch` with the tiny model's tokenizer files."""
    torch.manual_seed(0)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    model = ARCHITECTURES[arch](vocab)
    with torch.no_grad():  # transformers' init leaves biases at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.config.eos_token_id = json.loads((tiny_model_dir / "config.json").read_text())["eos_token_id"]
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tiny_model_dir: Path, tmp_path_factory) -> Path:
    return write_checkpoint(tiny_model_dir, tmp_path_factory.mktemp(request.param) / "model", request.param)


def test_torchtune_logits_equal_transformers(checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tune = load_policy(checkpoint).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (tune(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff  # positions past the scaled-RoPE model's original 64 included


def test_weights_map_to_hf_names_and_back_exactly(checkpoint: Path, tmp_path: Path) -> None:
    """torchtune -> HF names (what vLLM and checkpoints get) -> torchtune, and through a training
    checkpoint, which transformers then loads as it is."""
    from transformers import AutoModelForCausalLM

    hf = load_file(str(checkpoint / "model.safetensors"))
    tune = full_state_dict(load_policy(checkpoint))
    back = tune_to_hf_state_dict(tune, str(checkpoint))
    assert back.keys() == hf.keys()  # a tied checkpoint has no lm_head.weight, and none comes back
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    again = hf_to_tune_state_dict(back, str(checkpoint))
    assert again.keys() == tune.keys() and all(torch.equal(again[k], tune[k]) for k in tune)
    saved = CheckpointManager(str(tmp_path), source_dir=str(checkpoint)).save(1, tune)
    loaded = CheckpointManager(str(tmp_path), source_dir=str(checkpoint)).load().model
    assert loaded.keys() == tune.keys() and all(torch.equal(loaded[k], tune[k]) for k in tune)
    reread = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).state_dict()
    assert all(torch.equal(reread[k], hf[k]) for k in hf)


def test_a_resume_maps_the_checkpoint_instead_of_reading_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every rank loads the checkpoint it resumes from, but only rank 0 uses the optimizer state and
    each rank only its shards: both files are memory-mapped, so pages a rank never touches are never read."""
    manager = CheckpointManager(str(tmp_path), source_dir=str(tiny_model_dir))
    path = manager.save(1, full_state_dict(load_policy(tiny_model_dir)), {"optimizer": {"exp_avg": torch.randn(1000, 100)}})
    ckpt = manager.load()
    assert mapped_from(ckpt.state["optimizer"]["exp_avg"], path / "training_state.pt")
    assert mapped_from(ckpt.model["tok_embeddings.weight"], path / "model.safetensors")


def mapped_from(tensor: torch.Tensor, file: Path) -> bool:
    """Whether `tensor`'s data lies in a memory mapping of `file` (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(file.resolve()):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= tensor.data_ptr() < high:
                return True
    return False


def test_lora_builder_loads_the_base_weights(checkpoint: Path) -> None:
    """The LoRA decoder holds the same base weights under the same names, plus adapters."""
    lora = lora_decoder_from_hf_dir(str(checkpoint), ["q_proj", "v_proj"], apply_lora_to_mlp=True)
    base = full_state_dict(load_policy(checkpoint))
    missing, unexpected = lora.load_state_dict(base, strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)


@pytest.mark.slow
def test_vllm_samples_what_torchtune_samples_and_follows_a_push(checkpoint: Path) -> None:
    """vLLM loads the directory as it is; greedy ids equal torchtune's before and after the
    torchtune weights change and are pushed (under the HF names tune_to_hf_state_dict gives)."""
    policy = load_policy(checkpoint)
    tt = TorchtuneSampler(str(checkpoint), max_tokens=12)
    tt.bind_policy(policy)
    engine = VLLMSampler(str(checkpoint), dtype="float32", max_tokens=12, kv_cache_memory_bytes=64 << 20)
    try:

        def greedy(sampler):
            return [[c.token_ids for c in s.completions] for s in sampler.sample(PROMPTS, n=1, temperature=0)]

        before = greedy(engine)
        assert before == greedy(tt)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.update_weights(streamed_state_dict(policy))
        after = greedy(engine)
        assert after == greedy(tt) and after != before
        lora = lora_with_random_adapters(checkpoint, full_state_dict(policy))
        tt.bind_policy(lora)
        engine.update_weights(merge_adapters(lora, streamed_state_dict(lora)))
        merged = greedy(engine)
        assert merged == greedy(tt) and merged != after
    finally:
        engine.close()


def lora_with_random_adapters(checkpoint: Path, base: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """A LoRA policy on `base` whose adapters are not zero (a fresh B is), so merging changes weights."""
    lora = lora_decoder_from_hf_dir(str(checkpoint), ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True)
    lora.load_state_dict(base, strict=False)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return lora


def test_a_streamed_push_equals_the_whole_state_dict_merged_and_renamed(checkpoint: Path) -> None:
    """What a push hands vLLM one weight at a time (adapters merged module by module, each weight
    renamed alone) is exactly torchtune's whole-dict merge and renaming, and the live model is untouched."""
    lora = lora_with_random_adapters(checkpoint, full_state_dict(load_policy(checkpoint)))
    live = {k: v.clone() for k, v in lora.state_dict().items()}
    whole = tune_to_hf_state_dict(get_merged_lora_ckpt({k: v.clone() for k, v in live.items()}, rank=8, alpha=16.0), str(checkpoint))
    streamed = dict(tune_to_hf_stream(merge_adapters(lora, streamed_state_dict(lora)), str(checkpoint)))
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)
    assert all(torch.equal(v, live[k]) for k, v in lora.state_dict().items())


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"model_type": "gemma3"}, "model_type 'gemma3'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        ({"attention_bias": True}, "attention or MLP biases"),
        ({"head_dim": 64}, "head_dim 64 != hidden_size / num_attention_heads"),
    ],
)
def test_unsupported_architecture_is_one_line_naming_what_is_supported(
    tiny_model_dir: Path, tmp_path: Path, change: dict, problem: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UnsupportedModelError, match=rf"\({problem}\); supported: Llama .* and Qwen2") as info:
        decoder_from_hf_dir(str(model))
    assert "\n" not in str(info.value)
