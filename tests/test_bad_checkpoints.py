"""A bad HF checkpoint directory fails in one line naming the file and the fix, from config.json
and the safetensors headers alone: before a vLLM engine starts, a model is built or weights are read.
Each test damages a copy of the tiny model and checks that the check leaves its bytes as they were."""

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from rlaif_recipes.checkpointing import CheckpointManager, checkpoint_bytes
from rlaif_recipes.errors import CheckpointError, ConfigError
from rlaif_recipes.files import file_sha256
from rlaif_recipes.models import UnsupportedModelError, check_checkpoint_dir, hf_checkpointer, hf_config
from rlaif_recipes.policy import check_optimizer

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
FIT = "use model=hf (it reads its shape from config.json) or the model config that matches"
RESTORE = "restore config.json from the original model"


@pytest.fixture()
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model to damage (the session's own directory stays intact)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def conf_model(name: str, checkpoint_dir: Path) -> DictConfig:
    """The `model` node of conf/model/<name>.yaml, its ${checkpoint_dir} resolved as in a recipe."""
    return OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), {"checkpoint_dir": str(checkpoint_dir)}).model


def fails(checkpoint_dir: Path, error: type, model: Optional[Any] = None) -> str:
    """The one-line message `check_checkpoint_dir` fails with, after checking it changed no byte."""
    before = digests(checkpoint_dir)
    with pytest.raises(error) as info:
        check_checkpoint_dir(str(checkpoint_dir), model)
    assert digests(checkpoint_dir) == before
    assert "\n" not in str(info.value)
    return str(info.value)


def digests(directory: Path) -> Dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir())}


def vocab(checkpoint_dir: Path) -> int:
    return json.loads((checkpoint_dir / "config.json").read_text())["vocab_size"]


def edit_config(checkpoint_dir: Path, **changes: Any) -> None:
    path = checkpoint_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_good_directory_passes_with_and_without_a_model_config(tiny_model_dir: Path) -> None:
    before = digests(tiny_model_dir)
    for model in (None, conf_model("hf", tiny_model_dir), conf_model("hf_lora", tiny_model_dir)):
        assert check_checkpoint_dir(str(tiny_model_dir), model) is None
    assert digests(tiny_model_dir) == before


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, r"line \d+: .+"),  # the first half of the real file: a partial copy
        (b"model_type: llama\n", "line 1: Expecting value"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_config_json_that_is_not_json(model_dir: Path, content: Optional[bytes], problem: str) -> None:
    path = model_dir / "config.json"
    path.write_bytes(content if content is not None else path.read_bytes()[: path.stat().st_size // 2])
    expected = rf"{re.escape(str(path))} is not valid JSON \({problem}\); restore it from the original model"
    assert re.fullmatch(expected, fails(model_dir, CheckpointError))
    with pytest.raises(CheckpointError, match=expected):
        hf_config(str(model_dir))


def test_config_json_that_is_not_an_object(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("[]")
    assert fails(model_dir, CheckpointError) == (
        f"{model_dir}/config.json holds a JSON list, not an object; restore it from the original model"
    )


def test_missing_config_json_or_directory(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "config.json").unlink()
    assert fails(model_dir, CheckpointError) == (
        f"no config.json in {model_dir}; point checkpoint_dir at an HF model directory"
    )
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_dir(str(tmp_path / "nope"))
    assert str(info.value) == (
        f"no config.json in {tmp_path / 'nope'} (the directory does not exist); "
        "point checkpoint_dir at an HF model directory"
    )


def test_no_safetensors(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    message = f"no *.safetensors weights in {model_dir}; copy the model's weight files there"
    assert fails(model_dir, CheckpointError) == message
    with pytest.raises(CheckpointError) as info:
        hf_checkpointer(str(model_dir), output_dir=str(tmp_path / "out"))
    assert str(info.value) == message


@pytest.mark.parametrize(
    "keep, problem",
    [
        (-100, "is truncated ({size} bytes, its header needs {full})"),
        (200, "is truncated ({size} bytes, its header alone needs {header_end})"),
        (3, "is truncated ({size} bytes, its header needs at least 8)"),
        (0, "is truncated ({size} bytes, its header needs at least 8)"),
    ],
)
def test_truncated_weights(model_dir: Path, keep: int, problem: str) -> None:
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:keep])
    size = path.stat().st_size
    assert fails(model_dir, CheckpointError) == (
        f"{path} {problem.format(size=size, full=len(data), header_end=header_end)}; copy the checkpoint again"
    )


def test_weights_longer_than_their_header_says(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    full = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    assert fails(model_dir, CheckpointError) == (
        f"{path} is longer than its header says ({full + 16} bytes, its header needs {full}); copy the checkpoint again"
    )


@pytest.mark.parametrize("damage", ["length", "json", "table"])
def test_garbage_safetensors_header(model_dir: Path, damage: str) -> None:
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if damage == "length":
        data[:8] = b"\xff" * 8
    elif damage == "json":
        data[8:24] = b"\xff" * 16
    else:
        data[8 : 8 + header_len] = b"[]".ljust(header_len)  # JSON, but no table of tensors
    path.write_bytes(bytes(data))
    reason = {"length": f"length {2**64 - 1}", "json": "not JSON", "table": "not a table of tensors"}[damage]
    assert fails(model_dir, CheckpointError) == (
        f"{path} has an unreadable safetensors header ({reason}); copy the checkpoint again"
    )


def test_missing_shard_of_an_indexed_checkpoint(model_dir: Path) -> None:
    index = model_dir / "model.safetensors.index.json"
    weights = load_file(model_dir / "model.safetensors")
    index.write_text(json.dumps({"weight_map": {
        name: "model.safetensors" if i % 2 else "model-00002-of-00002.safetensors" for i, name in enumerate(weights)
    }}))  # fmt: skip
    assert fails(model_dir, CheckpointError) == (
        f"{index} lists model-00002-of-00002.safetensors, missing from {model_dir}; copy the checkpoint again"
    )


def test_unsupported_architecture_is_a_checkpoint_error(model_dir: Path) -> None:
    edit_config(model_dir, model_type="gemma3")
    message = fails(model_dir, UnsupportedModelError)
    assert message.startswith(f"{model_dir} is not supported (model_type 'gemma3'); supported: Llama")
    assert issubclass(UnsupportedModelError, CheckpointError) and issubclass(UnsupportedModelError, ValueError)


def test_model_config_of_another_size(tiny_model_dir: Path) -> None:
    model = {"_component_": "torchtune.models.qwen2_5.qwen2_5_0_5b"}
    assert fails(tiny_model_dir, ConfigError, model) == (
        f"model=qwen2_5_0_5b does not fit {tiny_model_dir}: tok_embeddings.weight is [151936, 896] in the model, "
        f"[{vocab(tiny_model_dir)}, 128] in the checkpoint; {FIT}"
    )


TINY_SHAPE = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=384, max_seq_len=512)


@pytest.mark.parametrize(
    "component, extra, misfit",
    [
        ("torchtune.models.qwen2.qwen2", {"tie_word_embeddings": False},
         "layers.0.attn.q_proj.bias is in the model, not in the checkpoint"),
        ("torchtune.models.llama3_2.llama3_2", {},  # it ties the embeddings, the tiny model does not
         "output.weight is in the checkpoint, not in the model"),
    ],
)  # fmt: skip
def test_model_config_of_the_right_size_but_another_layout(
    tiny_model_dir: Path, component: str, extra: Dict[str, Any], misfit: str
) -> None:
    model = OmegaConf.create({"_component_": component, "vocab_size": vocab(tiny_model_dir), **TINY_SHAPE, **extra})
    name = component.rsplit(".", 1)[-1]
    assert fails(tiny_model_dir, ConfigError, model) == f"model={name} does not fit {tiny_model_dir}: {misfit}; {FIT}"


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_need_no_weights_in_the_checkpoint(tiny_model_dir: Path, use_dora: bool) -> None:
    """LoRA's lora_a / lora_b and DoRA's magnitudes start untrained, so the checkpoint has none."""
    model = {"_component_": "torchtune.models.llama3_2.lora_llama3_2", "vocab_size": vocab(tiny_model_dir),
             "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
             "lora_rank": 4, "lora_alpha": 8.0, "use_dora": use_dora, "tie_word_embeddings": False,
             **TINY_SHAPE}  # fmt: skip
    check_checkpoint_dir(str(tiny_model_dir), model)


def test_config_json_that_disagrees_with_the_weights(model_dir: Path) -> None:
    edit_config(model_dir, intermediate_size=256)
    check_checkpoint_dir(str(model_dir))  # the files themselves are intact ...
    assert fails(model_dir, CheckpointError, conf_model("hf", model_dir)) == (  # ... but model=hf cannot load them
        f"{model_dir}/config.json does not match the weights beside it: layers.0.mlp.w1.weight is [256, 128] "
        f"in the model, [384, 128] in the checkpoint; {RESTORE}"
    )
    edit_config(model_dir, intermediate_size=384, num_key_value_heads=4)
    message = fails(model_dir, CheckpointError, conf_model("hf_lora", model_dir))
    assert re.fullmatch(
        rf"{re.escape(str(model_dir))}/config.json does not match the weights beside it: model\.layers\.\d+\.self_attn\."
        rf"k_proj\.weight is \[64, 128\], which its heads and hidden_size do not fit; {RESTORE}",
        message,
    )


def test_weight_the_architecture_does_not_have(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    save_file({**load_file(path), "model.layers.0.self_attn.q_norm.weight": torch.ones(32)}, path)
    assert fails(model_dir, CheckpointError, conf_model("hf", model_dir)).startswith(
        f"{model_dir}: weight model.layers.0.self_attn.q_norm.weight is not a llama weight; supported: Llama"
    )


def test_reads_headers_only_even_for_a_huge_file(model_dir: Path) -> None:
    """A 64 GiB weight file (sparse: no disk used) passes at once: no tensor byte is read."""
    path = model_dir / "model.safetensors"
    shape, nbytes = [2**24, 1024], 2**36
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    header_bytes = header.encode().ljust(-(-len(header) // 8) * 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        f.truncate(8 + len(header_bytes) + nbytes)
    check_checkpoint_dir(str(model_dir))
    assert path.stat().st_blocks * 512 < 2**20


# ---- a disk too small for a checkpoint --------------------------------------------------------


def _manager(out: Path, source: Path, keep_last: Optional[int] = None) -> CheckpointManager:
    same = lambda state, _: dict(state)  # noqa: E731  (weights under their own names: no model config needed)
    return CheckpointManager(str(out), str(source), keep_last=keep_last, to_hf=same, from_hf=same)


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_a_byte_and_the_earlier_one_stays(
    small_disk, tiny_model_dir: Path
) -> None:
    out = small_disk(4) / "checkpoints"
    ckpt = _manager(out, tiny_model_dir)
    first = ckpt.save(1, {"w": torch.ones(64, 1024)}, {"optimizer": {"m": torch.zeros(64, 1024)}})  # 0.5 MiB
    with pytest.raises(CheckpointError) as refused:
        ckpt.save(2, {"w": torch.ones(1024, 1024)}, {"optimizer": {"m": torch.zeros(1024, 1024)}})  # 8 MiB
    assert re.fullmatch(
        rf"checkpoint step 2 needs about 8 MiB, and the disk under {re.escape(str(out))} has [0-9] MiB free; "
        "free disk space, lower keep_last_checkpoints, or choose an output_dir on a larger disk",
        str(refused.value),
    )
    assert sorted(p.name for p in out.iterdir()) == [first.name]
    assert ckpt.latest() == first and torch.equal(ckpt.load().model["w"], torch.ones(64, 1024))


def test_a_write_the_disk_runs_out_under_leaves_no_partial_directory(small_disk, tiny_model_dir: Path) -> None:
    """State the size check cannot see (pickled bytes, not tensors) fills the disk mid-write."""
    out = small_disk(4) / "checkpoints"
    ckpt = _manager(out, tiny_model_dir)
    first = ckpt.save(1, {"w": torch.ones(64, 1024)})
    with pytest.raises(CheckpointError) as failed:
        ckpt.save(2, {"w": torch.ones(64, 1024)}, {"notes": b"x" * 8 * 2**20})
    assert re.fullmatch(
        rf"the disk under {re.escape(str(out))} filled while checkpoint step 2 was written \(about \d+ KiB\); the partial "
        r"write is removed and the checkpoints before it are intact: free disk space and resume \(resume_from_checkpoint=true\)",
        str(failed.value),
    )
    assert sorted(p.name for p in out.iterdir()) == [first.name]
    assert ckpt.latest() == first


def test_room_for_the_whole_run_counts_the_checkpoints_kept_and_the_ones_pruned(small_disk, tiny_model_dir: Path) -> None:
    out = small_disk(8) / "checkpoints"
    mib = 2**20
    _manager(out, tiny_model_dir, keep_last=2).check_room(2 * mib, saves=10)  # 2 kept + 1 being written
    with pytest.raises(CheckpointError, match=r"^this run's checkpoints need about 33 MiB \(10 kept by keep_last_checkpoints=None"):
        _manager(out, tiny_model_dir).check_room(3 * mib, saves=10)
    # a resumed run: the checkpoints already there will be pruned, so their space counts as room
    ckpt = _manager(out, tiny_model_dir, keep_last=2)
    for step in (1, 2):
        ckpt.save(step, {"w": torch.ones(512, 1024)})  # 2 MiB each
    ckpt.check_room(2 * mib + 2**16, saves=5)  # 3 x 2.06 MiB at once, 4 MiB of it already there
    with pytest.raises(CheckpointError, match=r"^this run's checkpoints need about 12 MiB \(5 kept by keep_last_checkpoints=None"):
        _manager(out, tiny_model_dir, keep_last=None).check_room(2 * mib, saves=5)


@pytest.mark.parametrize(
    "optimizer, share",
    [({"_component_": "torch.optim.AdamW", "lr": 1e-5}, 2.0),  # two moments per weight
     ({"_component_": "torch.optim.SGD", "lr": 1e-3, "momentum": 0.9}, 1.0),
     ({"_component_": "torch.optim.SGD", "lr": 1e-3}, 0.0)],
)  # fmt: skip
def test_a_checkpoints_planned_size_follows_the_configured_optimizer(optimizer: Dict[str, Any], share: float) -> None:
    """A run with SGD was told it needed AdamW's room: the plan now asks the optimizer itself."""
    measured = check_optimizer(OmegaConf.create(optimizer), dtype=torch.bfloat16)
    assert measured == pytest.approx(share, abs=1e-3)
    model = nn.Linear(256, 256).to(torch.bfloat16)
    model.bias.requires_grad_(False)  # frozen: its weights are saved, no optimizer state
    weights = (256 * 256 + 256) * 2
    assert checkpoint_bytes(model, measured) == pytest.approx(weights + share * 256 * 256 * 2, abs=64)
