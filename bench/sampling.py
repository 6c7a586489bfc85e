"""Sampling throughput: VLLMSampler vs TorchtuneSampler on SmolLM2 (or the tiny Llama), per dtype.

Why: RLAIF training spends most of its time sampling, and the project's target is that the vLLM
backend generates at least 5x as fast as torchtune's KV-cached generate. Both samplers get the
same prompts (as the same token ids) and settings; throughput counts the tokens actually produced
(sum of len(token_ids)), since sequences may stop early at an end token. Every dtype asked for is
measured in the same run, so the fp32 and bf16 rows share one machine state.

torchtune runs in this process, for every dtype, before any vLLM engine exists; each vLLM engine
runs in a fresh spawned process. Creating an engine changes this process's torch threading (the
CPU worker rebinds threads and then refuses torch.set_num_threads), which would skew anything
measured after it, and a fresh process per engine leaves no engine state to the next dtype.
The thread count seen during each measurement is printed next to its numbers.

    python bench/sampling.py                                   # SmolLM2-135M-Instruct, fp32 and bf16
    python bench/sampling.py --model tiny --dtype float32      # the tiny random Llama
    python bench/sampling.py --decode-grid 8 32 --dtype bfloat16  # vLLM only: batch size x enforce_eager

`--decode-grid P ...` answers whether vLLM's decode at a small batch (online DPO's 8 prompts x 2 = 16
sequences) gets faster with more prompts per step or with vLLM's CPU torch.compile path
(`enforce_eager=false`; the sampler config's default is true, which starts in seconds): vLLM only,
each (prompts, enforce_eager) in its own engine process, tokens/s as above.

`--block-sizes B ...` answers what the KV-cache block size costs when n replies share a prompt
(prefix caching shares full blocks only; vLLM's CPU default is 128 tokens, a chat prompt here ~40):
vLLM only, each block size in its own engine process, and whether each samples the same tokens as
the first. The online demo's step: `--prompts 8 --n 8 --max-tokens 20 --dtype bfloat16 --block-sizes 128 32`.
"""

import argparse
import csv
import datetime
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from rlaif_recipes.models import decoder_from_hf_dir, hf_checkpointer, make_tiny_model
from rlaif_recipes.models.get_model import get_model
from rlaif_recipes.samplers import Sampler, TorchtuneSampler, VLLMSampler

XSTEST = Path(__file__).resolve().parent.parent / "rlaif_recipes" / "assets" / "xstest" / "xstest_prompts.csv"
TINY = dict(vocab_size=4096, dim=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_dim=768)
SMOLLM2 = "smollm2-135m-instruct"
# Sizes that keep a run to a few minutes on 2 CPU cores (the tiny row matches the recorded runs).
DEFAULTS = {"smollm2": dict(prompts=32, max_tokens=48), "tiny": dict(prompts=64, max_tokens=64)}

Prompt = List[Dict[str, str]]


def bench_model(name: str, out_dir: Path) -> Path:
    """The HF directory of `name`: SmolLM2 from the shared cache, the tiny model built once in out_dir."""
    if name == "smollm2":
        return get_model(SMOLLM2)
    model_dir = out_dir / "bench_tiny"
    if not (model_dir / "model.safetensors").exists():
        make_tiny_model(str(model_dir), **TINY)
    return model_dir


def describe_model(name: str) -> str:
    return f"{SMOLLM2} (HF dir from rlaif get-model)" if name == "smollm2" else f"tiny random Llama {TINY}"


def cpu_flags() -> str:
    """The matmul-relevant CPU features (bf16 speed depends on avx512_bf16 / AMX)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"


def load_prompts(count: int) -> List[Prompt]:
    with open(XSTEST, newline="", encoding="utf-8") as f:
        rows = [r["prompt"] for r in csv.DictReader(f)][:count]
    return [[{"role": "user", "content": p}] for p in rows]


def measure(sampler: Sampler, prompts: List[Prompt], settings: Dict[str, int]) -> Dict[str, Any]:
    """One untimed warm-up call (the same batch, few new tokens: it only has to run every code path
    once), then the median of `reps` timed calls."""
    kw = dict(n=settings["n"], temperature=1.0, max_tokens=settings["max_tokens"])
    sampler.sample(prompts, seed=1234, **{**kw, "max_tokens": min(8, settings["max_tokens"])})
    runs, samples = [], []
    for rep in range(settings["reps"]):
        start = time.perf_counter()
        out = sampler.sample(prompts, seed=rep, **kw)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for ps in out for c in ps.completions)
        runs.append((tokens / seconds, seconds, tokens))
        samples.append([c.token_ids for ps in out for c in ps.completions])
    tps, seconds, tokens = sorted(runs)[len(runs) // 2]  # the median run by tokens/s
    return dict(
        tps=tps, seconds=seconds, tokens=tokens, threads=torch.get_num_threads(), all_tps=[r[0] for r in runs], samples=samples
    )


def measure_torchtune(
    model_dir: Path, prompts: List[Prompt], dtype: str, settings: Dict[str, int], out_dir: Path
) -> Dict[str, Any]:
    model = decoder_from_hf_dir(str(model_dir))
    model.load_state_dict(hf_checkpointer(str(model_dir), output_dir=str(out_dir / "bench_ckpt_out")).load_checkpoint()["model"])
    sampler = TorchtuneSampler(
        str(model_dir), batch_size=len(prompts) * settings["n"], max_tokens=settings["max_tokens"]
    )
    sampler.bind_policy(model.to(getattr(torch, dtype)))
    return measure(sampler, prompts, settings)


def measure_vllm(
    model_dir: str, prompts: List[Prompt], dtype: str, settings: Dict[str, int], enforce_eager: bool = True, block_size: Optional[int] = None
) -> Dict[str, Any]:
    """Runs in its own spawned process (see the module docstring)."""
    sampler = VLLMSampler(model_dir, dtype=dtype, gpu_memory_utilization=0.05, max_tokens=settings["max_tokens"],
                          enforce_eager=enforce_eager, block_size=block_size)
    try:
        return measure(sampler, prompts, settings)
    finally:
        sampler.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), default="smollm2")
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, help="default: 32 for smollm2, 64 for tiny")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, help="default: 48 for smollm2, 64 for tiny")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default="outputs/bench")
    p.add_argument("--decode-grid", type=int, nargs="+", metavar="PROMPTS", help="vLLM only: these prompt counts x enforce_eager on/off")
    p.add_argument("--block-sizes", type=int, nargs="+", metavar="TOKENS", help="vLLM only: these KV-cache block sizes, side by side")
    args = p.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    settings = dict(n=args.n, max_tokens=args.max_tokens, reps=args.reps)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout keeps only the results

    out_dir = Path(args.out_dir)
    model_dir = bench_model(args.model, out_dir)
    prompts = load_prompts(args.prompts)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"platform: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"python {platform.python_version()} | torch {torch.__version__} | cpu flags: {cpu_flags()}"
    )
    print(
        f"torch threads at start: {torch.get_num_threads()}; os.cpu_count(): {os.cpu_count()}; "
        f"load average (1/5/15 min): {load_average()} (other processes skew timings)"
    )
    print(
        f"model: {describe_model(args.model)}; {len(prompts)} prompts x n={args.n}, "
        f"max_tokens={args.max_tokens}, temperature 1.0, dtypes {', '.join(args.dtype)}\n"
    )

    if args.decode_grid:
        decode_grid(str(model_dir), args.decode_grid, args.dtype[0], settings)
        return
    if args.block_sizes:
        block_grid(str(model_dir), prompts, args.block_sizes, args.dtype[0], settings)
        return
    results: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for dtype in args.dtype:
        results[("torchtune", dtype)] = measure_torchtune(model_dir, prompts, dtype, settings, out_dir)
    for dtype in args.dtype:
        results[("vllm", dtype)] = measure_vllm_apart(str(model_dir), prompts, dtype, settings)

    print("| backend | dtype | tokens/s | seconds | generated tokens | vLLM / torchtune (same dtype) | torch threads |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype in args.dtype:
        for backend in ("torchtune", "vllm"):
            r = results[(backend, dtype)]
            ratio = r["tps"] / results[("torchtune", dtype)]["tps"]
            print(
                f"| {backend} | {dtype} | {r['tps']:.0f} | {r['seconds']:.2f} | {r['tokens']} | {ratio:.2f}x | "
                f"{r['threads']} |"
            )
    print(
        "\nall reps (tokens/s): "
        + "; ".join(f"{b} {d}: {', '.join(f'{x:.0f}' for x in r['all_tps'])}" for (b, d), r in results.items())
    )
    print(f"load average at the end: {load_average()}")


def measure_vllm_apart(*args: Any) -> Dict[str, Any]:
    """`measure_vllm(*args)` in a fresh spawned process: one engine per process (see the module docstring)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_vllm, *args).result()


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def decode_grid(model_dir: str, prompt_counts: List[int], dtype: str, settings: Dict[str, int]) -> None:
    print("| prompts | sequences | enforce_eager | tokens/s | seconds | generated tokens | engine start + warm-up s | load |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    for count in prompt_counts:
        for eager in (True, False):
            start = time.perf_counter()
            r = measure_vllm_apart(model_dir, load_prompts(count), dtype, settings, eager)
            total = time.perf_counter() - start
            print(f"| {count} | {count * settings['n']} | {eager} | {r['tps']:.0f} | {r['seconds']:.2f} | {r['tokens']} | "
                  f"{total - sum(r['tokens'] / x for x in r['all_tps']):.0f} | {load_average()} |", flush=True)


def block_grid(model_dir: str, prompts: List[Prompt], block_sizes: List[int], dtype: str, settings: Dict[str, int]) -> None:
    print("| block size | tokens/s | seconds per call | generated tokens | all reps (s) | same samples as the first row | load |")
    print("|---:|---:|---:|---:|---|---|---|")
    first = None
    for size in block_sizes:
        r = measure_vllm_apart(model_dir, prompts, dtype, settings, True, size)
        first = first or r["samples"]
        reps = ", ".join(f"{r['tokens'] / x:.2f}" for x in r["all_tps"])
        print(f"| {size} | {r['tps']:.0f} | {r['seconds']:.2f} | {r['tokens']} | {reps} | {r['samples'] == first} | {load_average()} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
