"""online_dpo: pair choice, exact resume after kill -9, checkpoint errors, learning, FSDP2 under torchrun."""

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pyarrow.parquet as pq
import pytest
import torch
from conftest import finish, load_policy, run_cli, two_launchers, what_failed
from safetensors.torch import load_file
from servers import FaultServer

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import CheckpointError, ConfigError, OutputError
from rlaif_recipes.judges import Judgment, Pair, RuleJudge, Verdict
from rlaif_recipes.judges.rules import ContainsWords
from rlaif_recipes.recipes.online_dpo import OnlineDPORecipe, OnlineDPOSettings, no_pair_cause, pick_pair
from rlaif_recipes.samplers import TorchtuneSampler

RECIPE = "rlaif_recipes/recipes/online_dpo.py"
REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "prompts_per_step=8",
    "n=2",
    "sampler.max_tokens=12",
    "judge.rule=rlaif_recipes.judges.rules.shorter",
    "optimizer.lr=1e-3",
]


def overrides(model: Path, out: Path, *extra: str) -> List[str]:
    return [f"checkpoint_dir={model}", f"output_dir={out}", *SMALL, *extra]


def online_dpo(cwd: Path, model: Path, out: Path, *extra: str, launcher=()) -> subprocess.CompletedProcess:
    result = run_cli(
        ["tune", "run", *launcher, RECIPE, "--config", "online_dpo", *overrides(model, out, *extra)], cwd=cwd
    )
    assert result.returncode == 0, what_failed(result)
    return result


def metrics(out: Path) -> List[Dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> Dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def cache_keys(out: Path) -> set:
    with sqlite3.connect(out / "judge_cache.sqlite") as db:
        return {k for (k,) in db.execute("SELECT key FROM judgments")}


# ---- choosing chosen / rejected ---------------------------------------------------------------


def j(verdict: Verdict, prob_a=None, source="ai") -> Judgment:
    return Judgment(verdict, prob_a=prob_a, source=source)


def test_pick_pair_two_responses_keeps_the_judges_verdict_and_probability() -> None:
    pick = pick_pair(2, {(0, 1): j(Verdict.B, prob_a=0.2, source="human")})
    assert (pick.status, pick.chosen, pick.rejected, pick.source) == ("labelled", 1, 0, "human")
    assert pick.prob_chosen == pytest.approx(0.8)


def test_a_step_of_ties_the_rubric_settled_is_narrow_sampling_not_a_failing_judge() -> None:
    """A policy whose replies to each prompt are all alike (two refusals of a harmful request, two
    refusals of a benign one) gives settled ties: the fix is wider sampling, not another judge."""
    settled = [Judgment(Verdict.TIE, settled="both_right"), Judgment(Verdict.TIE, settled="both_wrong"), Judgment(Verdict.TIE, settled="both_right")]
    assert no_pair_cause(settled).startswith("each prompt's replies are all alike by the rubric (2 comparisons both right, 1 both wrong)")
    assert "raise sampler.temperature or n" in no_pair_cause(settled)
    for judgments in ([*settled, Judgment(Verdict.TIE)], [Judgment(Verdict.ABSTAIN)], [Judgment(Verdict.A, prob_a=0.9)], []):
        assert no_pair_cause(judgments).startswith("the judge cannot tell the responses apart or is failing")


@pytest.mark.parametrize("verdict", [Verdict.TIE, Verdict.ABSTAIN])
def test_pick_pair_drops_ties_and_abstains(verdict: Verdict) -> None:
    pick = pick_pair(2, {(0, 1): j(verdict)})
    assert not pick.labelled and pick.status == verdict.value


def test_pick_pair_best_vs_worst_by_wins() -> None:
    # 2 beats everyone, 0 loses to everyone: the pair is (2, 0)
    judgments = {(0, 1): j(Verdict.B), (0, 2): j(Verdict.B), (1, 2): j(Verdict.B)}
    pick = pick_pair(3, judgments)
    assert (pick.chosen, pick.rejected, pick.prob_chosen) == (2, 0, 1.0)
    # all ties: nothing to learn, nothing guessed
    assert pick_pair(3, {k: j(Verdict.TIE) for k in judgments}).status == "tie"
    # 3 wins twice, 0 loses twice, but their own comparison abstained: dropped, not guessed
    four = {
        (0, 1): j(Verdict.B),
        (0, 2): j(Verdict.B),
        (0, 3): j(Verdict.ABSTAIN),
        (1, 2): j(Verdict.TIE),
        (1, 3): j(Verdict.B),
        (2, 3): j(Verdict.B),
    }
    assert pick_pair(4, four).status == "abstain"


# ---- a finished run, shared by the resume and the checkpoint-error tests ----------------------


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_model_dir) -> Callable[..., Path]:
    """Uninterrupted 4-step runs, one per (async_steps, compile), made when first asked for."""
    runs: Dict[tuple, Path] = {}

    def finished(async_steps: int, compile: bool = False) -> Path:
        if (async_steps, compile) not in runs:
            out = tmp_path_factory.mktemp("online") / f"full-async{async_steps}-compile{compile}"
            online_dpo(out.parent, tiny_model_dir, out, "max_steps=4", "save_every_n_steps=2", f"async_steps={async_steps}",
                       f"compile={compile}")
            runs[async_steps, compile] = out
        return runs[async_steps, compile]

    return finished


@pytest.fixture(scope="module")
def finished_run(finished_runs) -> Path:
    return finished_runs(0)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path, finished_runs) -> None:
    """With async_steps=1 and compile=true together (each is a full run three times over, so the
    two options share one; the plain loop's kill -9 runs on SmolLM2 in test_smollm2): the
    checkpoint holds the step sampled ahead, whose judging (maybe in flight at the kill) comes from
    the cache or is asked again, never paid twice; compiled layers push their weights, checkpoint
    and resume bitwise exactly."""
    async_steps, compile = 1, True
    finished_run = finished_runs(async_steps, compile)
    out = tmp_path / "killed"
    args = [
        "tune",
        "run",
        RECIPE,
        "--config",
        "online_dpo",
        *overrides(tiny_model_dir, out, "max_steps=4", "save_every_n_steps=2", f"async_steps={async_steps}", f"compile={compile}"),
    ]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / args[0]), *args[1:]],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    # kill -9 once step 3 is logged: checkpoint 2 exists, step 3's judgments are in the cache
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 3"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert (out / "checkpoints" / "step_0000002").is_dir() and not (
        out / "checkpoints" / "step_0000004"
    ).exists()
    keys_at_kill = cache_keys(out)

    online_dpo(
        tmp_path, tiny_model_dir, out, "max_steps=4", "save_every_n_steps=2", f"async_steps={async_steps}",
        f"compile={compile}", "resume_from_checkpoint=true",
    )

    full, resumed = weights(finished_run, 4), weights(out, 4)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert not torch.equal(
        full["lm_head.weight"], load_file(str(tiny_model_dir / "model.safetensors"))["lm_head.weight"]
    )
    # the same steps, with the same losses, logged once each (the killed run's tail was replaced)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(finished_run)]
    # step 3 was judged again from the cache, and no judgment made before the kill was requested again
    step3 = metrics(out)[2]
    assert step3["judge/requests"] == 0 and step3["judge/cache_hits"] == 8
    requested_after_resume = (
        metrics(out)[-1]["judge_totals"]["requests"] - metrics(out)[1]["judge_totals"]["requests"]
    )
    assert cache_keys(out) == cache_keys(finished_run)
    assert requested_after_resume == len(cache_keys(out) - keys_at_kill)
    # each step trained on samples from weights async_steps steps old (the first from the start)
    assert [m["staleness"] for m in metrics(out)] == [0] + [async_steps] * 3
    # compile time is logged apart from the train phase: the resumed process compiled afresh
    assert all("time/compile" in m for m in metrics(out))
    assert metrics(finished_run)[0]["time/compile"] > 0 and metrics(out)[2]["time/compile"] > 0


# ---- bad settings and bad checkpoints fail early, in one line ---------------------------------


def recipe_for(model: Path, out: Path, *extra: str):
    cfg = rlaif_config.load(
        "online_dpo", overrides(model, out, "max_steps=4", "save_every_n_steps=2", *extra), OnlineDPOSettings
    )
    return OnlineDPORecipe(cfg), cfg


def copy_run(src: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    return dest


@pytest.mark.slow
def test_the_headline_demo_row_runs_on_the_tiny_model_over_its_mixed_prompts(tmp_path: Path, tiny_model_dir: Path) -> None:
    """conf/demo/unnecessary_refusal.yaml as `make demo` runs it (router over the reward model, vLLM,
    LoRA), on the tiny fixture: XSTest's prompts and AdvBench's instructions, one prompt set."""
    out = tmp_path / "headline"
    args = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={out}", "max_steps=2", "prompts_per_step=16", "n=2",
            "sampler.max_tokens=8", "sampler.max_model_len=512", "dtype=fp32", "sampler.dtype=float32", "save_every_n_steps=2"]  # fmt: skip
    result = run_cli(["tune", "run", RECIPE, "--config", "demo/unnecessary_refusal", *args], cwd=REPO)
    assert result.returncode == 0, what_failed(result)
    drawn = pq.read_table(out / "steps").column("prompt_id").to_pylist()
    assert len(drawn) == 2 * 16 and {p.split("/")[0] for p in drawn} == {"xstest", "advbench"}
    assert (out / "checkpoints" / "step_0000002" / "checkpoint.json").is_file()


@pytest.mark.slow
def test_checkpoint_errors_are_clear(tmp_path: Path, tiny_model_dir: Path, finished_run: Path) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(OutputError, match="already holds this online_dpo run's output.*resume_from_checkpoint=true"):
        recipe_for(tiny_model_dir, run)
    with pytest.raises(OutputError, match="holds an earlier online_dpo run with n=2, this run has n=3"):
        recipe_for(tiny_model_dir, run, "resume_from_checkpoint=true", "n=3")
    recipe, cfg = recipe_for(tiny_model_dir, run, "resume_from_checkpoint=true")
    with pytest.raises(ConfigError, match="at step 4 and max_steps=4: nothing left to do"):
        recipe.setup(cfg)
    weights_file = run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights_file.write_bytes(b"\0" * weights_file.stat().st_size)  # same size: only loading can tell
    recipe, cfg = recipe_for(tiny_model_dir, run, "resume_from_checkpoint=true", "max_steps=6")
    with pytest.raises(CheckpointError, match="step_0000004 is corrupt.*delete it"):
        recipe.setup(cfg)
    recipe, cfg = recipe_for(tiny_model_dir, tmp_path / "empty", "resume_from_checkpoint=true")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        recipe.setup(cfg)


def test_bad_settings_fail_before_any_model_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match="save_every_n_steps=3: save_every_n_steps must be a positive multiple of sync_every=2"
    ):
        recipe_for(tiny_model_dir, tmp_path, "sync_every=2", "save_every_n_steps=3")
    with pytest.raises(ConfigError, match="n=1: a preference pair needs at least 2"):
        recipe_for(tiny_model_dir, tmp_path, "n=1")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sampler.sleep_between_steps=true needs CUDA"):
            recipe_for(tiny_model_dir, tmp_path, "sampler.sleep_between_steps=true")


def test_activation_checkpointing_wraps_the_policys_layers_and_it_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    out = tmp_path / "ac"
    recipe, cfg = recipe_for(tiny_model_dir, out, "sampler=torchtune", "enable_activation_checkpointing=true", "max_steps=2")
    recipe.setup(cfg)
    try:
        assert sum(isinstance(m, CheckpointWrapper) for m in recipe._model.modules()) == 2  # the tiny model's 2 layers
        assert not any(isinstance(m, CheckpointWrapper) for m in recipe._ref_model.modules())  # no backward there
        recipe.train()
    finally:
        recipe.cleanup()
    logged = metrics(out)
    assert sum(m["pairs/trained"] for m in logged) > 0
    assert all(m["tokens/trained"] >= 2 * m["pairs/trained"] for m in logged) and logged[0]["loss"] == pytest.approx(math.log(2))


# ---- it learns what the judge prefers ----------------------------------------------------------

WORDS = ["the", "you", "and", "to", "of", "is", "in", "it", "that", "for"]


def eval_samples(model_dir: Path, prompts: List[str], seed: int) -> List[List[str]]:
    sampler = TorchtuneSampler(str(model_dir), max_tokens=12, seed=seed)
    sampler.bind_policy(load_policy(model_dir))
    return [
        [c.text for c in s.completions]
        for s in sampler.sample([[{"role": "user", "content": p}] for p in prompts], n=4)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("async_steps", [0, 1])
def test_policy_learns_what_the_rule_judge_prefers(tmp_path: Path, tiny_model_dir: Path, async_steps: int) -> None:
    """ContainsWords prefers responses with common English words, which the random tiny policy
    rarely produces; after a few online steps both their rate and the judge's win-rate of the
    trained policy against the initial one rise clearly (on held-out prompts)."""
    rule = f"judge.rule={{_component_: rlaif_recipes.judges.rules.ContainsWords, words: [{','.join(WORDS)}]}}"
    out = tmp_path / "learn"
    online_dpo(
        tmp_path,
        tiny_model_dir,
        out,
        "max_steps=15",
        "prompts_per_step=16",
        "n=4",
        rule,
        "optimizer.lr=3e-3",
        "lr_scheduler=null",
        "save_every_n_steps=15",
        f"async_steps={async_steps}",
    )
    trained = out / "checkpoints" / "step_0000015"

    from rlaif_recipes.data import prompt_dataset

    prompts = list(
        prompt_dataset(
            rlaif_config.asset_path("xstest/xstest_prompts.csv"), split="held_out", max_prompts=40
        )["prompt"]
    )
    initial, initial_again, final = (
        eval_samples(d, prompts, s) for d, s in ((tiny_model_dir, 1), (tiny_model_dir, 2), (trained, 1))
    )
    has_words = ContainsWords(WORDS)

    def rate(samples):
        return sum(has_words("", r) > 0 for rs in samples for r in rs) / sum(len(rs) for rs in samples)

    judge = RuleJudge(rule=has_words, order="fixed")

    def win_rate(a, b) -> float:  # mean P(a preferred); ties count one half
        judged = judge.judge([Pair(p, x, y) for p, xs, ys in zip(prompts, a, b) for x, y in zip(xs, ys)])
        return sum(jd.prob_a for jd in judged) / len(judged)

    assert rate(final) >= rate(initial) + 0.15, (rate(initial), rate(final))
    baseline = win_rate(initial_again, initial)  # the initial policy against itself: about 1/2
    assert win_rate(final, initial) >= baseline + 0.1, (baseline, win_rate(final, initial))
    logged = metrics(out)
    assert all(m["judge/win_rate_chosen"] == 1.0 for m in logged if m["pairs/trained"])
    assert logged[-1]["kl/reference"] > logged[0]["kl/reference"]


# ---- a slow, faulty API judge with the loop running ahead ----------------------------------------


@pytest.mark.slow
def test_async_loop_never_turns_judge_faults_or_latency_into_labels(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """The loopback server answers A (response 0) unless it fails: 5xx, dropped connections and
    garbage, with no retries, become abstains, never labels, and the run goes on judging ahead.
    With async_steps=2 two steps' judging runs at once, and each step still counts its own requests."""
    monkeypatch.setenv("RLAIF_TEST_KEY", "sk-test-not-a-real-key")
    out = tmp_path / "faulty"
    with FaultServer(rates={"server_error": 0.2, "drop": 0.1, "garbage": 0.2}, latency_s=0.05, seed=3) as server:
        result = run_cli(["tune", "run", RECIPE, "--config", "online_dpo", f"checkpoint_dir={tiny_model_dir}", f"output_dir={out}",
                          "max_steps=4", "prompts_per_step=8", "sampler.max_tokens=12", "async_steps=2", "judge=openai",
                          f"judge.base_url={server.url}/v1", "judge.api_key_env=RLAIF_TEST_KEY", "judge.structured=none",
                          "judge.logprobs=false", "judge.order=fixed", "judge.max_retries=0", "max_steps_without_pairs=null"],
                         cwd=tmp_path)  # fmt: skip
        faults = sum(entry["fault"] is not None for entry in server.log)
    assert result.returncode == 0, what_failed(result)
    records = [r for f in sorted((out / "steps").glob("step-*.parquet")) for r in pq.read_table(f).to_pylist()]
    labelled = [r for r in records if r["label"] == "labelled"]
    abstained = [r for r in records if r["label"] == "abstain"]
    assert faults > 0 and len(abstained) > 0 and len(labelled) > 0
    assert all(r["chosen"] == 0 for r in labelled)  # only the server's own answer ever labels a pair
    assert len(labelled) + len(abstained) == len(records) == 4 * 8
    logged = metrics(out)
    assert sum(m["pairs/trained"] for m in logged) == len(labelled)
    assert [m["staleness"] for m in logged] == [0, 1, 2, 2]
    assert [m["judge/requests"] for m in logged] == [8, 8, 8, 8] and faults <= len(server.log) == 32


# ---- FSDP2 across two ranks, one vLLM engine per rank ------------------------------------------


TWO_RANKS = ["prompts_per_step=4", "async_steps=1"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """2 steps on one launcher with 2 processes (FSDP2, a vLLM engine per rank), then resumed to 3."""
    out = tmp_path_factory.mktemp("online") / "fsdp"
    torchrun = ["--nproc_per_node", "2"]
    online_dpo(out.parent, tiny_model_dir, out, "max_steps=2", *TWO_RANKS, launcher=torchrun)
    online_dpo(out.parent, tiny_model_dir, out, "max_steps=3", *TWO_RANKS, "resume_from_checkpoint=true", launcher=torchrun)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_sample_judge_train_and_resume(tiny_model_dir: Path, fsdp_run: Path) -> None:
    out = fsdp_run
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3] and all(m["prompts"] == 4 for m in logged)
    assert [m["staleness"] for m in logged] == [0, 1, 0]  # step 2 sampled ahead; the resumed sampler holds step 2's weights
    assert (
        all(m["pairs/trained"] + m["pairs/dropped_tie"] == 4 for m in logged)
        and logged[0]["pairs/trained"] > 0
    )
    for step in (1, 2, 3):
        rows = pq.read_table(out / "steps" / f"step-{step:05d}.parquet").to_pylist()
        assert sorted(r["rank"] for r in rows) == [0, 0, 1, 1] and len({r["prompt_id"] for r in rows}) == 4
    initial = load_file(str(tiny_model_dir / "model.safetensors"))["lm_head.weight"]
    assert not torch.equal(weights(out, 2)["lm_head.weight"], initial)
    assert not torch.equal(weights(out, 3)["lm_head.weight"], weights(out, 2)["lm_head.weight"])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_launchers_on_loopback_equal_one_launcher(tmp_path: Path, tiny_model_dir: Path, fsdp_run: Path) -> None:
    """Multi-node as a cluster runs it: one launcher per node (two on loopback, one process and one
    vLLM engine each), async_steps=1, a checkpoint and a resume: the same samples, losses and
    weights as one launcher with two processes; node 1 (global rank 1) writes nothing of its own
    beyond its judge cache (its working directory stays empty)."""
    out, nodes = tmp_path / "nodes", [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    recipe = ["tune", "run", RECIPE, "--config", "online_dpo"]  # run as a module (PYTHONPATH): no file under the nodes' directories
    finish(two_launchers([*recipe, *overrides(tiny_model_dir, out, "max_steps=2", *TWO_RANKS)], nodes))
    finish(two_launchers([*recipe, *overrides(tiny_model_dir, out, "max_steps=3", *TWO_RANKS, "resume_from_checkpoint=true")], nodes))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(fsdp_run)]
    for step in (2, 3):
        a, b = weights(out, step), weights(fsdp_run, step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in (1, 2, 3):
        name = f"steps/step-{step:05d}.parquet"
        assert pq.read_table(out / name).to_pylist() == pq.read_table(fsdp_run / name).to_pylist()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fsdp_run.iterdir())
    assert not any(nodes[1].iterdir())


@pytest.mark.slow
@pytest.mark.distributed
def test_llm_judge_under_torchrun_runs_an_engine_per_rank_and_a_resume_never_pays_twice(tmp_path: Path, tiny_model_dir: Path) -> None:
    """judge=llm beside the vLLM sampler on 2 ranks: both engines of each rank start on vLLM's
    external_launcher backend, and each rank caches its judgments in a file of its own, so a run
    resumed from step 1 judges step 2 again from those files alone."""
    out = tmp_path / "llm"
    args = ["tune", "run", "--nproc_per_node", "2", RECIPE, "--config", "online_dpo", f"checkpoint_dir={tiny_model_dir}",
            f"output_dir={out}", "max_steps=2", "prompts_per_step=4", "save_every_n_steps=1", "sampler.max_tokens=8",
            "judge=llm", "judge.order=fixed", "judge.kv_cache_memory_bytes=100000000", "sampler.kv_cache_memory_bytes=100000000"]  # fmt: skip
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, what_failed(first)
    assert (first.stdout + first.stderr).count("Using external launcher") == 4  # sampler and judge, on each rank
    shutil.rmtree(out / "checkpoints" / "step_0000002")
    resumed = run_cli([*args, "resume_from_checkpoint=true"], cwd=tmp_path)
    assert resumed.returncode == 0, what_failed(resumed)
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2] and logged[0]["judge/requests"] == 4
    assert logged[1]["judge/requests"] == 0 and logged[1]["judge/cache_hits"] == 4
    assert sorted(p.name for p in out.glob("judge_cache*")) == ["judge_cache.rank-0.sqlite", "judge_cache.rank-1.sqlite"]


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_engines_under_torchrun_are_refused_before_any_model_loads(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = run_cli(["tune", "run", "--nproc_per_node", "2", RECIPE, "--config", "online_dpo",
                      *overrides(tiny_model_dir, tmp_path / "tp", "sampler.tensor_parallel_size=2")], cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert "sampler.tensor_parallel_size=2 under torchrun (2 ranks): each rank runs its own engine" in result.stderr
    assert not (tmp_path / "tp" / "checkpoints").exists()


@pytest.mark.slow
def test_rlaif_plot_draws_a_run_and_names_a_dir_that_is_none(tmp_path: Path, finished_run: Path) -> None:
    from rlaif_recipes.plot_run import read_run

    result = run_cli(["rlaif", "plot", str(finished_run), "--out", str(tmp_path / "run.png")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    png = (tmp_path / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    series = read_run(str(finished_run))
    assert [s for s, _ in series["loss"]] == [1, 2, 3, 4] and {"time/judge", "labels/ai", "kl/reference"} <= set(series)
    empty = run_cli(["rlaif", "plot", str(tmp_path)], cwd=tmp_path)
    assert empty.returncode == 2 and "has no metrics.jsonl" in empty.stderr and "Traceback" not in empty.stderr


@pytest.mark.slow
def test_torchtunes_tensorboard_logger_is_a_metric_logger_option(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    result = run_cli(["tune", "run", RECIPE, "--config", "online_dpo", *overrides(tiny_model_dir, tmp_path / "run", "max_steps=2"),
                      "sampler=torchtune", "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger",
                      f"metric_logger.log_dir={logs}"], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, what_failed(result)
    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"loss", "judge/win_rate_chosen", "time/judge"} <= set(events.Tags()["tensors"])  # scalars, as TF2 summaries
    assert [e.step for e in events.Tensors("pairs/trained")] == [1, 2]


@pytest.mark.slow
def test_torchtunes_wandb_logger_works_offline(tmp_path: Path, tiny_model_dir: Path) -> None:
    """W&B in offline mode: no account, no network; the run's history is read back from its own
    run file (protobuf records in LevelDB's log format, as `wandb sync` reads it)."""
    from wandb.proto import wandb_internal_pb2

    logs = tmp_path / "wb"
    result = run_cli(["tune", "run", RECIPE, "--config", "online_dpo", *overrides(tiny_model_dir, tmp_path / "run", "max_steps=2"),
                      "sampler=torchtune", "metric_logger._component_=torchtune.training.metric_logging.WandBLogger",
                      f"metric_logger.log_dir={logs}", "+metric_logger.project=rlaif-test", "+metric_logger.mode=offline"],
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, what_failed(result)
    history = []
    for data in wandb_records(next(logs.rglob("offline-run-*/run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    assert [h["global_step"] for h in history] == [1, 2]  # torchtune logs the step as global_step
    assert all({"loss", "judge/win_rate_chosen", "time/judge", "pairs/trained"} <= set(h) for h in history)
    assert [h["pairs/trained"] for h in history] == [m["pairs/trained"] for m in metrics(tmp_path / "run")]


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file: a 7-byte header, then LevelDB log records (crc, length, type)
    in 32 KiB blocks; a record split over blocks comes in FIRST / MIDDLE / LAST pieces."""
    data, block, pos, pieces = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            yield pieces
            pieces = b""
