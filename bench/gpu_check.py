"""The GPU check, stage by stage (run through bench/gpu_check.sh, which says how).

Every stage is independent: it has its own timeout (never past the whole check's budget), a
failure prints one line and the check goes on, and the summary table (stdout and $OUT/summary.md,
plus summary.json) has one row per stage. Models are made here, never carried: the tiny test model
and a random-init model of SmolLM2-135M-Instruct's exact shape (its weights cannot travel).
Random models answer at random, so the judge is a rule (the shorter reply wins: replies differ in
length, so pairs rarely tie). Throughput counts the padded chosen + rejected tokens a step trains
(metrics.jsonl `tokens/trained`) over its `time/train`, first step left out; MFU counts 8N FLOPs a
token (policy forward + backward 6N, reference forward 2N; N: every weight but the embedding table).

Settings (environment): DEVICE=cuda|cpu (cpu: a dry run of every stage, small), OUT, BUDGET (whole
check, seconds), STAGE_TIMEOUT, STEPS, PEAK_TFLOPS (H100/H200 bf16 dense: 989), ONLY (comma-separated
parts of stage names: run only those, plus the environment and the models).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEVICE = os.environ.get("DEVICE", "cuda")
GPU = DEVICE == "cuda"
OUT = Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_check").resolve()  # logs and the summary only: small
SCRATCH = Path(os.environ.get("SCRATCH") or Path(tempfile.gettempdir()) / "rlaif_gpu_check").resolve()  # models, runs, checkpoints
BUDGET = float(os.environ.get("BUDGET", "450"))
STAGE_TIMEOUT = float(os.environ.get("STAGE_TIMEOUT", "150"))
STEPS = int(os.environ.get("STEPS", "3"))
PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "989"))
ONLY = [part for part in os.environ.get("ONLY", "").split(",") if part]  # run only stages whose name holds one of these
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, intermediate_size=1536, max_position_embeddings=2048, rope_theta=100000.0,
                     tie_word_embeddings=True)  # fmt: skip
# a step's work: on the GPU enough to measure, on the CPU dry run as little as runs every code path
WORK = (["prompts_per_step=64", "n=4", "micro_batch_size=64", "sampler.max_tokens=64"] if GPU
        else ["prompts_per_step=4", "n=2", "micro_batch_size=4", "sampler.max_tokens=8"])  # fmt: skip
SAMPLERS = {  # sampler settings of each backend's runs
    "torchtune": ["sampler=torchtune", f"sampler.batch_size={256 if GPU else 8}"],
    "vllm": ["sampler=vllm_gpu", "sampler.max_model_len=512"] if GPU
            else ["sampler=vllm", "sampler.max_model_len=512", "sampler.kv_cache_memory_bytes=268435456"],
}  # fmt: skip
DTYPE = "bf16" if GPU else "fp32"
START = time.monotonic()
ROWS: List[Dict[str, str]] = []


class Skip(Exception):
    """A stage that cannot run here; its message says why."""


def left() -> float:
    return BUDGET - (time.monotonic() - START)


def stage(name: str, fn: Callable[[], str]) -> None:
    """Run one stage: its result line, or one line saying why it failed or was skipped."""
    if ONLY and name not in ("environment", "models") and not any(part in name for part in ONLY):
        return
    start = time.monotonic()
    try:
        if left() < 20:
            raise Skip(f"budget spent ({BUDGET:.0f} s)")
        status, detail = "ok", fn()
    except Skip as e:
        status, detail = "skipped", str(e)
    except Exception as e:  # one line per failure; the logs under $OUT/logs hold the rest
        status, detail = "FAILED", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    seconds = time.monotonic() - start
    ROWS.append({"stage": name, "status": status, "seconds": f"{seconds:.0f}", "detail": detail})
    print(f"[gpu_check] {name}: {status} ({seconds:.0f} s) {detail}", flush=True)
    write_summary()  # after every stage: a check stopped from outside still leaves its table


def write_summary() -> List[str]:
    table = ["| stage | status | s | result |", "|---|---|---:|---|"]
    table += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in ROWS]
    (OUT / "summary.md").write_text("\n".join(table) + "\n")
    (OUT / "summary.json").write_text(json.dumps(ROWS, indent=2))
    return table


def run(name: str, args: List[str], timeout: Optional[float] = None, background: bool = False):
    """A command from the repository root, its output in $OUT/logs/NAME.log; a failure raises with
    the log's first error line. Killed with its whole process group at the stage's timeout."""
    log = OUT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    if background:
        return proc
    limit = min(timeout or STAGE_TIMEOUT, max(left(), 1))
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(f"{name} ran past {limit:.0f} s (log: logs/{name}.log)") from None
    if code != 0:
        raise RuntimeError(f"{name} exited {code}: {first_error(log)} (log: logs/{name}.log)")
    return proc


def first_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "refused" in ln]
    return (errors or lines[-1:] or ["(no output)"])[0].strip()[:300]


def tune(*args: str, nproc: int = 1) -> List[str]:
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "torchtune._cli.tune", "run", *launcher, *args]


def online_dpo(name: str, model: Path, *extra: str, nproc: int = 1, steps: int = STEPS, sampler: str = "torchtune",
               background: bool = False, run_dir: Optional[str] = None):
    """An online_dpo run into SCRATCH/runs/RUN_DIR (default NAME, started afresh), logged as NAME."""
    out = SCRATCH / "runs" / (run_dir or name)
    if run_dir is None:
        shutil.rmtree(out, ignore_errors=True)
    args = tune("rlaif_recipes/recipes/online_dpo.py", "--config", "online_dpo", f"checkpoint_dir={model}", f"output_dir={out}",
                f"device={DEVICE}", f"dtype={DTYPE}", f"max_steps={steps}", *SAMPLERS[sampler], "judge=rule",
                "judge.rule=rlaif_recipes.judges.rules.shorter", "optimizer.lr=1e-5", "max_steps_without_pairs=null",
                *WORK, *extra, nproc=nproc)  # fmt: skip
    return run(name, args, background=background)


def metrics(run_dir: Path) -> List[Dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def throughput(name: str, model: Path, nproc: int = 1) -> str:
    """Train tokens/s and MFU over the steps after the first, the step time, and peak memory."""
    from dpo_throughput import flops_per_token

    logged = metrics(SCRATCH / "runs" / name)
    timed = logged[1:] or logged
    tokens = sum(m["tokens/trained"] for m in timed)
    train_s = sum(m["time/train"] for m in timed)
    per_s = tokens / train_s if train_s else 0.0
    line = (f"{len(logged)} steps, {sum(m['pairs/trained'] for m in logged)} pairs, train {per_s:,.0f} tokens/s, "
            f"step {timed[-1]['time/step']:.2f} s (sample {timed[-1]['time/sample']:.2f}, train {timed[-1]['time/train']:.2f}, "
            f"sync {timed[-1]['time/sync']:.2f})")  # fmt: skip
    if GPU:
        mfu = per_s * 4 * flops_per_token(model) / (PEAK_TFLOPS * 1e12 * nproc)
        line += f", MFU {100 * mfu:.1f}% of {PEAK_TFLOPS:.0f} TFLOPS x {nproc}, peak {max(m['memory/peak_gib'] for m in logged):.1f} GiB"
    return line


# ---- stages ----------------------------------------------------------------------------------------


def environment() -> str:
    import torch

    line = f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}"
    if GPU:
        if not torch.cuda.is_available():
            raise RuntimeError(f"DEVICE=cuda but torch sees no GPU ({line})")
        props = torch.cuda.get_device_properties(0)
        line += f", {torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    from importlib.metadata import version

    import torchao  # noqa: F401 - what the recipes import: a failure here names the missing wheel
    import torchtune  # noqa: F401

    import rlaif_recipes.recipes.online_dpo  # noqa: F401

    packages = ("torchtune", "torchao", "transformers", "datasets", "pyarrow", "pandas", "numpy", "hydra-core", "huggingface-hub")
    line += ", " + ", ".join(f"{name} {version(name)}" for name in packages)
    return line + f", vLLM: {vllm_version() or 'not importable (its stages skip)'}"


def vllm_version() -> Optional[str]:
    try:
        import vllm
    except Exception:
        return None
    return vllm.__version__


def make_models() -> str:
    """The tiny test model, and a random-init model of SmolLM2-135M-Instruct's exact shape (tied
    embeddings), with the tiny model's tokenizer padded with plain added tokens to its vocabulary."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlaif_recipes.models import make_tiny_model

    shutil.rmtree(SCRATCH / "models", ignore_errors=True)
    tiny = make_tiny_model(str(SCRATCH / "models" / "tiny"), seed=0)
    smol = SCRATCH / "models" / "smollm2-shape"
    config = json.loads((tiny / "config.json").read_text())
    config.update(SMOLLM2_SHAPE, torch_dtype="bfloat16")
    torch.manual_seed(0)
    built = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.bfloat16)
    built.save_pretrained(smol)
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, smol / f.name)
    tok = Tokenizer.from_file(str(smol / "tokenizer.json"))
    tok.add_tokens([f"<w{i}>" for i in range(SMOLLM2_SHAPE["vocab_size"] - tok.get_vocab_size())])
    tok.save(str(smol / "tokenizer.json"))
    return f"tiny, and SmolLM2-shaped ({sum(p.numel() for p in built.parameters()) / 1e6:.1f}M parameters) in {SCRATCH / 'models'}"


def kill_and_resume(model: Path) -> str:
    """kill -9 once step 3 is logged (checkpoint 2 written), resume, and compare with a run that
    was never killed: same steps logged once each, and the losses and final weights."""
    from safetensors.torch import load_file

    online_dpo("resume-full", model, "save_every_n_steps=2", steps=4)
    out = SCRATCH / "runs" / "resume-killed"
    proc = online_dpo("resume-killed", model, "save_every_n_steps=2", steps=4, background=True)
    deadline = time.monotonic() + min(STAGE_TIMEOUT, left())
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the run to kill did not reach step 3: {first_error(OUT / 'logs' / 'resume-killed.log')}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    online_dpo("resume-resumed", model, "save_every_n_steps=2", "resume_from_checkpoint=true", steps=4, run_dir=out.name)
    resumed = metrics(out)
    full = metrics(SCRATCH / "runs" / "resume-full")
    if [m["step"] for m in resumed] != [1, 2, 3, 4]:
        raise RuntimeError(f"resumed run logged steps {[m['step'] for m in resumed]}")
    a = load_file(str(SCRATCH / "runs" / "resume-full" / "checkpoints" / "step_0000004" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step_0000004" / "model.safetensors"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    losses = max(abs(x["loss"] - y["loss"]) for x, y in zip(full, resumed) if x["pairs/trained"])
    return f"steps 1-4 logged once; vs never killed: max |loss diff| {losses:.2e}, max |weight diff| {diff:.2e} (0 = exact)"


def push_check(model: Path) -> str:
    """vLLM follows pushes: its greedy log-probs equal the torchtune policy's (fp32) before a push,
    after a full push (and differ from before), and after a LoRA-merged push; on CUDA, sleep mode
    frees memory and the engine samples the same after it wakes."""
    import torch

    from rlaif_recipes.lora import merge_adapters
    from rlaif_recipes.models import decoder_from_hf_dir, hf_checkpointer, lora_decoder_from_hf_dir
    from rlaif_recipes.policy import streamed_state_dict
    from rlaif_recipes.samplers import VLLMSampler

    if vllm_version() is None:
        raise Skip("vLLM is not importable here (on the GPU machine it cannot travel: hundreds of MB, pinned to another torch)")
    device = torch.device(DEVICE)
    base = hf_checkpointer(str(model), output_dir=str(SCRATCH / "unused")).load_checkpoint()["model"]
    policy = decoder_from_hf_dir(str(model)).to(device)
    policy.load_state_dict(base)
    engine = dict(gpu_memory_utilization=0.3, sleep_between_steps=True) if GPU else dict(kv_cache_memory_bytes=256 << 20)
    sampler = VLLMSampler(str(model), dtype="float32", max_tokens=16, max_model_len=512, **engine)
    prompts = [[{"role": "user", "content": p}] for p in ("Hello!", "How do I bake bread?", "Name three rivers.")]

    def gap(module: torch.nn.Module):
        """vLLM's greedy samples, and the largest |log-prob difference| from `module`'s over their tokens."""
        samples = sampler.sample(prompts, n=1, temperature=0)
        worst = 0.0
        with torch.no_grad():
            for s in samples:
                c = s.completions[0]
                ids = torch.tensor([s.prompt_token_ids + c.token_ids], device=device)
                logp = torch.log_softmax(module(ids).float(), dim=-1)[0, len(s.prompt_token_ids) - 1 : -1]
                ours = logp.gather(-1, ids[0, len(s.prompt_token_ids) :, None]).squeeze(-1).cpu()
                worst = max(worst, (ours - torch.tensor(c.logprobs)).abs().max().item())
        return samples, worst

    try:
        before, d0 = gap(policy)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        sampler.update_weights(streamed_state_dict(policy))
        after, d1 = gap(policy)
        lora = lora_decoder_from_hf_dir(str(model), ["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True).to(device)
        lora.load_state_dict(policy.state_dict(), strict=False)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.05)
        sampler.update_weights(merge_adapters(lora, streamed_state_dict(lora)))
        merged, d2 = gap(lora)
        line = f"max |log-prob diff| vLLM vs policy: start {d0:.1e}, after push {d1:.1e}, after LoRA push {d2:.1e}"
        logprobs = [[c.logprobs for s in samples for c in s.completions] for samples in (before, after, merged)]
        changed = logprobs[0] != logprobs[1] and logprobs[1] != logprobs[2]
        if not changed or max(d0, d1, d2) > 2e-3:
            raise RuntimeError(f"vLLM does not follow the pushes ({line}; log-probs changed by each push: {changed})")
        if GPU:
            free = torch.cuda.mem_get_info()[0]
            sampler.sleep()
            freed = (torch.cuda.mem_get_info()[0] - free) / 2**30
            again, d3 = gap(lora)
            same = [c.token_ids for s in again for c in s.completions] == [c.token_ids for s in merged for c in s.completions]
            line += f"; sleep freed {freed:.1f} GiB, awake again: same samples {same}, diff {d3:.1e}"
            if freed <= 0 or not same:
                raise RuntimeError(line)
        return line
    finally:
        sampler.close()


def log_softmax_check() -> str:
    """`logprobs.token_logprobs` on this device against autograd on fp32 logits (the numbers the
    recipes had before it): values and gradient on 4,096 bf16 rows of a 128k-word vocabulary
    (several chunks; 64 rows in a CPU dry run), and the time of a forward + backward of each."""
    import torch

    from rlaif_recipes.logprobs import token_logprobs

    g, rows = torch.Generator().manual_seed(0), 4096 if GPU else 64
    logits = (torch.randn(rows, 128_256, generator=g) * 4).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, 128_256, (rows,), generator=g).to(DEVICE)
    upstream = torch.randn(rows, generator=g).to(DEVICE)

    def autograd(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fp32 = x.float()
        return fp32.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(fp32, dim=-1)

    out, seconds = {}, {}
    for name, fn in (("autograd", autograd), ("chunked", token_logprobs)):
        for _ in range(2):  # the second is timed
            x = logits.clone().requires_grad_()
            if GPU:
                torch.cuda.synchronize()
            start = time.perf_counter()
            values = fn(x, targets)
            values.backward(upstream)
            if GPU:
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
        out[name] = values.detach(), x.grad.float()
    value_gap = (out["autograd"][0] - out["chunked"][0]).abs().max().item()
    grad_gap = (out["autograd"][1] - out["chunked"][1]).abs().max().item()
    if value_gap > 1e-4 or grad_gap > 1e-3:
        raise RuntimeError(f"token_logprobs differs from autograd: values by {value_gap:.2e}, gradient by {grad_gap:.2e}")
    return (f"equal to autograd (values {value_gap:.1e}, gradient {grad_gap:.1e}); forward + backward "
            f"{seconds['autograd'] * 1e3:.1f} ms by autograd, {seconds['chunked'] * 1e3:.1f} ms chunked")  # fmt: skip


def with_vllm(name: str, model: Path) -> str:
    if vllm_version() is None:
        raise Skip("vLLM is not importable here")
    online_dpo(name, model, sampler="vllm")
    return throughput(name, model)


def on_off_stage(model: Path, key: str) -> str:
    """Online DPO with a boolean setting off, then on: `compile` (compile time apart) or
    `pack_pairs` (whether each pair's prompt running once pays on this GPU's attention kernels)."""
    conf = (ROOT / "conf" / "online_dpo.yaml").read_text()
    if not any(line.startswith(f"{key}:") for line in conf.splitlines()):
        raise Skip(f"online_dpo has no `{key}` setting in this version (issue 25 adds it)")
    results = []
    for on in ("false", "true"):
        online_dpo(f"smol-{key}-{on}", model, f"{key}={on}")
        compiled = sum(m.get("time/compile", 0.0) for m in metrics(SCRATCH / "runs" / f"smol-{key}-{on}"))
        results.append(f"{key}={on}: {throughput(f'smol-{key}-{on}', model)}" + (f", compiling {compiled:.0f} s (apart)" if compiled else ""))
    return "; ".join(results)


def two_processes(name: str, model: Path, *extra: str) -> str:
    import torch

    if GPU and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU: 2 ranks need 2 GPUs (NCCL puts one rank on each); the CPU suite runs FSDP2 on 2 ranks")
    online_dpo(name, model, *extra, nproc=2)
    return throughput(name, model, nproc=2)


def dpo_offline(compile_: str = "off") -> str:
    """The 1B offline bench, both recipes; compile_="both" runs each with torch.compile off and on."""
    if not GPU:
        raise Skip("the offline DPO throughput bench measures MFU on a GPU only")
    need = 200 if compile_ == "off" else 420
    if left() < need:
        raise Skip(f"{left():.0f} s of the budget left; it needs about {need} (a 1B model is made, the recipes run)")
    name = f"dpo-throughput-compile-{compile_}"
    run(name, [sys.executable, "bench/dpo_throughput.py", "--out", str(SCRATCH / "dpo"), "--size", "1b", "--device", "cuda",
               "--dtype", "bf16", "--nproc", "1", "--batch-size", "8", "--max-seq-len", "512", "--steps", "8",
               "--warmup", "3", "--peak-tflops", str(PEAK_TFLOPS), "--compile", compile_])  # fmt: skip
    table = (OUT / "logs" / f"{name}.log").read_text().split("Offline DPO throughput")[-1]
    return " / ".join(ln.strip() for ln in table.splitlines() if ln.startswith("| ours") or ln.startswith("| torchtune"))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # no network there: nothing may wait on a hub; caches in the scratch folder, whatever HOME is
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("HF_HOME", str(SCRATCH / "hf_home"))
    print(f"[gpu_check] DEVICE={DEVICE} dtype={DTYPE} steps={STEPS} budget={BUDGET:.0f} s, summary and logs in {OUT}, "
          f"models and runs in {SCRATCH}", flush=True)
    tiny, smol = SCRATCH / "models" / "tiny", SCRATCH / "models" / "smollm2-shape"
    stage("environment", environment)
    stage("models", make_models)
    stage("log-softmax: chunked = autograd", log_softmax_check)
    stage("tiny 1 process", lambda: (online_dpo("tiny-1", tiny), throughput("tiny-1", tiny))[1])
    stage("SmolLM2-shape 1 process", lambda: (online_dpo("smol-1", smol), throughput("smol-1", smol))[1])
    stage("SmolLM2-shape activation checkpointing", lambda: (online_dpo("smol-ac", smol, "enable_activation_checkpointing=true"),
                                                   throughput("smol-ac", smol))[1])  # fmt: skip
    stage("SmolLM2-shape LoRA", lambda: (online_dpo("smol-lora", smol, "model=hf_lora", "optimizer.lr=1e-4"), throughput("smol-lora", smol))[1])
    stage("SmolLM2-shape compile on/off", lambda: on_off_stage(smol, "compile"))
    stage("SmolLM2-shape pack_pairs on/off", lambda: on_off_stage(smol, "pack_pairs"))
    stage("tiny kill -9 and resume", lambda: kill_and_resume(tiny))
    stage("tiny 2 processes", lambda: two_processes("tiny-2", tiny))
    stage("SmolLM2-shape 2 processes", lambda: two_processes("smol-2", smol))
    stage("tiny vLLM push = policy (LoRA; sleep)", lambda: push_check(tiny))
    stage("tiny vLLM sampler", lambda: with_vllm("tiny-vllm", tiny))
    stage("SmolLM2-shape vLLM sampler", lambda: with_vllm("smol-vllm", smol))
    stage("1B offline dpo throughput (bench/dpo_throughput.py)", dpo_offline)
    stage("1B offline dpo throughput, compile off and on", lambda: dpo_offline("both"))
    print("\n".join(["", *write_summary()]), flush=True)
    print(f"[gpu_check] done in {time.monotonic() - START:.0f} s: {sum(r['status'] == 'ok' for r in ROWS)} ok, "
          f"{sum(r['status'] == 'FAILED' for r in ROWS)} failed, {sum(r['status'] == 'skipped' for r in ROWS)} skipped", flush=True)


if __name__ == "__main__":
    main()
