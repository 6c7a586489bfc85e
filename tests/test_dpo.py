"""The offline `dpo` recipe: data formats, checkpoints (HF-loadable, exact resume, corrupt and
partial ones), LoRA, precomputed reference log-probs, 1 vs 2 FSDP2 ranks, and learning."""

import contextlib
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import psutil
import pytest
import torch
from conftest import finish, run_cli, stderr_of, two_launchers, what_failed
from datasets import Dataset
from safetensors.torch import load_file

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.checkpointing import CheckpointError, CheckpointManager
from rlaif_recipes.data import preference_dataset, tokenize_preferences, xstest_pairs
from rlaif_recipes.errors import DataError
from rlaif_recipes.judges import Pair, RuleJudge, Verdict
from rlaif_recipes.judges.rules import answers_instead_of_refusing
from rlaif_recipes.recipes import dpo

# small and fast: 24 short pairs, 4 per step, constant lr
FAST = [
    "dataset.max_pairs=24",
    "eval_dataset.max_pairs=8",
    "max_seq_len=48",
    "batch_size=4",
    "lr_scheduler=null",
    "optimizer.lr=1e-3",
]


def run_dpo(out: Path, model_dir: Path, *overrides: str) -> dpo.DPORecipe:
    cfg = rlaif_config.load(
        "dpo", [f"checkpoint_dir={model_dir}", f"output_dir={out}", *FAST, *overrides], dpo.DPOSettings
    )
    recipe = dpo.DPORecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def read_log(out: Path) -> List[Tuple[int, Dict[str, float]]]:
    """DiskLogger lines `Step N | key:value ...` of every run in out/logs, in order."""
    rows = []
    for f in sorted((out / "logs").glob("log_*.txt")):
        for line in f.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if m:
                rows.append(
                    (
                        int(m.group(1)),
                        {k: float(v) for k, v in (kv.split(":", 1) for kv in m.group(2).split())},
                    )
                )
    return rows


def train_losses(out: Path) -> Dict[int, float]:
    return {step: m["loss"] for step, m in read_log(out) if "loss" in m}


def hf_weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


# ---- data -------------------------------------------------------------------------------------


def test_preference_formats_load_the_same_pairs(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": f"question {i}?", "chosen": f"answer {i}", "rejected": "I cannot help."} for i in range(6)
    ]
    conversational = [
        {
            "chosen": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["chosen"]},
            ],
            "rejected": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["rejected"]},
            ],
        }
        for r in rows
    ]
    (tmp_path / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversational))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "plain.parquet"))
    Dataset.from_list(conversational).save_to_disk(str(tmp_path / "disk"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    loaded = [
        preference_dataset(str(p))
        for p in (tmp_path / "conv.jsonl", tmp_path / "plain.parquet", tmp_path / "disk", arrow)
    ]
    for ds in loaded:
        assert ds["chosen"] == [r["chosen"] for r in rows] and ds["prompt"] == [r["prompt"] for r in rows]
    ids = tokenize_preferences(loaded[0], str(tiny_model_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": "question 0?"}], add_generation_prompt=True, tokenize=True
    )
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert ids[0]["prompt_ids"] == prompt_ids  # what a sampler would be prompted with
    assert tok.decode(ids[0]["chosen_ids"]) == "answer 0<|eot|>"


def test_bad_preference_data_fails_with_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="needs 'chosen' and 'rejected'"):
        preference_dataset(str(tmp_path / "bad.jsonl"))
    (tmp_path / "noprompt.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match="a 'prompt' column is needed"):
        preference_dataset(str(tmp_path / "noprompt.jsonl"))
    with pytest.raises(DataError, match="dataset.source"):
        preference_dataset(str(tmp_path / "missing.jsonl"))
    assert len(preference_dataset("xstest", split="held_out")) == len(xstest_pairs(split="held_out"))


# ---- checkpoints and resume -------------------------------------------------------------------


def test_checkpoint_loads_in_transformers_and_resume_is_exact(tmp_path, tiny_model_dir, monkeypatch):
    straight = run_dpo(tmp_path / "straight", tiny_model_dir, "max_steps=4")
    last = tmp_path / "straight" / "checkpoints" / "step_0000004"
    # transformers loads the saved directory as it is, and computes the trained model's logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(last))
    tokens = torch.tensor([[1, 40, 41, 300, 7, 99]])
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, straight._model(tokens), atol=1e-4)

    run_dpo(tmp_path / "resumed", tiny_model_dir, "max_steps=2")
    run_dpo(tmp_path / "resumed", tiny_model_dir, "max_steps=4", "resume_from_checkpoint=true")
    resumed = tmp_path / "resumed" / "checkpoints" / "step_0000004"
    a, b = hf_weights(last), hf_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")

    # a partial write or a directory without a finished manifest is never picked as latest
    ckpts = tmp_path / "resumed" / "checkpoints"
    (ckpts / ".step_0000006.partial-999").mkdir()
    (ckpts / "step_0000008").mkdir()
    (ckpts / "step_0000008" / "model.safetensors").write_bytes(b"half")
    manager = CheckpointManager(str(ckpts), str(tiny_model_dir))
    assert manager.latest() == resumed
    # a truncated weight file: latest() falls back to the previous one, loading it names the problem
    with open(resumed / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert manager.latest() == ckpts / "step_0000002"
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        manager.load(str(resumed))

    # an incompatible run (another global batch) exits with one line, before training
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "dpo",
            "--config",
            "dpo",
            f"checkpoint_dir={tiny_model_dir}",
            f"output_dir={tmp_path / 'resumed'}",
            *FAST,
            "batch_size=2",
            "resume_from_checkpoint=true",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        dpo.recipe_main()
    message = str(exit_info.value.code)
    assert message.startswith("output error:") and "batch_size=4, this run has batch_size=2" in message and "\n" not in message


def test_lora_with_precomputed_reference(tmp_path, tiny_model_dir):
    recipe = run_dpo(
        tmp_path / "a", tiny_model_dir, "model=hf_lora", "reference=precomputed", "max_steps=2"
    )
    trainable = {n for n, p in recipe._model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    caches = list((tmp_path / "a" / "reference_logps").glob("*.safetensors"))
    assert len(caches) == 1
    saved = tmp_path / "a" / "checkpoints" / "step_0000002"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(saved))  # LoRA merged: a plain HF Llama
    tokens = torch.tensor([[1, 40, 41, 300, 7, 99]])
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, recipe._model(tokens), atol=1e-4)
    base, merged = load_file(str(tiny_model_dir / "model.safetensors")), hf_weights(saved)
    assert torch.equal(
        base["model.layers.0.self_attn.k_proj.weight"], merged["model.layers.0.self_attn.k_proj.weight"]
    )
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"]
    )

    # a second run finds the cached reference log-probs (keyed by data + reference weights)
    stamp = caches[0].stat().st_mtime_ns
    run_dpo(
        tmp_path / "b",
        tiny_model_dir,
        "model=hf_lora",
        "reference=precomputed",
        "max_steps=2",
        f"reference_cache_dir={tmp_path / 'a' / 'reference_logps'}",
    )
    assert caches[0].stat().st_mtime_ns == stamp
    assert train_losses(tmp_path / "b") == pytest.approx(train_losses(tmp_path / "a"), rel=1e-6)


def test_precomputed_reference_trains_like_a_reference_copy(tmp_path, tiny_model_dir):
    copy = run_dpo(tmp_path / "model", tiny_model_dir, "reference=model", "max_steps=3")
    cached = run_dpo(tmp_path / "pre", tiny_model_dir, "reference=precomputed", "max_steps=3")
    assert cached._ref_model is None and copy._ref_model is not None
    assert train_losses(tmp_path / "pre") == pytest.approx(
        train_losses(tmp_path / "model"), rel=1e-4, abs=1e-5
    )
    kl = [m["kl/reference"] for _, m in read_log(tmp_path / "model") if "kl/reference" in m]
    assert (
        kl[0] == pytest.approx(0.0, abs=1e-4) and abs(kl[-1]) > 1e-3
    )  # the policy moves away from the reference
    from rlaif_recipes.plot_run import plot_run, read_run

    assert read_run(str(tmp_path / "model"))["loss"] == [(step, loss) for step, loss in train_losses(tmp_path / "model").items()]
    assert plot_run(str(tmp_path / "model")).stat().st_size > 20_000  # a dpo run's DiskLogger lines, drawn
    logged = read_log(tmp_path / "model")[-2][1]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "log_probs/chosen",
        "tokens_per_second_per_gpu",
        "peak_rss_gb",
    ):
        assert key in logged


def test_packed_pairs_train_like_chosen_over_rejected_rows(tmp_path, tiny_model_dir):
    """pack_pairs (the default) runs each prompt once where that costs less (short replies: cut to a
    32-token budget here); the losses are those of torchtune's layout."""
    packed = run_dpo(tmp_path / "packed", tiny_model_dir, "max_steps=3", "max_seq_len=32")
    rows = run_dpo(tmp_path / "rows", tiny_model_dir, "max_steps=3", "max_seq_len=32", "pack_pairs=false")
    batch = packed._collate(packed._train[:4])
    assert batch.mask is not None and batch.input_ids.shape[0] == 4 and rows._collate(rows._train[:4]).mask is None
    assert train_losses(tmp_path / "packed") == pytest.approx(train_losses(tmp_path / "rows"), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("max_seq_len", [512, 32])  # long pairs stay in rows, short ones pack (mask and positions)
def test_activation_checkpointing_trains_exactly_like_without(tmp_path, tiny_model_dir, max_seq_len):
    """Checkpointed layers recompute in backward under the attention backend their forward ran
    (math attention on CPU); a different one saves other tensors and torch refuses the backward."""
    plain = run_dpo(tmp_path / "plain", tiny_model_dir, "max_steps=3", f"max_seq_len={max_seq_len}")
    checkpointed = run_dpo(tmp_path / "ac", tiny_model_dir, "max_steps=3", f"max_seq_len={max_seq_len}", "enable_activation_checkpointing=true")
    assert type(checkpointed._model.layers[0]).__name__ == "CheckpointWrapper" and type(plain._model.layers[0]).__name__ != "CheckpointWrapper"
    assert train_losses(tmp_path / "ac") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-6)


# ---- distributed ------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parent.parent
DPO = ["tune", "run", "rlaif_recipes/recipes/dpo.py", "--config", "dpo"]


def dpo_args(model: Path, out: Path, *extra: str) -> List[str]:
    return [f"checkpoint_dir={model}", *FAST, "eval_dataset=null", "batch_size=2", f"output_dir={out}", *extra]


def torchrun_dpo(out: Path, model: Path, *extra: str) -> None:
    """dpo on one torchrun launcher with 2 processes (FSDP2, gloo)."""
    result = run_cli([*DPO[:2], "--nproc_per_node", "2", *DPO[2:], *dpo_args(model, out, *extra)], cwd=REPO)
    assert result.returncode == 0, what_failed(result)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir) -> Path:
    """3 steps on 2 FSDP2 ranks under one launcher, with the config's (fused) AdamW."""
    out = tmp_path_factory.mktemp("dpo") / "two"
    torchrun_dpo(out, tiny_model_dir, "max_steps=3")
    return out


def moved_and_apart(start: Path, a: Path, b: Path) -> Tuple[float, float]:
    """How far checkpoint `a` moved from the model in `start`, and how far `b` lies from `a`."""
    a, b, start = hf_weights(a), hf_weights(b), load_file(str(start / "model.safetensors"))
    return max((a[k] - start[k]).abs().max().item() for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_fsdp2_ranks_train_like_one_process(tmp_path, tiny_model_dir, two_ranks):
    run_dpo(tmp_path / "one", tiny_model_dir, "max_steps=3", "eval_dataset=null")
    one, two = train_losses(tmp_path / "one"), train_losses(two_ranks)
    assert list(one) == [1, 2, 3] and two == pytest.approx(one, rel=1e-4, abs=1e-5)
    moved, apart = moved_and_apart(tiny_model_dir, tmp_path / "one" / "checkpoints" / "step_0000003", two_ranks / "checkpoints" / "step_0000003")
    assert moved > 1e-4  # training did move the weights...
    assert apart < 0.02 * moved  # ...the same way on 1 and 2 ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_fused_adamw_on_fsdp2_shards_updates_like_the_per_parameter_loop(tmp_path, tiny_model_dir, two_ranks):
    """The configs' `optimizer.fused: true` steps FSDP2's DTensor shards on 2 gloo ranks as torch's
    plain for-loop AdamW does."""
    torchrun_dpo(tmp_path / "loop", tiny_model_dir, "max_steps=3", "optimizer.fused=false", "+optimizer.foreach=false")
    assert train_losses(tmp_path / "loop") == pytest.approx(train_losses(two_ranks), rel=1e-4, abs=1e-5)
    moved, apart = moved_and_apart(tiny_model_dir, two_ranks / "checkpoints" / "step_0000003", tmp_path / "loop" / "checkpoints" / "step_0000003")
    assert moved > 1e-4 and apart < 1e-3 * moved


@pytest.mark.slow
@pytest.mark.distributed
def test_two_launchers_on_loopback_train_and_resume_like_one_launcher(tmp_path, tiny_model_dir, two_ranks):
    """Multi-node as a cluster runs it: one launcher per node (here two on loopback), a checkpoint,
    a resume; the same weights and log as one launcher with two processes, and node 1 (global rank
    1) writes nothing: its working directory stays empty and each step is logged once."""
    out, nodes = tmp_path / "nodes", [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    bounded = "distributed_timeout_s=120"  # a rank that waits on a lost peer ends with a line, inside finish's timeout
    finish(two_launchers([*DPO, *dpo_args(tiny_model_dir, out, "max_steps=2", bounded)], nodes))
    finish(two_launchers([*DPO, *dpo_args(tiny_model_dir, out, "max_steps=3", bounded, "resume_from_checkpoint=true")], nodes))
    assert train_losses(out) == train_losses(two_ranks)
    assert [step for step, m in read_log(out) if "loss" in m] == [1, 2, 3]
    a, b = hf_weights(out / "checkpoints" / "step_0000003"), hf_weights(two_ranks / "checkpoints" / "step_0000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(nodes[1].iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_sigterm_or_kill_9_to_rlaif_stops_the_run_under_it(tmp_path, tiny_model_dir, sig):
    """A scheduler, `timeout` or `kill` stops `rlaif run` with SIGTERM, the OOM killer or `kill -9`
    with SIGKILL, which `rlaif` cannot pass on: the `tune run` process under it stops either way,
    so no orphaned run goes on writing into the output directory beside a re-run."""
    out = tmp_path / "run"
    rlaif = psutil.Popen([str(Path(sys.executable).parent / "rlaif"), "run", "dpo", *dpo_args(tiny_model_dir, out, "epochs=1000")],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while not ((out / "run.json").exists() and rlaif.children()):
        assert rlaif.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)
    runs = rlaif.children(recursive=True)
    rlaif.send_signal(sig)
    try:
        assert rlaif.wait(timeout=120) == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
        gone, alive = psutil.wait_procs(runs, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for proc in [rlaif, *runs]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_node_that_dies_or_hangs_ends_the_other_with_one_line(tmp_path, tiny_model_dir, fault):
    """Node 1 (its launcher and its rank) killed with kill -9, or its rank stopped (SIGSTOP) mid-run:
    node 0's rank stops with one line naming the way on (at once for a dead peer, after
    distributed_timeout_s for a hung one), not a hang and not gloo's traceback."""
    out, nodes = tmp_path / "nodes", [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    args = dpo_args(tiny_model_dir, out, "dataset.max_pairs=240", "max_steps=60", "save_every_n_steps=10", "distributed_timeout_s=15")
    launchers = two_launchers([*DPO, *args], nodes)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_0000010").is_dir():
        assert all(p.poll() is None for p in launchers) and time.monotonic() < deadline, finish(launchers)
        time.sleep(0.05)
    node1 = psutil.Process(launchers[1].pid)
    ranks = node1.children(recursive=True)
    if fault == "killed":
        for proc in [node1, *ranks]:
            proc.send_signal(signal.SIGKILL)
    else:
        for proc in ranks:
            proc.send_signal(signal.SIGSTOP)
    try:
        launchers[0].wait(timeout=120)
    finally:
        for proc in [node1, *ranks]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        launchers[1].wait()
    err = stderr_of(launchers[0])
    assert launchers[0].returncode != 0, err[-3000:]
    assert "training error: rank 0 of 2 lost contact with another rank" in err, err[-3000:]
    assert "restart every launcher with resume_from_checkpoint=true" in err
    assert "Traceback" not in err.split("training error:")[0]  # the rank's own output: one line, no traceback
    assert not (out / "checkpoints" / "step_0000060").exists()


# ---- learning ---------------------------------------------------------------------------------


def rule_judged_pairs(path: Path) -> int:
    """XSTest completions cut to 12 words, paired answer-vs-refusal in a hash-fixed order, and
    labelled by the rule judge (an answer beats a refusal); ties would be dropped."""
    pairs = []
    for row in xstest_pairs(split="all"):
        a, b = (" ".join(t.split()[:12]) for t in (row["chosen"], row["rejected"]))
        if hashlib.sha256(row["prompt"].encode()).digest()[0] % 2:
            a, b = b, a
        pairs.append(Pair(row["prompt"], a, b))
    judgments = RuleJudge(rule=answers_instead_of_refusing, order="fixed").judge(pairs)
    rows = []
    for p, j in zip(pairs, judgments):
        if j.verdict in (Verdict.A, Verdict.B):
            chosen, rejected = (
                (p.response_a, p.response_b) if j.verdict == Verdict.A else (p.response_b, p.response_a)
            )
            rows.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def test_dpo_raises_held_out_reward_accuracy(tmp_path, tiny_model_dir):
    assert rule_judged_pairs(tmp_path / "judged.jsonl") > 200
    run_dpo(
        tmp_path / "run",
        tiny_model_dir,
        f"dataset.source={tmp_path / 'judged.jsonl'}",
        "dataset.max_pairs=64",
        "eval_dataset.max_pairs=40",
        "batch_size=8",
        "max_steps=8",
        "optimizer.lr=3e-4",
        "reference=precomputed",
        "eval_every_n_steps=null",
    )
    evals = [m for _, m in read_log(tmp_path / "run") if "eval/rewards/accuracies" in m]
    before, after = evals[0]["eval/rewards/accuracies"], evals[-1]["eval/rewards/accuracies"]
    assert before < 0.65 and after >= 0.85 and after - before >= 0.25, (before, after)
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.05
