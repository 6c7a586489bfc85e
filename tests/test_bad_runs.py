"""A run is what it says it is: an output directory holds one run's output, a run that trains on
nothing fails, and every expected error is one line (issue 13). Each recipe runs in this process
exactly as `tune run` calls it; where a directory is refused, its bytes are checked unchanged."""

import base64
import functools
import importlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Union

import pytest
import torch
import torch.distributed as dist
from conftest import run_cli
from servers import FaultServer, free_port
from test_judge_pairs import write_generated

from rlaif_recipes.errors import OutputError
from rlaif_recipes.judges.reward_model import SentenceEncoder
from rlaif_recipes.run_dir import claim
from rlaif_recipes.samplers import VLLMSampler

ONLINE = ["sampler=torchtune", "prompts_per_step=4", "n=2", "sampler.max_tokens=8"]
SHORTER = "judge.rule=rlaif_recipes.judges.rules.shorter"
PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"question {i}?", "responses": [f"a{i}", f"a longer answer {i}"]} for i in range(4)]


def run(monkeypatch, recipe: str, *overrides: str) -> Union[int, str]:
    """The recipe's main in this process: its exit status, or the one line it exits with."""
    monkeypatch.setattr(sys, "argv", [recipe, "--config", recipe, *overrides])
    return run_main(monkeypatch, recipe)


def run_main(monkeypatch, recipe: str) -> Union[int, str]:
    """The recipe's main with the sys.argv already set: its exit status, or the one line it exits with."""
    monkeypatch.delenv("RLAIF_DEBUG", raising=False)
    try:
        return importlib.import_module(f"rlaif_recipes.recipes.{recipe}").recipe_main() or 0
    except SystemExit as e:
        return e.code


def snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rule_needing_env(prompt: str, response: str) -> float:
    """A judge that fails on every pair until RLAIF_TEST_JUDGE_FIXED is set: a judge fixed between runs."""
    if not os.environ.get("RLAIF_TEST_JUDGE_FIXED"):
        raise ConnectionError("judge endpoint unreachable")
    return -len(response)


@pytest.fixture()
def no_engine(monkeypatch):
    """Any vLLM engine start fails the test: the checks under test must come before it."""

    @functools.wraps(VLLMSampler.__init__)  # the same signature, for the config checks
    def refuse(*args, **kwargs):
        raise AssertionError("a vLLM engine was started before the bad input was reported")

    monkeypatch.setattr(VLLMSampler, "__init__", refuse)


@pytest.fixture()
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i}?", "chosen": f"answer number {i}", "rejected": "no"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_args(model: Path, out: Path, data: Path, *extra: str) -> list:
    return [f"checkpoint_dir={model}", f"output_dir={out}", f"dataset.source={data}", "dataset.split=all",
            "eval_dataset=null", "batch_size=4", "max_steps=1", "lr_scheduler=null", *extra]  # fmt: skip


# ---- 1-3: judge_pairs output directories -------------------------------------------------------


def test_judge_pairs_into_its_own_input_dir_is_refused(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    generated = tmp_path / "gen"
    assert run(monkeypatch, "generate_pairs", f"checkpoint_dir={tiny_model_dir}", f"output_dir={generated}",
               "sampler=torchtune", "data.max_prompts=4", "sampler.max_tokens=6") == 0  # fmt: skip
    before = snapshot(generated)
    message = run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={generated}")
    assert message == f"output error: {generated} holds output of the generate_pairs recipe; give this judge_pairs run its own output_dir"
    assert snapshot(generated) == before


def test_a_failed_judge_leaves_no_done_shard_and_a_rerun_judges_again(monkeypatch, tmp_path):
    generated = write_generated(tmp_path / "gen", [PROMPTS[:2], PROMPTS[2:]])
    args = [f"input_dir={generated}", f"output_dir={tmp_path / 'prefs'}", f"judge.rule={__name__}.rule_needing_env"]
    message = run(monkeypatch, "judge_pairs", *args)
    assert message.startswith("judge error: the judge abstained on all 4 comparisons of this run")
    assert "rule raised ConnectionError: judge endpoint unreachable" in message and "re-run the same command" in message
    summary = json.loads((tmp_path / "prefs" / "summary.json").read_text())
    assert (summary["shards_done"], summary["shards_with_abstains"], summary["preferences"]) == (0, 2, 0)

    monkeypatch.setenv("RLAIF_TEST_JUDGE_FIXED", "1")  # the judge works now: the same command finishes the job
    assert run(monkeypatch, "judge_pairs", *args) == 0
    summary = json.loads((tmp_path / "prefs" / "summary.json").read_text())
    assert (summary["shards_done"], summary["shards_with_abstains"], summary["preferences"], summary["abstains"]) == (2, 0, 4, 0)
    assert summary["judge_metrics"]["queries"] == 4  # every comparison was asked again


def test_judge_pairs_with_another_judge_or_input_is_refused(monkeypatch, tmp_path):
    generated = write_generated(tmp_path / "gen", [PROMPTS])
    other = write_generated(tmp_path / "other", [PROMPTS[:1]])
    out = tmp_path / "prefs"
    assert run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={out}", SHORTER) == 0
    before = snapshot(out)
    message = run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={out}")
    assert message.startswith(f"output error: {out} holds an earlier judge_pairs run with judge.rule=rlaif_recipes.judges.rules.shorter, "
                              "this run has judge.rule=rlaif_recipes.judges.rules.answers_instead_of_refusing; use a new output_dir")  # fmt: skip
    message = run(monkeypatch, "judge_pairs", f"input_dir={other}", f"output_dir={out}", SHORTER)
    assert message == (f"output error: {out} holds an earlier judge_pairs run with input_dir={generated}, this run has input_dir={other}; "
                       f"use a new output_dir (or input_dir={generated} to continue that run)")  # the key the user typed
    assert snapshot(out) == before
    # settings that do not change a verdict (batching, budgets) may change: the run continues
    assert run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={out}", SHORTER, "batch_size=1") == 0


# ---- 4-6: generate_pairs, dpo, online_dpo ------------------------------------------------------


def test_generate_pairs_with_another_n_is_refused(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    out = tmp_path / "gen"
    args = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={out}", "sampler=torchtune", "data.max_prompts=4", "sampler.max_tokens=6"]
    assert run(monkeypatch, "generate_pairs", *args, "n=2") == 0
    before = snapshot(out)
    assert run(monkeypatch, "generate_pairs", *args, "n=3") == (
        f"output error: {out} holds an earlier generate_pairs run with n=2, this run has n=3; use a new output_dir (or n=2 to continue that run)"
    )
    assert snapshot(out) == before


def test_dpo_twice_into_one_dir_is_refused(monkeypatch, tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "dpo"
    assert run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, out, pairs_file)) == 0
    before = snapshot(out)
    message = run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, out, pairs_file))
    assert message.startswith(f"output error: {out} already holds this dpo run's output (checkpoints); continue it with resume_from_checkpoint=true")
    assert snapshot(out) == before


def test_online_dpo_into_a_stopped_runs_dir_is_refused(monkeypatch, tmp_path, tiny_model_dir):
    out = tmp_path / "online"
    args = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={out}", *ONLINE, "max_steps=6"]
    assert run(monkeypatch, "online_dpo", *args).startswith("training error: 3 steps in a row")  # step files, no checkpoint
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step-00001.parquet", "step-00002.parquet", "step-00003.parquet"]
    assert not any((out / "checkpoints").iterdir())
    before = snapshot(out)
    message = run(monkeypatch, "online_dpo", *args, SHORTER)
    assert message.startswith(f"output error: {out} holds an earlier online_dpo run with judge.rule=")
    message = run(monkeypatch, "online_dpo", *args)
    assert message == (f"output error: {out} already holds this online_dpo run's output (steps, metrics.jsonl); continue it with "
                       "resume_from_checkpoint=true, or delete it / choose a new output_dir to start over")  # fmt: skip
    assert snapshot(out) == before


def _claim_on_two_ranks(rank: int, rendezvous: str, dirs: List[str], answers) -> None:
    """A rank of a two-process run that claims each of `dirs`, then at once makes its
    checkpointer folder there (what torchtune's checkpointer does when it is built). Answers
    (rank, dir, "claimed" or the refusal, when claim returned)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        for out in dirs:
            if rank == 0:
                time.sleep(1.0)  # rank 1 gets there first, as it may when rank 0 is slower to load its data
            try:
                claim(out, "dpo", {"seed": 0}, outputs=("checkpoints",), fresh=True)
                (Path(out) / "checkpoints").mkdir(exist_ok=True)
                answers.put((rank, out, "claimed", time.time()))
            except OutputError as e:
                answers.put((rank, out, str(e), time.time()))
    finally:
        dist.destroy_process_group()


def test_under_torchrun_rank_zero_claims_before_any_rank_writes_and_all_ranks_share_a_refusal(tmp_path: Path) -> None:
    fresh, foreign = tmp_path / "fresh", tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    ctx = multiprocessing.get_context("fork")
    answers = ctx.Queue()
    procs = [ctx.Process(target=_claim_on_two_ranks, args=(r, str(tmp_path / "rendezvous"), [str(fresh), str(foreign)], answers)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(answers.get(timeout=120) for _ in range(4))
    for p in procs:
        p.join(60)
    refusal = f"{foreign} is not empty (notes.txt) and holds no run.json"
    assert [(r, Path(out).name, answer == "claimed" if out == str(fresh) else refusal in answer) for r, out, answer, _ in got] == [
        (0, "foreign", True), (0, "fresh", True), (1, "foreign", True), (1, "fresh", True)]
    record = json.loads((fresh / "run.json").read_text())
    rank_one_went_on = next(when for r, out, _, when in got if r == 1 and out == str(fresh))
    assert record["recipe"] == "dpo" and rank_one_went_on >= record["created"]  # rank 1 waited for rank 0's record
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("recipe,needs", [("judge_pairs", ["input_dir=."]), ("evaluate", []), ("audit_judge", []), ("train_reward_model", [])])
def test_one_process_recipes_refuse_torchrun(monkeypatch, tmp_path, recipe, needs):
    """Under torchrun (its environment; these recipes start no process group) every rank would do,
    and pay for, the whole job."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    message = run(monkeypatch, recipe, f"output_dir={tmp_path / 'out'}", *needs)
    assert message.startswith(f"config error: {recipe} runs as one process (not under torchrun): ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, message", [
    ("harm_reader.lr=-1e-5", "harm_reader.lr=-1e-05: must be > 0"),
    ("answer_reader.batch_size=0", "answer_reader.batch_size=0: must be a whole number >= 1"),
    ("harm_reader.source_weight.xstest_prompts=-2", "harm_reader.source_weight.xstest_prompts=-2: a source's weight must be > 0"),
    ("encoder.batch_size=-1", "encoder.batch_size=-1: must be a whole number >= 1"),
    ("harm_reader.layers=7", "harm_reader.layers=7: must be a whole number in 1..6"),
    ("answer_reader.epochs=abc", "answer_reader.epochs=abc: must be a whole number >= 1"),  # was a TypeError's traceback
])  # fmt: skip
def test_reward_model_reader_settings_fail_before_any_request_is_read(monkeypatch, tmp_path, setting, message):
    """A negative lr was AdamW's traceback after the requests were read, a weight below 0 trained a source backwards."""
    assert run(monkeypatch, "train_reward_model", f"output_dir={tmp_path / 'out'}", setting).startswith(f"config error: {message}")
    assert not (tmp_path / "out").exists()


def test_online_dpo_that_trains_on_nothing_fails(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    base = [f"checkpoint_dir={tiny_model_dir}", *ONLINE]
    # greedy sampling: both replies identical, found before any engine or model
    assert run(monkeypatch, "online_dpo", *base, f"output_dir={tmp_path / 'greedy'}", "sampler=vllm", "sampler.temperature=0") == (
        "config error: sampler.temperature=0 is greedy decoding: all n=2 responses to a prompt would be identical and "
        "every pair a tie; set sampler.temperature > 0 (e.g. 0.7)"
    )
    # the untrained tiny model under the default rule judge: every pair ties
    message = run(monkeypatch, "online_dpo", *base, f"output_dir={tmp_path / 'ties'}", "max_steps=10", "max_steps_without_pairs=2")
    assert message.startswith("training error: 2 steps in a row (up to step 2) trained no pair: 4 prompts tied and 0 abstained")
    summary = json.loads((tmp_path / "ties" / "summary.json").read_text())
    assert (summary["steps"], summary["pairs"], summary["steps_without_pairs"], summary["ties"]) == (2, 0, 2, 8)
    # a judge that abstains on everything, told to go on: the run still fails at its end, with no checkpoint
    out = tmp_path / "abstains"
    message = run(monkeypatch, "online_dpo", *base, f"output_dir={out}", "max_steps=2", "max_steps_without_pairs=null",
                  f"judge.rule={__name__}.rule_needing_env")  # fmt: skip
    assert message == ("training error: this run trained no pair in its 2 steps (0 prompts tied, 8 abstained); "
                       "no checkpoint written: fix the judge or the sampling")  # fmt: skip
    assert not any((out / "checkpoints").iterdir())
    assert json.loads((out / "summary.json").read_text())["abstains"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused(monkeypatch, tmp_path, tiny_model_dir, pairs_file, no_engine):
    expected = f"config error: device=cuda, but this machine has no usable CUDA GPU (torch {torch.__version__}); use device=cpu"
    for recipe, args in [
        ("online_dpo", [f"checkpoint_dir={tiny_model_dir}", *ONLINE]),
        ("dpo", dpo_args(tiny_model_dir, tmp_path / "dpo", pairs_file)),
        ("generate_pairs", [f"checkpoint_dir={tiny_model_dir}"]),
        ("evaluate", [f"checkpoint_dir={tiny_model_dir}"]),
    ]:
        assert run(monkeypatch, recipe, *args, f"output_dir={tmp_path / recipe}", "device=cuda", "dtype=bf16") == expected
        assert not (tmp_path / recipe).exists()


# ---- 8: training settings and data --------------------------------------------------------------


def test_dpo_settings_and_data_that_train_nothing_are_refused(monkeypatch, tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "dpo"
    assert run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, out, pairs_file, "epochs=0")) == (
        "config error: epochs=0: must be >= 1 (a run that trains no step is not a run); fix it in the config or with epochs=..."
    )
    assert run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, out, pairs_file, "max_steps=0")).startswith("config error: max_steps=0")
    for cadence in ("log_every_n_steps=0", "eval_every_n_steps=-1", "save_every_n_steps=-2"):  # n % -1 == 0: every step
        assert run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, out, pairs_file, cadence)).startswith(f"config error: {cadence}: a cadence in steps must be >= 1")
    message = run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, out, pairs_file, "dataset.held_out_fraction=1.5"))
    assert message.startswith("config error: dataset.held_out_fraction=1.5")
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "yes"}) + "\n" for i in range(8)))
    message = run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, tmp_path / "dpo2", same))
    assert message.startswith(f"data error: {same}: 8 of 8 pairs have 'chosen' identical to 'rejected'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "", "rejected": "no"}) + "\n" for i in range(8)))
    assert run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, tmp_path / "dpo3", empty)).startswith(f"data error: {empty}: row 0")
    assert not (out / "checkpoints").exists()  # refused before the checkpointer made it


def test_settings_checked_before_anything_heavy(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    online = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", *ONLINE]
    assert run(monkeypatch, "online_dpo", *online, "sync_every=0") == "config error: sync_every=0: push weights every sync_every >= 1 steps"
    assert run(monkeypatch, "online_dpo", *online, "optimizer.lr=-1") == (
        "config error: optimizer.lr=-1: the learning rate must be a number > 0 (e.g. 5.0e-6); fix it in the config or with optimizer.lr=..."
    )
    assert run(monkeypatch, "online_dpo", *online, "optimizer.weight_decay=-1") == (
        "config error: optimizer: Invalid weight_decay value: -1; fix optimizer.* in the config"
    )
    assert run(monkeypatch, "online_dpo", *online, "optimizer.lr=1e-3", "optimizer.weight_decay=2000") == (  # AdamW took it and flipped every weight
        "config error: optimizer: one step with no gradient scales every weight by -1 (weight decay 2000 at lr 0.001), "
        "which zeroes or flips them; lower optimizer.weight_decay so lr x weight_decay < 1"
    )
    generate = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'g'}", "sampler=vllm"]
    message = run(monkeypatch, "generate_pairs", *generate, "n=20000")  # vLLM checks n only at the first request, after the engine
    assert message.startswith("config error: n=20000: n must be at most ") and message.endswith(", or lower n")
    assert run(monkeypatch, "online_dpo", *online, "loss=ipo", "loss.tau=0") == (  # the loss is built before the model
        "config error: loss.tau=0: IPO needs tau > 0 (its target margin is 1 / (2 tau))"
    )
    assert run(monkeypatch, "online_dpo", *online, "loss=rpo", "loss.alpha=-1") == "config error: loss.alpha=-1: the NLL weight must be >= 0"
    assert run(monkeypatch, "online_dpo", *online, "judge.rule=no.such.function") == (
        "config error: judge.rule=no.such.function: cannot import it; give a dotted path module.name that exists"
    )
    message = run(monkeypatch, "online_dpo", *online, "model=qwen2_5_0_5b_instruct")
    assert message.startswith(f"config error: model=qwen2_5_0_5b does not fit {tiny_model_dir}: ")
    generate = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'g'}"]
    assert run(monkeypatch, "generate_pairs", *generate, "prompts_per_shard=0") == (
        "config error: prompts_per_shard=0: a shard needs at least 1 prompt"
    )
    assert not (tmp_path / "g").exists()
    evaluate = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'e'}", "template_max_share=1.5"]
    assert run(monkeypatch, "evaluate", *evaluate) == (
        "config error: template_max_share=1.5: must be in (0, 1), the share of the answers one opening may start (e.g. 0.4), "
        "or null to turn the template check off"
    )
    evaluate[-1] = "short_reply_words=0"
    assert run(monkeypatch, "evaluate", *evaluate).startswith("config error: short_reply_words=0: a reply under this many words counts as short")
    evaluate[-1] = "fluency.max_disfluent_rate=1.5"  # checked before the fluency model is fetched or loaded
    assert run(monkeypatch, "evaluate", *evaluate) == "config error: fluency.max_disfluent_rate=1.5: a share of the replies, in [0, 1] (e.g. 0.1)"
    assert not (tmp_path / "e").exists()


def test_unwritable_outputs_fail_before_the_engine(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    generate = [f"checkpoint_dir={tiny_model_dir}", "data.max_prompts=2"]
    assert run(monkeypatch, "generate_pairs", *generate, f"output_dir={a_file}") == (
        f"output error: output_dir={a_file} is a file, not a directory; choose another output_dir"
    )
    assert run(monkeypatch, "generate_pairs", *generate, f"output_dir={a_file / 'run'}") == (
        f"output error: output_dir={a_file / 'run'}: {a_file} is a file, so the directory cannot be created; choose another output_dir"
    )
    review = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", *ONLINE, "judge=router",
              f"judge.review_path={a_file / 'queue.jsonl'}"]  # fmt: skip
    assert run(monkeypatch, "online_dpo", *review).startswith(f"config error: judge.review_path={a_file / 'queue.jsonl'}: cannot write there (")
    assert a_file.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_a_read_only_output_dir_fails_before_the_engine(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run(monkeypatch, "generate_pairs", f"checkpoint_dir={tiny_model_dir}", f"output_dir={locked / 'run'}") == (
            f"output error: output_dir={locked / 'run'}: {locked} is not writable (permission denied); choose another output_dir"
        )
    finally:
        locked.chmod(0o700)


def test_an_empty_prompt_file_is_one_data_error(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    message = run(monkeypatch, "generate_pairs", f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'g'}", f"data.source={empty}")
    assert message.startswith(f"data error: {empty} is empty")
    assert not (tmp_path / "g").exists()


def test_a_truncated_checkpoint_is_named_before_the_engine(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = run(monkeypatch, "generate_pairs", f"checkpoint_dir={broken}", f"output_dir={tmp_path / 'gen'}")
    assert message.startswith(f"checkpoint error: {weights} is truncated (")
    assert message.endswith("copy the checkpoint again")


def judge_filling_the_disk(prompt: str, response: str) -> float:
    """A rule judge that prefers replies by a checksum, and fills the disk at RLAIF_TEST_FILL (to 1 MiB
    free) once the run's first checkpoint is there: another job taking the space mid-run."""
    disk = Path(os.environ["RLAIF_TEST_FILL"])
    filler = disk / "filler"
    if not filler.exists() and any((disk / "run" / "checkpoints").glob("step_*")):
        filler.write_bytes(bytes(shutil.disk_usage(disk).free - 2**20))
    return float(zlib.crc32(response.encode()))


def test_a_disk_too_small_for_the_checkpoints_is_one_line_before_training(monkeypatch, small_disk, tiny_model_dir, pairs_file):
    disk = small_disk(4)
    online = run(monkeypatch, "online_dpo", f"checkpoint_dir={tiny_model_dir}", f"output_dir={disk / 'online'}", *ONLINE)
    dpo = run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, disk / "dpo", pairs_file))
    for recipe, message in (("online", online), ("dpo", dpo)):
        assert re.fullmatch(
            r"checkpoint error: this run's checkpoints need about (\d+) MiB \((1|2) kept by keep_last_checkpoints=2 and one "
            r"being written, about (\d+) MiB each: weights and optimizer state\), and the disk under "
            rf"{re.escape(str(disk / recipe / 'checkpoints'))} has [0-4] MiB free; free disk space, lower keep_last_checkpoints, "
            r"or choose an output_dir on a larger disk",
            message,
        ), message
        assert not list((disk / recipe).rglob("step_*")) and not (disk / recipe / "metrics.jsonl").exists()


def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint_and_the_run_resumes(monkeypatch, small_disk, tiny_model_dir):
    disk = small_disk(48)
    monkeypatch.setenv("RLAIF_TEST_FILL", str(disk))
    out = disk / "run"
    args = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={out}", *ONLINE, "max_steps=3", "save_every_n_steps=1",
            "max_steps_without_pairs=null", f"judge.rule={__name__}.judge_filling_the_disk"]  # fmt: skip
    message = run(monkeypatch, "online_dpo", *args)
    assert re.fullmatch(
        rf"checkpoint error: checkpoint step 2 needs about \d+ MiB, and the disk under {re.escape(str(out / 'checkpoints'))} "
        r"has \d+ KiB free; free disk space, lower keep_last_checkpoints, or choose an output_dir on a larger disk",
        message,
    ), message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    (disk / "filler").unlink()
    (disk / "filler").write_bytes(b"")  # the judge fills the disk once only
    assert run(monkeypatch, "online_dpo", *args, "resume_from_checkpoint=true") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]


def test_a_full_disk_is_one_output_error_and_a_rerun_after_freeing_it_works(monkeypatch, small_disk, tiny_model_dir):
    disk = small_disk(1)
    (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - 4096))
    args = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={disk / 'gen'}", "sampler=torchtune", "data.max_prompts=8",
            "sampler.max_tokens=6"]  # fmt: skip
    assert run(monkeypatch, "generate_pairs", *args) == (
        f"output error: output_dir={disk / 'gen'}: No space left on device; free some disk space and run it again"
    )
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing half-written left behind
    (disk / "filler").unlink()
    assert run(monkeypatch, "generate_pairs", *args) == 0
    assert list((disk / "gen" / "data").glob("*.parquet"))


# ---- secrets and the command line ---------------------------------------------------------------


def test_a_key_pasted_into_api_key_env_is_refused_and_never_shown(monkeypatch, tmp_path):
    key = "sk-proj-THISISAPASTEDKEY1234567890"
    generated = write_generated(tmp_path / "gen", [PROMPTS])
    message = run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={tmp_path / 'prefs'}", "judge=openai",
                  f"judge.api_key_env={key}")  # fmt: skip
    assert message.startswith("config error: 'judge.api_key_env' must be the NAME of an environment variable")
    assert key not in message
    assert not (tmp_path / "prefs").exists()


def test_errors_reach_the_console_as_one_line_and_the_readme_form_works(tmp_path, tiny_model_dir):
    """Through the real command line: `rlaif run RECIPE --config FILE ...` (the form docs/recipes.md shows)."""
    copy = tmp_path / "my_run.yaml"
    assert run_cli(["rlaif", "cp", "online_dpo", str(copy)], cwd=tmp_path).returncode == 0
    result = run_cli(["rlaif", "run", "online_dpo", "--config", str(copy), f"checkpoint_dir={tiny_model_dir}", "sync_every=0"], cwd=tmp_path)
    assert result.returncode != 0
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["config error: sync_every=0: push weights every sync_every >= 1 steps"]
    assert "Traceback" not in result.stderr
    debug = run_cli(["rlaif", "run", "--debug", "online_dpo", "--config", str(copy), f"checkpoint_dir={tiny_model_dir}", "sync_every=0"], cwd=tmp_path)
    assert "Traceback" in debug.stderr and "ConfigError: sync_every=0" in debug.stderr


def test_dry_run_says_what_an_api_judge_will_cost_and_sends_nothing(monkeypatch, tmp_path, tiny_model_dir, caplog, no_engine):
    monkeypatch.setenv("RLAIF_TEST_KEY", "sk-test-not-a-real-key")
    generated = write_generated(tmp_path / "gen", [PROMPTS])
    with FaultServer() as server:
        api = ["judge=openai", f"judge.base_url={server.url}/v1", "judge.api_key_env=RLAIF_TEST_KEY", "judge.input_usd_per_mtok=1",
               "judge.output_usd_per_mtok=2", "dry_run=true"]  # fmt: skip
        with caplog.at_level("INFO"):
            assert run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={tmp_path / 'prefs'}", *api) == 0
            assert run(monkeypatch, "online_dpo", f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", *ONLINE,
                       "max_steps=5", *api) == 0  # fmt: skip
        assert server.log == []  # not one request, not even the probe
    assert "judge cost estimate for 1 shard(s): 4 comparisons -> 8 requests (0 cached)" in caplog.text
    assert "judge cost estimate for 5 steps of 4 prompts x 2 responses (responses at sampler.max_tokens=8): 20 comparisons -> 40 requests" in caplog.text
    assert "dry_run=true: nothing was judged" in caplog.text and not (tmp_path / "prefs" / "data").exists()
    assert not (tmp_path / "o" / "checkpoints").exists() and not (tmp_path / "o" / "steps").exists()


def test_an_unquoted_url_with_a_key_is_one_line_that_says_to_quote_it(monkeypatch, tmp_path, capfd):
    key = "sk-UNQUOTEDKEY0123456789"
    message = run(monkeypatch, "judge_pairs", "input_dir=.", f"output_dir={tmp_path / 'prefs'}", "judge=openai",
                  f"judge.base_url=http://h/v1?api_key={key}")  # fmt: skip
    assert message.startswith("config error: cannot parse the override of judge.base_url (mismatched input '='")
    assert "\"judge.base_url='VALUE'\"" in message and key not in message + "".join(capfd.readouterr())
    assert not (tmp_path / "prefs").exists()


def assert_nowhere(secrets: List[str], root: Path, *texts: str) -> None:
    """None of `secrets` in any file under `root` (configs, run.json, caches, metrics, reports) or in `texts`."""
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in secrets if s.encode() in data], f"a secret is in {path}"
    for text in texts:
        assert not [s for s in secrets if s in text], f"a secret is in:\n{text[-3000:]}"


def test_keys_in_endpoint_urls_and_headers_are_sent_but_never_shown_or_saved(monkeypatch, tmp_path, tiny_model_dir, capfd, caplog):
    """A key in base_url's query string, another as its userinfo, a third in default_headers: each
    reaches the server, and none is in any file a run writes (config.yaml, run.json, the judge
    cache, summary.json, metrics.jsonl with its per-replica keys, the audit reports), in the logs,
    on the console, or in the one-line error of an unreachable endpoint."""
    in_query, in_userinfo, in_header = "sk-QUERYKEY0123456789", "pw-USERINFO0123456789", "hdr-HEADERKEY0123456789"
    generated = write_generated(tmp_path / "gen", [PROMPTS])
    with FaultServer() as server, caplog.at_level("DEBUG"):
        host = server.url.removeprefix("http://")
        api = ["judge=openai", f"judge.base_url=['http://{host}/v1?api_key={in_query}&api-version=2','http://ana:{in_userinfo}@{host}/v1']",
               "judge.api_key_env=null", f"judge.default_headers={{api-key:{in_header}}}", "judge.order=fixed"]  # fmt: skip
        assert run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={tmp_path / 'prefs'}", *api) == 0
        assert run(monkeypatch, "online_dpo", f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'online'}", *ONLINE,
                   "max_steps=2", *api) == 0  # fmt: skip
        assert run(monkeypatch, "audit_judge", f"output_dir={tmp_path / 'audit'}", "max_pairs=4", *api) == 0
        sent = list(server.log)
        port = free_port()  # nothing listens there
        unreachable = f"judge.base_url='http://ana:{in_userinfo}@127.0.0.1:{port}/v1?key={in_query}'"
        message = run(monkeypatch, "judge_pairs", f"input_dir={generated}", f"output_dir={tmp_path / 'down'}", *api[:1], unreachable,
                      *api[2:])  # fmt: skip
    assert message.startswith(f"judge error: judge endpoint http://***REDACTED***@127.0.0.1:{port}/v1?key=***REDACTED*** is unreachable")
    assert not (tmp_path / "down").exists()  # refused before any work: nothing left behind
    basic = "Basic " + base64.b64encode(f"ana:{in_userinfo}".encode()).decode()
    assert {(e["query"].get("api_key"), e["query"].get("api-version")) for e in sent} == {(in_query, "2"), (None, None)}
    assert {e["headers"].get("Authorization") for e in sent} == {basic, "Bearer EMPTY"}
    assert {e["headers"].get("api-key") for e in sent} == {in_header}
    metrics = json.loads((tmp_path / "online" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"judge/requests@http://***REDACTED***@{host}/v1" in metrics
    assert f"judge/requests@http://{host}/v1?api_key=***REDACTED***&api-version=2" in metrics
    assert (tmp_path / "prefs" / "judge_cache.sqlite").is_file() and (tmp_path / "audit" / "audit.json").is_file()
    console = capfd.readouterr()
    assert_nowhere([in_query, in_userinfo, in_header, basic], tmp_path, message, console.out, console.err, caplog.text)


def test_negative_prices_and_budgets_are_refused_and_leave_nothing_behind(monkeypatch, tmp_path):
    generated = write_generated(tmp_path / "gen", [PROMPTS])
    empty = tmp_path / "empty"
    empty.mkdir()
    api = [f"input_dir={generated}", "judge=openai", "judge.api_key_env=null"]
    for out, setting in [(tmp_path / "new" / "prefs", "judge.input_usd_per_mtok=-1"), (empty, "judge.max_cost_usd=-5")]:
        message = run(monkeypatch, "judge_pairs", *api, f"output_dir={out}", setting)
        assert message == f"config error: {setting}: prices and budgets must be >= 0 (or null: no price known / no budget)"
    assert not (tmp_path / "new").exists() and list(empty.iterdir()) == []  # claimed, refused, and put back as found


def test_expected_os_errors_of_get_model_and_plot_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n')
    cases = [
        (["rlaif", "get-model", "smollm2-135m-instruct", "--out", str(a_file / "model")],
         f"rlaif: error: cannot write the model to {a_file / 'model'} ("),
        (["rlaif", "plot", str(run)], f"rlaif: error: {run / 'metrics.jsonl'}: line 2 is not JSON ("),
        (["rlaif", "plot", str(tmp_path / "missing")], f"rlaif: error: {tmp_path / 'missing'} has no metrics.jsonl"),
    ]
    for args, expected in cases:
        result = run_cli(args, cwd=tmp_path)
        errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
        assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    result = run_cli(["rlaif", "plot", str(run), "--out", str(a_file / "run.png")], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [ln for ln in result.stderr.splitlines() if "error" in ln.lower()] == [
        f"rlaif: error: cannot write {a_file / 'run.png'} (Not a directory); choose another --out"]
    assert a_file.read_text() == "not a directory" and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_a_malformed_config_file_is_one_line_with_file_line_and_column(monkeypatch, tmp_path):
    bad = tmp_path / "my_run.yaml"
    bad.write_text("defaults:\n  - judge: rule\nbatch_size: [1, 2\noutput_dir: out\n")
    monkeypatch.setattr(sys, "argv", ["judge_pairs", "--config", str(bad), "input_dir=."])
    message = run_main(monkeypatch, "judge_pairs")
    assert message == (f"config error: {bad}, line 4, column 11: not valid yaml (while parsing a flow sequence: expected ',' or ']', "
                       "but got ':'); fix the file there")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_run.yaml"]


def test_messages_name_the_key_the_user_typed(monkeypatch, tmp_path, tiny_model_dir, pairs_file, no_engine):
    message = run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, tmp_path / "dpo", pairs_file, "keep_last_checkpoints=0"))
    assert message == "config error: keep_last_checkpoints=0: keep at least 1 checkpoint, or null for all; fix it in the config or with keep_last_checkpoints=..."
    missing = tmp_path / "no_model"
    message = run(monkeypatch, "evaluate", f"checkpoint_dir={tiny_model_dir}", f"reference_dir={missing}", f"output_dir={tmp_path / 'e'}")
    assert message == f"checkpoint error: no config.json in {missing} (the directory does not exist); point reference_dir at an HF model directory"
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "e").exists()


def test_a_data_component_names_the_key_it_was_set_at(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    """One prompt set component serves `data`, `safe_prompts` and `data.parts.NAME`: its errors name
    the one the user set, not the key it happens to have in online_dpo."""
    message = run(monkeypatch, "evaluate", f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'e'}", "safe_prompts.where.label=safe")
    assert message == "config error: safe_prompts.where.label='safe': must be a list of values to keep, e.g. [safe]"
    online = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", *ONLINE, "data=xstest_advbench"]
    message = run(monkeypatch, "online_dpo", *online, "data.parts.advbench.held_out_fraction=2")
    assert message.startswith("config error: data.parts.advbench.held_out_fraction=2: must be in [0, 1]")
    @functools.wraps(SentenceEncoder.__init__)  # the same signature, for the config checks
    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder loaded before the harm requests were checked")

    monkeypatch.setattr(SentenceEncoder, "__init__", no_encoder)
    message = run(monkeypatch, "train_reward_model", f"output_dir={tmp_path / 'r'}", "harm_eval_data.split=test")
    assert message == "config error: harm_eval_data.split='test'; use train, held_out or all"
    assert not any((tmp_path / d).exists() for d in ("e", "o", "r"))


@pytest.mark.parametrize("setting,expected", [
    ("model.lora_rank=0", "model.lora_rank=0: the adapter rank must be >= 1 (e.g. 8)"),
    ("model.lora_alpha=0", "model.lora_alpha=0: the adapter scale must be > 0 (e.g. 2 x lora_rank)"),
    ("model.lora_dropout=1.0", "model.lora_dropout=1.0: dropout must be in [0, 1) (0: none)"),
])  # fmt: skip
def test_lora_settings_are_checked_before_the_model_is_built(monkeypatch, tmp_path, tiny_model_dir, pairs_file, setting, expected):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before its LoRA settings were checked")

    monkeypatch.setattr("rlaif_recipes.recipes.dpo.build_policy", no_build)
    monkeypatch.setattr("rlaif_recipes.recipes.online_dpo.build_policy", no_build)
    key = setting.split("=")[0]
    expected = f"config error: {expected}; fix it in the config or with {key}=..."
    assert run(monkeypatch, "dpo", *dpo_args(tiny_model_dir, tmp_path / "dpo", pairs_file, "model=hf_lora", setting)) == expected
    online = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", *ONLINE, "model=hf_lora", setting]
    assert run(monkeypatch, "online_dpo", *online) == expected
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "o").exists()


def test_every_judge_base_url_entry_is_checked_with_the_config(monkeypatch, tmp_path, tiny_model_dir, no_engine):
    online = [f"checkpoint_dir={tiny_model_dir}", f"output_dir={tmp_path / 'o'}", *ONLINE, "judge=openai", "judge.api_key_env=null",
              "judge.base_url=[http://127.0.0.1:1/v1,localhost:8000/v1]"]  # fmt: skip
    assert run(monkeypatch, "online_dpo", *online) == (
        "config error: judge.base_url[1]=localhost:8000/v1 is not an http(s) URL with a host; write it as http://HOST:PORT/v1 (or https://...)"
    )
    assert not (tmp_path / "o").exists()
