"""Recipes run end to end through `tune run` and `rlaif run`, on one process and under torchrun."""

from pathlib import Path

import pytest
from conftest import run_cli, what_failed

from rlaif_recipes.recipes.generate_pairs import load_generated

SMALL = ["data.max_prompts=12", "prompts_per_shard=4", "sampler.max_tokens=12", "n=2"]


def generate(tmp_path: Path, out: str, model: Path, *extra: str, launcher=()) -> Path:
    result = run_cli(["tune", "run", *launcher, "rlaif_recipes/recipes/generate_pairs.py", "--config", "generate_pairs",
                      f"checkpoint_dir={model}", f"output_dir={tmp_path / out}", *SMALL, *extra], cwd=tmp_path)
    assert result.returncode == 0, what_failed(result)
    return tmp_path / out


def rows(out: Path) -> list:
    return sorted(load_generated(str(out)).to_list(), key=lambda r: r["prompt_id"])


def test_make_tiny_model_recipe(tmp_path: Path) -> None:
    """`rlaif make-tiny-model --out DIR` is `rlaif run make_tiny_model out=DIR` (the recipe through `tune run`)."""
    result = run_cli(["rlaif", "make-tiny-model", "--out", str(tmp_path / "m"), "dim=64", "num_heads=2", "num_kv_heads=1"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()}


@pytest.mark.slow
def test_generate_pairs_writes_dataset_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = generate(tmp_path, "gen", tiny_model_dir, "sampler=torchtune")
    first = rows(out)
    assert len(first) == 12 and all(len(r["responses"]) == 2 == len(r["response_token_ids"]) for r in first)
    assert "sampler=torchtune" not in (out / "config.yaml").read_text() and "TorchtuneSampler" in (out / "config.yaml").read_text()
    shards = sorted((out / "data").glob("shard-*.parquet"))
    assert len(shards) == 3
    # A killed run leaves finished shards (and maybe a temp file); a re-run redoes only what is missing.
    shards[1].unlink()
    (out / "data" / ".shard-00001.parquet.tmp").write_bytes(b"partial")
    kept = shards[0].stat().st_mtime_ns
    generate(tmp_path, "gen", tiny_model_dir, "sampler=torchtune")
    assert shards[0].stat().st_mtime_ns == kept
    assert rows(out) == first  # per-shard seeds: the redone shard has the same samples


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_generate_pairs_matches_single_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    single = generate(tmp_path, "single", tiny_model_dir, "sampler=torchtune", "sampler.temperature=1.0")
    sharded = generate(tmp_path, "fsdp", tiny_model_dir, "sampler=torchtune", "sampler.temperature=1.0",
                       launcher=["--nproc_per_node", "2"])
    assert [r["response_token_ids"] for r in rows(sharded)] == [r["response_token_ids"] for r in rows(single)]


@pytest.mark.slow
@pytest.mark.distributed
def test_vllm_engine_per_rank_under_torchrun(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = generate(tmp_path, "vllm2", tiny_model_dir, "sampler=vllm", launcher=["--nproc_per_node", "2"])
    assert len(rows(out)) == 12


@pytest.mark.slow
def test_rlaif_run_sweep(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = run_cli(["rlaif", "run", "generate_pairs", "-m", "sampler=torchtune", "sampler.temperature=0.7,1.3",
                      f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'sweep'}", *SMALL], cwd=tmp_path)
    assert result.returncode == 0, what_failed(result)
    assert "sweep finished: 2 of 2 runs succeeded" in result.stdout
    a, b = (rows(tmp_path / "sweep" / "sweep" / str(i)) for i in (0, 1))
    assert "temperature: 0.7" in (tmp_path / "sweep" / "sweep" / "0" / "config.yaml").read_text()
    assert "temperature: 1.3" in (tmp_path / "sweep" / "sweep" / "1" / "config.yaml").read_text()
    assert [r["responses"] for r in a] != [r["responses"] for r in b]
