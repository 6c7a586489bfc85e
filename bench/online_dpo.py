"""Online DPO throughput: the `online_dpo` recipe against TRL's OnlineDPOTrainer, in pairs/s.

Why: online DPO spends each step sampling, judging, training and pushing weights; the project's
targets are at least 5x the preference pairs per second of TRL's OnlineDPOTrainer (trl 1.16,
`trl.experimental.online_dpo`) on the same work, a train phase that runs at >= 40% of this CPU's
measured bf16 matmul peak, and weight sync under 10% of a step. LoRA should cut memory: the same
run with `model=hf_lora` is measured beside full fine-tuning, with each run's peak RSS.

Same work on both sides: SmolLM2-135M-Instruct (default) or the tiny random Llama of
bench/sampling.py, full fine-tuning, the same prompts (the ones our run drew, given to TRL as chat
messages), 8 prompts x 2 responses a step and 48 new tokens for SmolLM2 (16 x 64 for tiny),
temperature 1, sigmoid DPO with beta 0.1, AdamW at the same constant learning rate, and
preferences from the same rule (`rlaif_recipes.judges.rules.shorter`: our judge=rule, TRL's
reward_funcs). Precision is bf16 for SmolLM2 on both sides: ours trains bf16 weights (policy,
reference and AdamW state) and samples with vLLM in bf16; TRL gets the model loaded in bf16 (so
its policy, reference and AdamW state are bf16 too) with `bf16=True`. TRL samples with HF
generate: its vLLM colocate mode crashes on CPU at weight sync.

Throughput is pairs trained / wall time of a step (end to end, logging included), for every step
after the first (warm-up); the table shows the median step, which shrugs off the bursts of other
people's jobs on a shared machine, and all steps are printed below it. Model FLOPs count
2 x params per token for a forward pass and 6 x params for forward + backward: the body's matmul
params (all but embeddings and output head) for every token of a sequence, the output head's only
for response tokens, which are all the loss needs; attention scores and embedding lookups are
left out. A step samples n x (prompt + response) tokens; its train phase (`time/train` in
metrics.jsonl: policy forward + backward, reference forward, optimizer step) costs
6 + 2 = 8 x params per trained token. The peaks are the best fp32 and bf16 square matmuls measured
in the same run; shares are against the peak of the run's dtype, and the train phase's also against
the peak of its own matmul shapes (`shape_peak`: thin matmuls cannot reach a square one's peak).
`--variants` runs ours again with `compile=true`, with the per-parameter AdamW
(`optimizer.fused=false`) and with torchtune's chosen-over-rejected rows (`pack_pairs=false`: each
pair's prompt runs twice), side by side; compile time is reported apart from the step rates. TRL's train phase is timed from
the end of its generate call to the end of its step, with its own token counts.

Peak RSS is each recipe process's (os.wait4's ru_maxrss: the run and everything it waited for),
vLLM's in-process engine and its KV cache (fixed at 512 MiB here, touched in full) included.

    python bench/online_dpo.py --steps 6 --out-dir outputs/bench
    python bench/online_dpo.py --steps 6 --variants --skip-lora     # compile and AdamW variants beside TRL
    python bench/online_dpo.py --model tiny --steps 8
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pyarrow.parquet as pq
import torch
from sampling import bench_model, cpu_flags, describe_model

from rlaif_recipes.judges.rules import shorter

REPO = Path(__file__).resolve().parent.parent
LR, BETA, N = 5e-6, 0.1, 2
KV_CACHE_BYTES = 512 * 2**20  # fixed, so peak RSS does not depend on this machine's RAM
DEFAULTS = {"smollm2": dict(prompts=8, max_tokens=48, dtype="bf16"), "tiny": dict(prompts=16, max_tokens=64, dtype="fp32")}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = [  # ours with one change undone or added, beside the defaults
    ("compile=true (layers and loss, inductor)", ("compile=true",)),
    ("per-parameter AdamW (optimizer.fused=false)", ("optimizer.fused=false",)),
    ("unpacked pairs (pack_pairs=false: the prompt runs twice)", ("pack_pairs=false",)),
]


def peak_flops(dtype: torch.dtype, sizes: Tuple[int, ...] = (2048, 4096), reps: int = 5) -> float:
    """Best FLOP/s of a large square matmul in `dtype` on this process's torch threads."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def shape_peak(model_dir: Path, rows: int, response_rows: int, dtype: torch.dtype, reps: int = 3) -> float:
    """FLOP/s of the train phase's own matmuls, timed alone: every linear layer of one transformer
    block at `rows` tokens (forward twice: policy and reference; input and weight gradients) and
    the output head at `response_rows`. The honest ceiling for thin matmuls on this CPU."""
    c = json.loads((model_dir / "config.json").read_text())
    d, ff = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    linears = [(rows, d, q), (rows, d, kv), (rows, d, kv), (rows, q, d), (rows, d, ff), (rows, d, ff), (rows, ff, d),
               (response_rows, d, c["vocab_size"])]
    total_flops, total_s = 0.0, 0.0
    for m, k, n in linears:
        x, w, g = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
        products = [(x, w.T), (x, w.T), (g, w), (g.T, x)]  # forward (policy, reference), input and weight gradients
        best = float("inf")
        for _ in range(reps + 1):
            start = time.perf_counter()
            for a, b in products:
                a @ b
            best = min(best, time.perf_counter() - start)
        total_flops += 4 * 2 * m * k * n
        total_s += best
    return total_flops / total_s


def matmul_params(model_dir: Path) -> Tuple[int, int]:
    """(body, head): matmul params every token pays, and the output head's (tied or not)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    numel = {k: int(torch.Size(s).numel()) for k, s in shapes.items()}
    head = numel.get("lm_head.weight") or next(n for k, n in numel.items() if "embed_tokens" in k)
    body = sum(n for k, n in numel.items() if "embed_tokens" not in k and k != "lm_head.weight")
    return body, head


def flops(params: Tuple[int, int], tokens: int, response_tokens: int, per_token: int) -> float:
    """`per_token` x params: the body over all tokens, the output head over response tokens only."""
    body, head = params
    return per_token * (body * tokens + head * response_tokens)


def run_ours(model_dir: Path, out: Path, settings: Dict[str, Any], model_option: str, *extra: str) -> Dict[str, Any]:
    """One recipe run in its own process; its step metrics, token counts and peak RSS. Time spent
    compiling (compile=true: `time/compile`) is left out of the rates and reported apart."""
    sampler_dtype = "bfloat16" if settings["dtype"] == "bf16" else "float32"
    cmd = [
        str(Path(sys.executable).parent / "tune"), "run", "rlaif_recipes/recipes/online_dpo.py", "--config", "online_dpo",
        f"model={model_option}", f"checkpoint_dir={model_dir}", f"output_dir={out}", f"max_steps={settings['steps']}",
        f"prompts_per_step={settings['prompts']}", f"n={N}", f"dtype={settings['dtype']}",
        f"sampler.dtype={sampler_dtype}", f"sampler.max_tokens={settings['max_tokens']}", "sampler.temperature=1.0",
        f"sampler.kv_cache_memory_bytes={KV_CACHE_BYTES}", "judge.rule=rlaif_recipes.judges.rules.shorter",
        "loss=dpo", f"loss.beta={BETA}", f"optimizer.lr={LR}", f"save_every_n_steps={settings['steps']}",
        "lr_scheduler=null", *extra,
    ]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's running max
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode != 0:
        raise RuntimeError(f"online_dpo ({model_option}) failed with exit code {proc.returncode}; "
                           f"log {log}:\n{log.read_text()[-3000:]}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = logged[1:]  # the first step warms up (allocations, first weight push)
    step_time = sum(m["time/step"] for m in timed)
    return dict(
        rates=[m["pairs/trained"] / (m["time"] - prev["time"] - m.get("time/compile", 0.0)) for prev, m in zip(logged, timed)],
        compile=sum(m.get("time/compile", 0.0) for m in logged),
        padded_tokens=statistics.fmean(m["tokens/trained"] for m in timed),
        **{k: sum(m[f"time/{k}"] for m in timed) / len(timed) for k in ("sample", "judge", "train", "sync")},
        sync_share=sum(m["time/sync"] for m in timed) / step_time,
        response_tokens=sum(m["response/tokens_mean"] for m in timed) / len(timed),
        tokens=step_tokens(out, range(2, settings["steps"] + 1), packed="pack_pairs=false" not in extra),
        peak_rss=usage.ru_maxrss * 1024,  # Linux reports KiB
    )


def step_tokens(out: Path, steps: range, packed: bool) -> Dict[str, float]:
    """Per-step token counts from the run's step files: sampled (every response with its prompt),
    trained (what the train phase runs through the model: a packed pair's prompt once, plus the copy
    of its last token before the second response; unpacked, the prompt twice) and, of those,
    response tokens."""
    counts = dict(sampled=0, sampled_response=0, trained=0, trained_response=0)
    for step in steps:
        for row in pq.read_table(out / "steps" / f"step-{step:05d}.parquet").to_pylist():
            prompt, lengths = len(row["prompt_token_ids"]), [len(ids) for ids in row["response_token_ids"]]
            counts["sampled"] += len(lengths) * prompt + sum(lengths)
            counts["sampled_response"] += sum(lengths)
            if row["chosen"] is not None:
                response = lengths[row["chosen"]] + lengths[row["rejected"]]
                counts["trained"] += (prompt + 1 if packed else 2 * prompt) + response
                counts["trained_response"] += response
    return {k: v / len(steps) for k, v in counts.items()}


def prompts_used(out: Path) -> List[str]:
    return [r["prompt"] for f in sorted((out / "steps").glob("step-*.parquet")) for r in pq.read_table(f).to_pylist()]


def run_trl(model_dir: Path, out: Path, prompts: List[str], settings: Dict[str, Any]) -> Dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    def shorter_reward(prompts, completions, **_) -> List[float]:
        return [shorter(None, c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    generated: List[Tuple[float, int, int]] = []  # (end time, prompt tokens, completion tokens) per step
    step_ends: List[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[settings["dtype"]])
    args = OnlineDPOConfig(
        output_dir=str(out), per_device_train_batch_size=settings["prompts"], max_new_tokens=settings["max_tokens"],
        temperature=1.0, max_steps=settings["steps"], learning_rate=LR, beta=[BETA], loss_type="sigmoid",
        lr_scheduler_type="constant", use_cpu=True, bf16=settings["dtype"] == "bf16", report_to="none",
        save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0, use_vllm=False,
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    trainer = OnlineDPOTrainer(model=model, reward_funcs=shorter_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepEnds()])
    generate = trainer._generate

    def timed_generate(*a, **kw):
        result = generate(*a, **kw)  # prompt_ids, prompt_mask, completion_ids, completion_mask, ...
        generated.append((time.perf_counter(), int(result[1].sum()), int(result[3].sum())))
        return result

    trainer._generate = timed_generate
    trainer.train()
    timed = list(zip(generated, step_ends))[1:]
    return dict(
        rates=[settings["prompts"] / (b - a) for a, b in zip(step_ends, step_ends[1:])],
        train=statistics.fmean(end - gen_end for (gen_end, _, _), end in timed),
        tokens=dict(
            sampled=statistics.fmean(p + c for (_, p, c), _ in timed),
            sampled_response=statistics.fmean(c for (_, _, c), _ in timed),
            trained=statistics.fmean(p + c for (_, p, c), _ in timed),
            trained_response=statistics.fmean(c for (_, _, c), _ in timed),
        ),
    )


def print_throughput(systems: Dict[str, Dict[str, Any]], params: Tuple[int, int], peak: float, own_peak: float,
                     settings: Dict[str, Any]) -> None:
    """One row per system; the last is TRL, the baseline of the speedup column."""
    pairs, dtype = settings["prompts"], settings["dtype"]
    print(f"\n| system | pairs/s | s per {pairs} pairs | sample s | judge s | train s | sync s | sync share | compile s (apart) | "
          f"step GFLOP/s | train GFLOP/s | train share of square {dtype} peak | train share of own-shape peak | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    trl_rate = statistics.median(list(systems.values())[-1]["rates"])
    for name, r in systems.items():
        rate = statistics.median(r["rates"])
        per_step = pairs / rate
        t = r["tokens"]
        step_flops = flops(params, t["sampled"], t["sampled_response"], 2) + flops(params, t["trained"], t["trained_response"], 8)
        train_gflops = flops(params, t["trained"], t["trained_response"], 8) / r["train"] / 1e9
        parts = (f"{r['sample']:.2f} | {r['judge']:.3f} | {r['train']:.2f} | {r['sync']:.3f} | {100 * r['sync_share']:.1f}% | {r['compile']:.1f}"
                 if "sample" in r else f"- | - | {r['train']:.2f} | - | - | -")
        print(f"| {name} | {rate:.2f} | {per_step:.2f} | {parts} | {step_flops / per_step / 1e9:.1f} | {train_gflops:.1f} | "
              f"{100 * train_gflops * 1e9 / peak:.1f}% | {100 * train_gflops * 1e9 / own_peak:.1f}% | {rate / trl_rate:.2f}x |")
    print("\npairs/s of every timed step: " + "; ".join(f"{name}: {', '.join(f'{x:.2f}' for x in r['rates'])}" for name, r in systems.items()))
    for name, r in systems.items():
        t = r["tokens"]
        print(f"{name} per step: {t['sampled']:.0f} sampled tokens ({t['sampled_response']:.0f} response), "
              f"{t['trained']:.0f} trained ({t['trained_response']:.0f} response)")
    print("TRL's train s = end of its generate call to end of step")


def print_memory(runs: Dict[str, Dict[str, Any]]) -> None:
    print("\n| online_dpo | pairs/s | train s | sync s | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {statistics.median(r['rates']):.2f} | {r['train']:.2f} | {r['sync']:.3f} | {r['peak_rss'] / 2**30:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), default="smollm2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, help="prompts per step (pairs); default 8 for smollm2, 16 for tiny")
    p.add_argument("--max-tokens", type=int, help="new tokens per response; default 48 for smollm2, 64 for tiny")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), help="both sides; default bf16 for smollm2, fp32 for tiny")
    p.add_argument("--skip-lora", action="store_true", help="leave out the model=hf_lora run (peak RSS comparison)")
    p.add_argument("--variants", action="store_true", help="also run ours with compile=true, with the per-parameter AdamW and unpacked")
    p.add_argument("--ours", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run of ours (sampler.enforce_eager=false)")
    p.add_argument("--out-dir", default="outputs/bench")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step is a warm-up and is not timed")
    settings = dict(steps=args.steps, **{k: getattr(args, k) or v for k, v in DEFAULTS[args.model].items()})
    out_dir = (REPO / args.out_dir).resolve() if not Path(args.out_dir).is_absolute() else Path(args.out_dir)
    model_dir = bench_model(args.model, out_dir)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout keeps only the results

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"platform: {platform.platform()} | {platform.processor() or platform.machine()} | python "
          f"{platform.python_version()} | torch {torch.__version__} | os.cpu_count() {os.cpu_count()} | cpu flags: {cpu_flags()}")
    loads = [("start", os.getloadavg())]
    peaks = {name: peak_flops(dtype) for name, dtype in TORCH_DTYPES.items()}
    params = matmul_params(model_dir)
    print(f"model: {describe_model(args.model)} ({params[0] / 1e6:.1f}M body + {params[1] / 1e6:.1f}M head matmul params); "
          f"{args.steps} steps of {settings['prompts']} prompts x {N}, {settings['max_tokens']} new tokens, temperature 1, "
          f"rule judge `shorter`, {settings['dtype']} on both sides, lr {LR}, beta {BETA}; peak matmul "
          f"{', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in peaks.items())} ({torch.get_num_threads()} threads)")

    ours = run_ours(model_dir, out_dir / "bench_online_ours", settings, "hf", *args.ours)
    systems = {"online_dpo (vLLM sampler, torchtune step, fused AdamW)": ours}
    loads.append(("ours", os.getloadavg()))
    for name, extra in VARIANTS if args.variants else []:
        systems[f"online_dpo, {name}"] = run_ours(model_dir, out_dir / f"bench_online_{extra[0].split('=')[0]}", settings, "hf", *args.ours, *extra)
        loads.append((name, os.getloadavg()))
    trl = run_trl(model_dir, out_dir / "bench_online_trl", prompts_used(out_dir / "bench_online_ours"), settings)
    systems["TRL OnlineDPOTrainer (HF generate)"] = trl
    loads.append(("TRL", os.getloadavg()))
    memory = {"full fine-tuning (model=hf)": ours}
    if not args.skip_lora:
        memory["LoRA (model=hf_lora)"] = run_ours(model_dir, out_dir / "bench_online_ours_lora", settings, "hf_lora", *args.ours)
        loads.append(("LoRA", os.getloadavg()))

    padded = statistics.fmean(r["padded_tokens"] for r in systems.values() if "padded_tokens" in r)
    own_peak = shape_peak(model_dir, round(padded), round(ours["tokens"]["trained_response"]), TORCH_DTYPES[settings["dtype"]])
    print(f"own-shape peak: {own_peak / 1e9:.0f} GFLOP/s ({settings['dtype']} matmuls of one block at {padded:.0f} padded rows, "
          f"head at {ours['tokens']['trained_response']:.0f} response rows)")
    print_throughput(systems, params, peaks[settings["dtype"]], own_peak, settings)
    print_memory(memory)
    print("load average (1/5/15 min) at start, then after each run: " + "; ".join(
        f"{name} {'/'.join(f'{x:.2f}' for x in la)}" for name, la in loads) + " (other processes on these cores skew timings)")


if __name__ == "__main__":
    main()
