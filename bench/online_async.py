"""online_dpo throughput with a slow judge: async_steps 0 vs 1, beside a zero-latency rule judge.

The API judge is `judge=openai` against the loopback server from tests/servers.py (real HTTP, in
its own process): a fixed 200 ms per request, and a heavy tail (300 ms, 1% of requests 5 s), once
as it is and once with `judge.hedge_after_s=0.6` (a slow request gets a copy, first answer wins). Each
row is one `online_dpo` run in its own process; pairs/s is counted from the recipe's own
metrics.jsonl, from the end of the first step (engine warm-up) to the end of the last.

    python bench/online_async.py                     # the tiny model (built here)
    python bench/online_async.py --model smollm2-135m-instruct --steps 8 --max-model-len 1024 \
        --set dtype=bf16 sampler.dtype=bfloat16
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from servers import free_port  # noqa: E402

KEY_ENV = "RLAIF_BENCH_KEY"
HEAVY_TAIL = ["--latency", "0.3", "--slow-rate", "0.01", "--slow-s", "5"]
# (row name, server arguments, extra judge settings): the heavy tail once as it is, once with
# hedged requests (a request unanswered after 0.6 s, twice the median, gets a copy; first answer wins)
LATENCIES = [("200 ms", ["--latency", "0.2"], []), ("heavy tail", HEAVY_TAIL, []),
             ("heavy tail, hedge_after_s=0.6", HEAVY_TAIL, ["judge.hedge_after_s=0.6"])]


def start_server(args: List[str]) -> Tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "servers.py"), "--port", str(port), *args], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the loopback judge server did not start") from None
            time.sleep(0.2)
    return server, f"http://127.0.0.1:{port}/v1"


def run(model_dir: Path, out: Path, a: argparse.Namespace, async_steps: int, judge: List[str]) -> Dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "rlaif"), "run", "online_dpo", f"checkpoint_dir={model_dir}", f"output_dir={out}",
           f"max_steps={a.steps}", f"prompts_per_step={a.prompts}", "n=2", f"sampler.max_tokens={a.max_tokens}",
           f"sampler.kv_cache_memory_bytes={1 << 30}", f"sampler.max_model_len={a.max_model_len}", f"async_steps={async_steps}",
           "save_every_n_steps=null", "lr_scheduler=null", *a.set, *judge]  # fmt: skip
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        if subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT) != 0:
            raise RuntimeError(f"online_dpo failed; see {log}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = steps[1:]
    seconds = timed[-1]["time"] - steps[0]["time"]
    return {
        "pairs_per_s": sum(m["pairs/trained"] for m in timed) / seconds,
        "steps_per_s": len(timed) / seconds,
        "judge_wait_s": sum(m["time/judge"] for m in timed) / len(timed),
        "train_s": sum(m["time/train"] for m in timed) / len(timed),
        "sample_s": sum(m["time/sample"] for m in timed) / len(timed),
        "staleness": timed[-1]["staleness"],
        "requests": sum(m["judge/requests"] + m.get("judge/hedged", 0) for m in steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (built here) or a get_model name, e.g. smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=30, help="a 1-in-100 slow request needs a few hundred requests to show")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-model-len", type=int, default=512, help="sampler context (SmolLM2 needs it set: 1024)")
    p.add_argument("--set", nargs="*", default=[], help="more online_dpo overrides for every run, e.g. dtype=bf16")
    p.add_argument("--async-steps", default="0,1", help="async_steps values to run, comma-separated")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "online_async"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.model == "tiny":
        from rlaif_recipes.models import make_tiny_model

        model_dir = out / "tiny-model"
        if not (model_dir / "config.json").is_file():
            make_tiny_model(str(model_dir), seed=0)
    else:
        from rlaif_recipes.models.get_model import get_model

        model_dir = get_model(a.model)
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    loads = [os.getloadavg()[0]]
    rows: List[Dict[str, object]] = []
    rule = ["judge=rule", "judge.rule=rlaif_recipes.judges.rules.shorter"]
    settings = [int(k) for k in a.async_steps.split(",")]
    for async_steps in settings:
        rows.append({"judge": "rule (no latency)", "async_steps": async_steps, **run(model_dir, out / f"rule-{async_steps}", a, async_steps, rule)})
    for name, server_args, extra in LATENCIES:
        server, url = start_server(server_args)
        try:  # the server prefers response A (neither holds its marker): order=fixed, so every pair is labelled
            api = ["judge=openai", f"judge.base_url={url}", f"judge.api_key_env={KEY_ENV}", "judge.structured=none",
                   "judge.logprobs=false", "judge.order=fixed", *extra]
            for async_steps in settings:
                tag = name.replace(" ", "_").replace(",", "").replace("=", "").replace(".", "_")
                rows.append({"judge": f"openai, {name}", "async_steps": async_steps, **run(model_dir, out / f"{tag}-{async_steps}", a, async_steps, api)})
        finally:
            server.terminate()
        loads.append(os.getloadavg()[0])
    rule_rate: Dict[int, Optional[float]] = {r["async_steps"]: r["pairs_per_s"] for r in rows if r["judge"].startswith("rule")}
    print(f"# online_async ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, load {', '.join(f'{x:.1f}' for x in loads)})")
    print(f"model {a.model}; {a.steps} steps of {a.prompts} prompts x 2, {a.max_tokens} new tokens; vLLM CPU sampler; "
          "API judge: order=fixed (1 request per pair), max_concurrency 16; overrides: " + (" ".join(a.set) or "none"))
    print("| judge | async_steps | pairs/s | share of the rule judge's rate (async 0) | judge wait s/step | sample s/step | train s/step | staleness | requests (hedges included) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = r["pairs_per_s"] / rule_rate[0] if rule_rate.get(0) else float("nan")
        print(f"| {r['judge']} | {r['async_steps']} | {r['pairs_per_s']:.2f} | {share:.0%} | {r['judge_wait_s']:.3f} | "
              f"{r['sample_s']:.3f} | {r['train_s']:.3f} | {r['staleness']} | {r['requests']} |")


if __name__ == "__main__":
    main()
