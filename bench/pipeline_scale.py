"""judge_pairs at scale: pairs/s and peak RSS over 10,000 and 100,000 pairs, rule judge vs API judge.

Why: a real run judges hundreds of thousands of pairs. The recipe streams one input shard at a time,
so its memory must not grow with the dataset: peak RSS at 100k pairs should stay within 20% of
peak RSS at 10k. The API judge's throughput is what its client-side concurrency gets out of an
endpoint with a fixed latency.

The input is generate_pairs-shaped Parquet shards written here directly (no model runs): two
responses per prompt, one of which contains the marker the loopback server prefers. The API judge
(`judge=openai`) talks real HTTP to tests/servers.py's FaultServer on 127.0.0.1 (no faults, fixed
latency) running in this process; each configuration runs the recipe in its own subprocess, so
its peak RSS (`wait4` rusage) is its own. pairs/s counts the recipe's judging loop (reading shards,
judging, writing shards; `seconds` in its summary.json), not interpreter start-up.

    python bench/pipeline_scale.py --sizes 10000 100000 --latency-ms 10 --concurrency 64 --order fixed
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import FaultServer  # noqa: E402

WORDS = "the a process kill python how can I stop run answer question help safe you will use this command".split()


def synthesize(out: Path, pairs: int, prompts_per_shard: int, seed: int = 0) -> Path:
    """generate_pairs output with `pairs` prompts x 2 responses (~60 words each), written shard by shard."""
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()) == {"pairs": pairs, "prompts_per_shard": prompts_per_shard}:
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    rng = random.Random(seed)
    for s, first in enumerate(range(0, pairs, prompts_per_shard)):
        ids = range(first, min(first + prompts_per_shard, pairs))
        prompts = [f"Question {i}: " + " ".join(rng.choices(WORDS, k=12)) + "?" for i in ids]
        responses = [[" ".join(rng.choices(WORDS, k=60)) for _ in range(2)] for _ in ids]
        for r in responses:
            r[rng.randrange(2)] += " WINNER"
        table = pa.table({
            "prompt_id": [str(i) for i in ids],
            "prompt": prompts,
            "messages": [[{"role": "user", "content": p}] for p in prompts],
            "prompt_token_ids": [[rng.randrange(32000) for _ in range(16)] for _ in ids],
            "responses": responses,
            "response_token_ids": [[[rng.randrange(32000) for _ in range(64)] for _ in range(2)] for _ in ids],
            "finish_reasons": [["stop", "length"] for _ in ids],
            "sampling": ['{"n": 2}'] * len(ids),
            "policy": ["synthetic"] * len(ids),
        })  # fmt: skip
        pq.write_table(table, out / "data" / f"shard-{s:05d}.parquet")
    done.write_text(json.dumps({"pairs": pairs, "prompts_per_shard": prompts_per_shard}))
    return out


def run(name: str, overrides: List[str], input_dir: Path, out: Path) -> Dict[str, float]:
    """One judge_pairs run in a fresh subprocess (and a fresh output dir: no cache hits)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "rlaif_recipes.recipes.judge_pairs", "--config", "judge_pairs",
           f"input_dir={input_dir}", f"output_dir={out}", *overrides]  # fmt: skip
    log = open(out.parent / f"{out.name}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log.name}")
    summary = json.loads((out / "summary.json").read_text())
    pairs = summary["preferences"] + summary["ties"] + summary["abstains"]
    return dict(pairs=pairs, seconds=summary["seconds"], pairs_per_s=pairs / summary["seconds"], wall=wall,
                peak_rss_mb=usage.ru_maxrss / 1024, requests=summary["judge_metrics"].get("requests", 0),
                preferences=summary["preferences"], abstains=summary["abstains"])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--prompts-per-shard", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=10.0, help="fixed latency of each API response")
    p.add_argument("--concurrency", type=int, default=64, help="judge.max_concurrency of the API judge")
    p.add_argument("--order", default="fixed", help="judge.order of the API judge: fixed = 1 request per pair, both = 2")
    p.add_argument("--judges", nargs="+", default=["rule", "openai"], choices=["rule", "openai"])
    p.add_argument("--out-dir", default="outputs/bench/pipeline_scale")
    args = p.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average before: {os.getloadavg()}", flush=True)  # fmt: skip
    inputs = {n: synthesize(out / f"input-{n}", n, args.prompts_per_shard) for n in args.sizes}
    results = []
    with FaultServer(marker="WINNER", latency_s=args.latency_ms / 1000) as server:
        judges = {
            "rule": ["judge=rule", "judge.rule=rlaif_recipes.judges.rules.shorter"],
            "openai": ["judge=openai", f"judge.base_url={server.url}/v1", "judge.api_key_env=null", "judge.structured=none",
                       f"judge.max_concurrency={args.concurrency}", f"judge.order={args.order}", "batch_size=1024"],
        }  # fmt: skip
        for judge in args.judges:
            for n in args.sizes:
                server.log.clear()  # the server's request log lives in this process, not the measured one
                r = run(f"{judge}-{n}", judges[judge], inputs[n], out / f"{judge}-{n}")
                r.update(judge=judge, size=n, load=os.getloadavg()[0])
                results.append(r)
                print(f"{judge:>6} {n:>7} pairs: {r['pairs_per_s']:8.0f} pairs/s, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(load {r['load']:.2f})", flush=True)  # fmt: skip
    print("\n| judge | pairs | pairs/s | judging s | wall s | API requests | peak RSS MB | RSS vs smallest | load avg (1 min, after) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next(b for b in results if b["judge"] == r["judge"])["peak_rss_mb"]
        print(f"| {r['judge']} | {r['pairs']} | {r['pairs_per_s']:.0f} | {r['seconds']:.1f} | {r['wall']:.1f} | {r['requests']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.2f}x | {r['load']:.2f} |")  # fmt: skip
    flat = all(r["peak_rss_mb"] <= 1.2 * next(b for b in results if b["judge"] == r["judge"])["peak_rss_mb"] for r in results)
    print(f"\npeak RSS flat within 20% from {args.sizes[0]} to {args.sizes[-1]} pairs: {'yes' if flat else 'NO'}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
