"""API-judge throughput: OpenAIJudge (asyncio, bounded concurrency) vs a thread-pool judge.

Why: an API judge's time is almost all waiting on the network, so pairs per second should scale
with requests in flight up to concurrency / latency. The comparison is the design other libraries
shipped (TRL's old OpenAIPairwiseJudge): a `concurrent.futures.ThreadPoolExecutor()` with the
default pool size (min(32, CPUs + 4)) calling the blocking `openai.OpenAI` client once per pair.

Both talk to the loopback judge server from tests/servers.py (real HTTP, OpenAI chat-completions
shape), run in its own process with a fixed latency per request and no faults. order=fixed, so
one request is one pair. Targets: >= 90% of the bound at 64 in flight, >= 10x the thread pool.

    python bench/judge_throughput.py --latency 0.2 --max-concurrency 128
"""

import argparse
import concurrent.futures
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import openai

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from servers import free_port  # noqa: E402

from rlaif_recipes.judges import OpenAIJudge, Pair, Rubric  # noqa: E402

RUBRIC = dict(
    name="false_refusal", version=1, criteria="Prefer the response that answers the benign request."
)
KEY_ENV = "RLAIF_BENCH_KEY"


def pairs(n: int, tag: str) -> List[Pair]:
    return [Pair(f"{tag} question {i}?", f"Answer {i} WINNER.", f"No {i}.") for i in range(n)]


def run_async_judge(url: str, concurrency: int, n: int) -> Tuple[float, float, int]:
    judge = OpenAIJudge(
        base_url=url,
        model="judge",
        api_key_env=KEY_ENV,
        rubric=RUBRIC,
        order="fixed",
        structured="choice",
        max_concurrency=concurrency,
        probe=False,
        timeout_s=30.0,
    )
    batch = pairs(n, f"async-{concurrency}")
    start, cpu = time.perf_counter(), time.process_time()
    out = judge.judge(batch)
    return time.perf_counter() - start, time.process_time() - cpu, sum(j.labelled for j in out)


def run_thread_pool_judge(url: str, n: int) -> Tuple[float, float, int, int]:
    """TRL's OpenAIPairwiseJudge pattern: default-size thread pool, blocking client, one call per pair."""
    client = openai.OpenAI(base_url=url, api_key=os.environ[KEY_ENV])
    rubric = Rubric.from_config(RUBRIC)

    def get_rank(pair: Pair) -> int:
        completion = client.chat.completions.create(
            model="judge",
            messages=rubric.messages(pair.prompt, pair.response_a, pair.response_b),
            max_tokens=1,
        )
        return {"A": 0, "B": 1}.get(completion.choices[0].message.content.strip(), -1)

    batch = pairs(n, "threads")
    start, cpu = time.perf_counter(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor() as executor:
        workers = executor._max_workers
        ranks = list(executor.map(get_rank, batch))
    return time.perf_counter() - start, time.process_time() - cpu, sum(r == 0 for r in ranks), workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.2, help="server-side seconds per request")
    p.add_argument("--max-concurrency", type=int, default=128)
    p.add_argument("--waves", type=int, default=8, help="pairs per row = waves x concurrency (at least 16)")
    args = p.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(TESTS / "servers.py"), "--port", str(port), "--latency", str(args.latency)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            openai.OpenAI(base_url=url, api_key="x", max_retries=0).models.list(timeout=1)
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    load_before = os.getloadavg()
    run_async_judge(url, 4, 8)  # warm-up: imports, first connections
    rows = []
    concurrency = 1
    while concurrency <= args.max_concurrency:
        n = max(16, args.waves * concurrency)
        seconds, cpu, labelled = run_async_judge(url, concurrency, n)
        rows.append(
            (f"OpenAIJudge (asyncio), max_concurrency={concurrency}", concurrency, n, labelled, seconds, cpu)
        )
        concurrency *= 2
    n = max(16, args.waves * 8)
    seconds, cpu, labelled, workers = run_thread_pool_judge(url, n)
    rows.append((f"thread pool (TRL-style), default {workers} workers", workers, n, labelled, seconds, cpu))
    load_after = os.getloadavg()
    server.terminate()
    server.wait(timeout=30)

    pool_rate = rows[-1][2] / rows[-1][4]  # pairs / seconds
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, openai {openai.__version__}"
    )
    print(
        f"server latency: {args.latency * 1000:.0f} ms/request; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print()
    print(
        "| judge | in flight | pairs | labelled | seconds | pairs/s | bound (in flight / latency) | % of bound "
        "| vs thread pool | client CPU ms/pair |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, inflight, n, labelled, seconds, cpu in rows:
        rate, bound = n / seconds, inflight / args.latency
        print(
            f"| {name} | {inflight} | {n} | {labelled} | {seconds:.2f} | {rate:.1f} | {bound:.0f} "
            f"| {100 * rate / bound:.0f}% | {rate / pool_rate:.1f}x | {1000 * cpu / n:.2f} |"
        )


if __name__ == "__main__":
    main()
