"""Online DPO throughput: the `online_dpo` recipe against TRL's OnlineDPOTrainer, in pairs/s.

Why: online DPO spends each step sampling, judging, training and pushing weights; the project's
target is at least 5x the preference pairs per second of TRL's OnlineDPOTrainer (trl 1.16,
`trl.experimental.online_dpo`) on the same work, with weight sync under 10% of a step.

Same work on both sides: the tiny HF Llama of bench/sampling.py (float32), the same prompts (the
ones our run drew, given to TRL as chat messages), 16 prompts x 2 responses a step, 64 new tokens,
temperature 1, sigmoid DPO with beta 0.1, AdamW at the same learning rate, and preferences from
the same rule (`rlaif_recipes.judges.rules.shorter`: our judge=rule, TRL's reward_func). TRL samples
with HF generate: its vLLM colocate mode crashes on CPU at weight sync.

Throughput is pairs trained / wall time of a step (end to end, logging included), for every step
after the first (warm-up); the table shows the median step, which shrugs off the bursts of other
people's jobs on a shared machine, and all steps are printed below it. The peak of the machine is measured in the same run with a large fp32 matmul; model
FLOPs per step count 2 x params per sampled token and 8 x params per trained token (policy
forward + backward, reference forward), embedding lookups excluded.

    python bench/online_dpo.py --steps 12 --out-dir outputs/bench
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
from typing import Dict, List

import pyarrow.parquet as pq
import torch
from sampling import TINY

from rlaif_recipes.judges.rules import shorter
from rlaif_recipes.models import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
PROMPTS_PER_STEP, MAX_TOKENS, LR, BETA = 16, 64, 5e-6, 0.1


def peak_flops(size: int = 2048, reps: int = 10) -> float:
    """Best fp32 FLOP/s of a big square matmul on this process's torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def matmul_params(model_dir: Path) -> int:
    """Parameters that cost FLOPs per token: everything but the embedding table."""
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    return sum(t.numel() for k, t in weights.items() if "embed_tokens" not in k)


def run_ours(model_dir: Path, out: Path, steps: int) -> Dict[str, float]:
    cmd = [
        str(Path(sys.executable).parent / "tune"), "run", "rlaif_recipes/recipes/online_dpo.py", "--config", "online_dpo",
        f"checkpoint_dir={model_dir}", f"output_dir={out}", f"max_steps={steps}", f"prompts_per_step={PROMPTS_PER_STEP}",
        "n=2", f"sampler.max_tokens={MAX_TOKENS}", "sampler.temperature=1.0", "sampler.dtype=float32",
        "judge.rule=rlaif_recipes.judges.rules.shorter", "loss=dpo", "loss.beta=0.1", f"optimizer.lr={LR}",
        f"checkpoint_every={steps}", "lr_scheduler=null",
    ]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"online_dpo failed:\n{result.stderr[-3000:]}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = logged[1:]  # the first step warms up (allocations, first weight push)
    step_time = sum(m["time/step"] for m in timed)
    return dict(
        rates=[m["pairs/trained"] / (m["time"] - prev["time"]) for prev, m in zip(logged, timed)],
        **{k: sum(m[f"time/{k}"] for m in timed) / len(timed) for k in ("sample", "judge", "train", "sync")},
        sync_share=sum(m["time/sync"] for m in timed) / step_time,
        response_tokens=sum(m["response/tokens_mean"] for m in timed) / len(timed),
        threads=torch.get_num_threads(),
    )


def step_tokens(out: Path, steps: range) -> Dict[str, float]:
    """Sampled and trained tokens per step, from the run's step files (for the FLOP count)."""
    sampled = trained = 0
    for step in steps:
        for row in pq.read_table(out / "steps" / f"step-{step:05d}.parquet").to_pylist():
            lengths = [len(ids) for ids in row["response_token_ids"]]
            sampled += len(row["prompt_token_ids"]) + sum(lengths)
            if row["chosen"] is not None:
                trained += 2 * len(row["prompt_token_ids"]) + lengths[row["chosen"]] + lengths[row["rejected"]]
    return dict(sampled=sampled / len(steps), trained=trained / len(steps))


def prompts_used(out: Path) -> List[str]:
    return [r["prompt"] for f in sorted((out / "steps").glob("step-*.parquet")) for r in pq.read_table(f).to_pylist()]


def run_trl(model_dir: Path, out: Path, prompts: List[str], steps: int) -> Dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    def shorter_reward(prompts, completions, **_) -> List[float]:
        return [shorter(None, c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.ends: List[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = OnlineDPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP, max_new_tokens=MAX_TOKENS, temperature=1.0,
        max_steps=steps, learning_rate=LR, beta=[BETA], loss_type="sigmoid", lr_scheduler_type="constant",
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0, use_vllm=False,
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    timer = StepTimes()
    trainer = OnlineDPOTrainer(model=model, reward_funcs=shorter_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return dict(rates=[PROMPTS_PER_STEP / (b - a) for a, b in zip(timer.ends, timer.ends[1:])], threads=torch.get_num_threads())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out-dir", default="outputs/bench")
    args = p.parse_args()
    out_dir = (REPO / args.out_dir).resolve() if not Path(args.out_dir).is_absolute() else Path(args.out_dir)
    model_dir = out_dir / "bench_online_tiny"
    if not (model_dir / "model.safetensors").exists():
        make_tiny_model(str(model_dir), **TINY)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"platform: {platform.platform()} | {platform.processor() or platform.machine()} | python "
          f"{platform.python_version()} | torch {torch.__version__} | os.cpu_count() {os.cpu_count()}")
    loads = [os.getloadavg()]
    peak = peak_flops()
    params = matmul_params(model_dir)
    print(f"model: {TINY} ({params / 1e6:.2f}M matmul params); {args.steps} steps of {PROMPTS_PER_STEP} prompts x 2, "
          f"{MAX_TOKENS} new tokens, temperature 1, rule judge `shorter`; peak fp32 matmul {peak / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")

    ours = run_ours(model_dir, out_dir / "bench_online_ours", args.steps)
    loads.append(os.getloadavg())
    tokens = step_tokens(out_dir / "bench_online_ours", range(2, args.steps + 1))
    flops_per_step = 2 * params * tokens["sampled"] + 8 * params * tokens["trained"]
    trl = run_trl(model_dir, out_dir / "bench_online_trl", prompts_used(out_dir / "bench_online_ours"), args.steps)
    loads.append(os.getloadavg())

    print("\n| system | pairs/s | s per 16 pairs | sample s | judge s | train s | sync s | sync share | model GFLOP/s | share of peak | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    trl_rate = statistics.median(trl["rates"])
    for name, r in (("online_dpo (vLLM sampler, torchtune step)", ours), ("TRL OnlineDPOTrainer (HF generate)", trl)):
        rate = statistics.median(r["rates"])
        per_step = PROMPTS_PER_STEP / rate
        gflops = flops_per_step / per_step / 1e9  # same work per step on both sides
        parts = (f"{r['sample']:.2f} | {r['judge']:.3f} | {r['train']:.2f} | {r['sync']:.3f} | {100 * r['sync_share']:.1f}%"
                 if "sample" in r else "- | - | - | - | -")
        print(f"| {name} | {rate:.1f} | {per_step:.2f} | {parts} | {gflops:.1f} | {100 * gflops * 1e9 / peak:.1f}% | "
              f"{rate / trl_rate:.2f}x |")
    print("\npairs/s of every timed step: " + "; ".join(
        f"{name}: {', '.join(f'{x:.1f}' for x in r['rates'])}" for name, r in (("ours", ours), ("TRL", trl))))
    print(f"per step: {tokens['sampled']:.0f} sampled + {tokens['trained']:.0f} trained tokens, "
          f"{flops_per_step / 1e9:.2f} model GFLOP; mean response {ours['response_tokens']:.1f} tokens")
    print("load average (1/5/15 min) at start, after ours, after TRL: " + "; ".join(
        "/".join(f"{x:.2f}" for x in la) for la in loads) + " (other processes on these cores skew timings)")


if __name__ == "__main__":
    main()
