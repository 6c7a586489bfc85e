"""Sampling throughput: VLLMSampler vs TorchtuneSampler on a tiny Llama, float32, CPU or GPU.

Why: RLAIF training spends most of its time sampling, and the project's target is that the vLLM
backend generates at least 5x as fast as torchtune's KV-cached generate. Both samplers get the
same prompts (as the same token ids) and settings; throughput counts the tokens actually produced
(sum of len(token_ids)), since sequences may stop early at an end token.

The torchtune run happens before the vLLM engine is created: creating the engine lowers torch's
thread count in this process (to 1 on a 2-core CPU), which would slow torchtune down unfairly.
The thread count seen during each measurement is printed next to its numbers.

    python bench/sampling.py --prompts 64 --n 2 --max-tokens 64 --out-dir outputs/bench
"""

import argparse
import csv
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

import torch
from torchtune.training import FullModelHFCheckpointer

from rlaif_recipes.models import decoder_from_hf_dir, make_tiny_model
from rlaif_recipes.samplers import Sampler, TorchtuneSampler, VLLMSampler

XSTEST = Path(__file__).resolve().parent.parent / "rlaif_recipes" / "assets" / "xstest" / "xstest_prompts.csv"
TINY = dict(vocab_size=4096, dim=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_dim=768)


def load_prompts(count: int) -> List[List[Dict[str, str]]]:
    with open(XSTEST, newline="", encoding="utf-8") as f:
        rows = [r["prompt"] for r in csv.DictReader(f)][:count]
    return [[{"role": "user", "content": p}] for p in rows]


def measure(sampler: Sampler, prompts, args: argparse.Namespace) -> Dict[str, float]:
    """One untimed warm-up call, then the median of `args.reps` timed calls."""
    kw = dict(n=args.n, temperature=1.0, max_tokens=args.max_tokens)
    sampler.sample(prompts, seed=1234, **kw)
    runs = []
    for rep in range(args.reps):
        start = time.perf_counter()
        out = sampler.sample(prompts, seed=rep, **kw)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for ps in out for c in ps.completions)
        runs.append((tokens / seconds, seconds, tokens))
    tps, seconds, tokens = sorted(runs)[len(runs) // 2]  # the median run by tokens/s
    return dict(
        tps=tps, seconds=seconds, tokens=tokens, threads=torch.get_num_threads(), all_tps=[r[0] for r in runs]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default="outputs/bench")
    args = p.parse_args()

    model_dir = Path(args.out_dir) / "bench_sampling_tiny"
    if not (model_dir / "model.safetensors").exists():
        make_tiny_model(str(model_dir), **TINY)
    prompts = load_prompts(args.prompts)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"platform: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"python {platform.python_version()} | torch {torch.__version__}"
    )
    print(
        f"torch threads at start: {torch.get_num_threads()}; os.cpu_count(): {os.cpu_count()}; "
        f"load average (1/5/15 min): {os.getloadavg()} (other processes skew timings)"
    )
    print(f"model: {TINY}; {len(prompts)} prompts x n={args.n}, max_tokens={args.max_tokens}, float32\n")

    results = {}
    model = decoder_from_hf_dir(str(model_dir))
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(model_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3",
        output_dir=str(Path(args.out_dir) / "bench_ckpt_out"),
    )
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    tt = TorchtuneSampler(str(model_dir), batch_size=args.prompts * args.n, max_tokens=args.max_tokens)
    tt.bind_policy(model.float())
    results["torchtune"] = measure(tt, prompts, args)

    vllm = VLLMSampler(
        str(model_dir), dtype="float32", gpu_memory_utilization=0.05, max_tokens=args.max_tokens
    )
    try:
        results["vllm"] = measure(vllm, prompts, args)
    finally:
        vllm.close()

    base = results["torchtune"]["tps"]
    print("| backend | tokens/s | seconds | generated tokens | speedup vs torchtune | torch threads |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['tps']:.0f} | {r['seconds']:.2f} | {r['tokens']} | {r['tps'] / base:.2f}x | {r['threads']} |"
        )
    print(
        "\nall reps (tokens/s): "
        + "; ".join(f"{k}: {', '.join(f'{x:.0f}' for x in r['all_tps'])}" for k, r in results.items())
    )


if __name__ == "__main__":
    main()
