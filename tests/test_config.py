"""Hydra composition behind torchtune's CLI: groups, overrides, fail-fast errors, saving, sweeps."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.cli import _sweep
from rlaif_recipes.recipes.generate_pairs import GeneratePairsSettings


def load(*overrides: str, config: str = "generate_pairs"):
    return rlaif_config.load(config, list(overrides), GeneratePairsSettings)


def test_group_selection_and_value_override() -> None:
    cfg = load("sampler=torchtune", "sampler.temperature=0.5", "seed=7")
    assert cfg.sampler._component_ == "rlaif_recipes.samplers.TorchtuneSampler"
    assert cfg.sampler.temperature == 0.5
    assert cfg.sampler.seed == 7  # interpolated from the top-level seed
    assert cfg.config_choices.sampler == "torchtune"
    assert load().sampler._component_ == "rlaif_recipes.samplers.VLLMSampler"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampler=vlm", "unknown option 'vlm' for config group 'sampler'; choose one of: torchtune, vllm"),
        ("data=nope", "unknown option 'nope' for config group 'data'; choose one of: xstest_advbench, xstest_all, xstest_safe"),
        ("sampler.temprature=0.5", "unknown config key 'sampler.temprature'"),
        ("sampler={temperature: 0.5, top_q: 1}", "adds key 'sampler.top_q', which its config does not have; check the spelling, or replace the whole value with ++sampler=..."),
        ("sampler.temperature=hot", "'sampler.temperature' must be float, got 'hot'"),
        ("n=two", "'n' must be int, got 'two'"),
        ("model=llama3_2_1b_instruct", "missing required value(s): checkpoint_dir"),
    ],
)
def test_config_errors_are_one_clear_line(override: str, message: str) -> None:
    with pytest.raises(rlaif_config.ConfigError) as err:
        load(override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "config, bad, message, fine",
    [
        ("generate_pairs", "sampler.temperature=-1", "sampler.temperature=-1: must be >= 0", "sampler.temperature=0"),
        ("generate_pairs", "sampler.top_p=0", "sampler.top_p=0: the nucleus mass must be in (0, 1]", "sampler.top_p=1"),
        ("evaluate", "sampler.max_tokens=0", "sampler.max_tokens=0: new tokens per reply must be >= 1", "sampler.max_tokens=1"),
        ("online_dpo", "loss.beta=-0.1", "loss.beta=-0.1: the pull towards the reference must be > 0", "loss.beta=0.01"),
        ("dpo", "optimizer.lr=abc", "optimizer.lr=abc: the learning rate must be a number > 0", "optimizer.lr=1e-7"),
        ("dpo", "loss.label_smoothing=0.5", "loss.label_smoothing=0.5: the share of labels taken as flipped", "loss.label_smoothing=0.2"),
        ("generate_pairs", "sampler.tensor_parallel_size=0", "sampler.tensor_parallel_size=0: GPUs per vLLM engine must be >= 1", "sampler.tensor_parallel_size=1"),
        ("dpo", "clip_grad_norm=-1", "clip_grad_norm=-1: the gradient-norm cap must be > 0", "clip_grad_norm=0.01"),
        ("online_dpo", "clip_grad_norm=0", "clip_grad_norm=0: the gradient-norm cap must be > 0", "clip_grad_norm=null"),
        ("online_dpo", "max_seq_len=1", "max_seq_len=1: tokens per sequence must be >= 2", "max_seq_len=2"),
        ("dpo", "max_seq_len=-1", "max_seq_len=-1: tokens per sequence must be >= 2", "max_seq_len=2"),
        ("dpo", "distributed_timeout_s=0", "distributed_timeout_s=0: a collective's wait must be > 0", "distributed_timeout_s=0.5"),
        ("online_dpo", "lr_scheduler.num_warmup_steps=-1", "lr_scheduler.num_warmup_steps=-1: warm-up steps must be >= 0", "lr_scheduler.num_warmup_steps=0"),
    ],
)
def test_out_of_range_values_fail_when_the_config_is_read(config: str, bad: str, message: str, fine: str) -> None:
    """Before the engine or the model starts: a sampler saw its settings only at its first sample,
    and torchtune's DPOLoss trains a negative beta's preferences backwards without a word."""
    with pytest.raises(rlaif_config.ConfigError) as err:
        rlaif_config.load(config, ["checkpoint_dir=x", bad])
    assert message in str(err.value) and "\n" not in str(err.value)
    rlaif_config.load(config, ["checkpoint_dir=x", fine])  # the edge of the range is accepted


def test_unknown_key_in_a_users_yaml_names_the_valid_keys(tmp_path: Path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text("defaults:\n  - model: hf\n  - sampler: torchtune\n  - data: xstest_safe\n  - _self_\n"
                    "output_dir: out\nseed: 0\nn: 2\nprompts_per_shard: 8\ndevice: cpu\ndtype: fp32\nbatch_sise: 3\n")
    with pytest.raises(rlaif_config.ConfigError, match=r"unknown config key\(s\) \['batch_sise'\].*valid top-level keys"):
        rlaif_config.load(str(user), [], GeneratePairsSettings)
    user.write_text(user.read_text().replace("batch_sise: 3\n", "sampler:\n  tempreature: 1.0\n"))
    with pytest.raises(rlaif_config.ConfigError, match="unknown key 'sampler.tempreature' for rlaif_recipes.samplers.TorchtuneSampler; valid keys: .*temperature"):
        rlaif_config.load(str(user), [], GeneratePairsSettings)


def test_copied_config_composes_with_groups_from_the_package(tmp_path: Path) -> None:
    result = run_cli(["rlaif", "cp", "generate_pairs", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "generate_pairs.yaml"
    copy.write_text(copy.read_text().replace("n: 2 ", "n: 4 "))
    cfg = rlaif_config.load(str(copy), ["sampler=torchtune"], GeneratePairsSettings)
    assert cfg.n == 4 and cfg.sampler._component_.endswith("TorchtuneSampler")
    again = run_cli(["rlaif", "cp", "generate_pairs", str(tmp_path)], cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr


def test_saved_config_redacts_secrets(tmp_path: Path, monkeypatch) -> None:
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_JUDGE_API_KEY", secret)
    cfg = rlaif_config.load("generate_pairs", ["+judge.api_key=plain-secret-value", "+judge.api_key_env=MY_JUDGE_API_KEY",
                                               "+judge.header=Bearer ${oc.env:MY_JUDGE_API_KEY}", "+judge.max_tokens=16"])
    assert cfg.judge.header == f"Bearer {secret}"  # the run itself sees the value
    saved = rlaif_config.save(cfg, str(tmp_path)).read_text()
    assert secret not in saved and "plain-secret-value" not in saved
    assert "MY_JUDGE_API_KEY" in saved and "max_tokens: 16" in saved  # names and ordinary keys stay


def test_sweep_expands_every_combination() -> None:
    jobs = _sweep(["loss=dpo,hinge", "seed=1,2", "n=3"])
    assert sorted(map(tuple, jobs)) == sorted(
        (f"loss={loss}", f"seed={seed}", "n=3") for loss in ("dpo", "hinge") for seed in (1, 2)
    )


def test_tune_run_fails_fast_with_one_line(tmp_path: Path) -> None:
    result = run_cli(["tune", "run", "rlaif_recipes/recipes/generate_pairs.py", "--config", "generate_pairs", "sampler=nope"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: unknown option 'nope' for config group 'sampler'; choose one of: torchtune, vllm, vllm_gpu"
    )


def test_rlaif_ls_lists_recipes_and_groups(tmp_path: Path) -> None:
    out = run_cli(["rlaif", "ls"], cwd=tmp_path).stdout
    from rlaif_recipes.config import group_options

    assert all(f"  {r}\n" in out for r in ("generate_pairs", "judge_pairs", "dpo", "online_dpo", "evaluate", "audit_judge"))
    for group in ("sampler", "judge", "loss", "rubric"):
        assert f"{group}: {', '.join(group_options(group))}" in out
    assert {"rule", "openai", "anthropic", "llm", "reward_model", "panel", "router"} <= set(group_options("judge"))
    # conf/sft.yaml is torchtune's (full_finetune_single_device), listed apart, not as a config of ours
    ours = out.split("configs:\n")[1].split("config groups")[0]
    assert "  dpo\n" in ours and "sft" not in ours
    assert "sft.yaml   (tune run full_finetune_single_device --config PATH)" in out


def test_a_recipe_answers_to_both_spellings(tmp_path: Path) -> None:
    """`rlaif run audit-judge`, `rlaif run audit_judge` and `rlaif audit-judge` are one recipe: each
    reaches its config check (here refusing an unknown key), none says "unknown recipe"."""
    for argv in (["rlaif", "run", "audit-judge"], ["rlaif", "run", "audit_judge"], ["rlaif", "audit-judge"]):
        result = run_cli([*argv, "+nope=1"], cwd=tmp_path)
        assert result.returncode != 0 and "unknown recipe" not in result.stderr, result.stderr[-2000:]
        assert "config error: unknown config key(s) ['nope']" in result.stderr


def test_configs_ship_inside_a_non_editable_install(tmp_path: Path) -> None:
    """`pip install .` (no -e) must carry conf/ and the data assets inside the package."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), str(root)],
                   check=True, capture_output=True, timeout=600)
    probe = ("from rlaif_recipes import config as c; import sys; "
             "assert c.CONF_DIR.is_relative_to(sys.argv[1]), c.CONF_DIR; "
             "print(','.join(c.config_names())); print(c.asset_path('xstest/xstest_prompts.csv'))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, check=True)
    names, asset = out.stdout.split()[-2:]
    assert "generate_pairs" in names.split(",") and asset.startswith(str(tmp_path / "site"))
