"""Offline DPO throughput: our `dpo` recipe vs torchtune's built-in `full_dpo_distributed`.

    python bench/dpo_throughput.py                       # CPU: tiny model, 2 ranks (gloo), fp32
    python bench/dpo_throughput.py --size smollm2 --dtype bf16 --compile both --batch-size 4 --steps 8 --warmup 3
                                                         # CPU: SmolLM2-135M-Instruct, compile off and on, both recipes
                                                         # (add --clock cpu on a shared machine)
    python bench/dpo_throughput.py --size 1b --device cuda --dtype bf16 --nproc 1 --batch-size 8 --max-seq-len 512
                                                         # GPU (what bench/gpu_check.sh runs)

Like for like: the same HF model directory, the same token ids (our `tokenize_preferences` output
is handed to torchtune's recipe as its dataset, laid out so that each rank trains on the same pairs
at every step in both recipes: the same batches, so the same padded token counts), world size, batch size, sequence cap, optimizer,
steps, gradient clipping and `compile` (torchtune's own option on both sides; our time spent compiling is
logged apart as `compile_seconds` and left out of our tokens/s, torchtune's falls in its warm-up steps). Both recipes log `tokens_per_second_per_gpu` the same way (padded
input tokens of chosen + rejected rows as torchtune lays them out, summed over ranks, per second per
rank: ours counts them so also when it packs each pair into one row, `pack_pairs`, so the ratio is the
ratio of pairs per second; `--pack both` runs ours packed and unpacked); the table shows
the median over the steps after `--warmup` steps (of all `--rounds`). `--clock cpu` makes both
recipes' step timers read each rank's CPU time instead of wall time, for a machine that other jobs
share (their load then slows neither figure; a rank's wait on the other is left out). Peak memory: CUDA max allocated (GPU), or rank
0's peak RSS (CPU, mostly library overhead at tiny sizes). MFU (GPU) counts 6N FLOPs per token
for the policy's forward + backward plus 2N for a reference forward when one runs (N: weights
except the embedding table), against `--peak-tflops`.

Each recipe runs under torchrun through this file's `_worker` entry point. torchtune's recipe
needs shims to run where its authors did not aim it: gloo instead of NCCL, and no CUDA memory
stats or cache emptying, on CPU; and its "must be distributed" check lifted for a single GPU (torchrun, 1 process).
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SIZES = {  # make_tiny_model arguments
    "tiny": {},
    "1b": dict(dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_dim=8192, max_seq_len=2048),
    "smollm2": None,  # SmolLM2-135M-Instruct from the shared cache (`rlaif get-model`), real weights
}
SEED = 0  # our recipe's data order; torchtune's recipe reads the rows in that order


# ---- components torchtune's recipe instantiates (dotted paths into this file) ----------------


def pad_tokenizer(pad_id: int = 0) -> SimpleNamespace:
    """torchtune's DPO recipe only reads `tokenizer.pad_id` (the data is already tokenised)."""
    return SimpleNamespace(pad_id=pad_id)


def pretokenized_pairs(tokenizer: Any, path: str) -> List[Dict[str, List[int]]]:
    """Our token ids in torchtune's DPO sample layout (labels: -100 on the prompt), in the order
    `in_our_order` wrote them."""
    out = []
    for row in json.loads(Path(path).read_text()):
        p = row["prompt_ids"]
        sample = {}
        for side in ("chosen", "rejected"):
            sample[f"{side}_input_ids"] = p + row[f"{side}_ids"]
            sample[f"{side}_labels"] = [-100] * len(p) + row[f"{side}_ids"]
        out.append(sample)
    return out


def in_our_order(rows: List[Any], seed: int, steps: int, batch_size: int, world_size: int) -> List[Any]:
    """`rows` laid out so that torchtune's unshuffled `DistributedSampler` (rank r reads rows r,
    r + W, r + 2W, ...) hands each rank, step by step, the pairs our `dpo` recipe's permutation
    gives it (rank r of step k: `order[k*G + r*b : k*G + (r+1)*b]`, G = b*W): both recipes then
    train on the same batches, so the same padded tokens, and their rates compare like for like."""
    import torch

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
    out: List[Any] = [None] * (steps * batch_size * world_size)
    for k in range(steps):
        for r in range(world_size):
            for j in range(batch_size):
                out[(k * batch_size + j) * world_size + r] = rows[order[(k * world_size + r) * batch_size + j]]
    return out


# ---- worker: one rank of one recipe (started by torchrun) ------------------------------------


def worker(recipe: str, result: str, args: List[str]) -> None:
    import torch
    import torch.distributed as dist

    clock = SimpleNamespace(**vars(time))  # what the recipes' `time.perf_counter()` step timers read
    if os.environ.get("DPO_BENCH_CLOCK") == "cpu":
        clock.perf_counter = time.process_time

    if recipe == "torchtune":
        import importlib.util

        from torchtune import training

        # torchtune's recipes/ refuses imports as a package; load the file as `tune run` does
        recipes_dir = Path(importlib.util.find_spec("recipes").submodule_search_locations[0])
        spec = importlib.util.spec_from_file_location("full_dpo_distributed", recipes_dir / "full_dpo_distributed.py")
        tt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tt)

        def init_process_group(backend: str = "") -> None:
            dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")

        tt.init_process_group = init_process_group
        tt.time = clock
        if not torch.cuda.is_available():  # it logs CUDA memory stats and empties the CUDA cache unconditionally
            training.get_memory_stats = lambda device: {}
            training.log_memory_stats = lambda stats, message="": None
            training.cleanup_before_training = lambda: None
        training.is_distributed = lambda: True  # torchrun with one process is fine for FSDP2
        sys.argv = ["full_dpo_distributed", *args]
        main_fn = tt.recipe_main
    else:
        from rlaif_recipes import policy
        from rlaif_recipes.recipes import dpo

        dpo.time = policy.time = clock  # the step timer and the compile clock it subtracts
        main_fn = dpo.recipe_main

        sys.argv = ["dpo", *args]
    try:
        main_fn()
    except SystemExit as e:  # torchtune's config.parse exits with the recipe's return value
        if e.code not in (None, 0):
            raise
    if int(os.environ.get("RANK", "0")) == 0:
        peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
        if torch.cuda.is_available():
            peak["peak_cuda_alloc_gb"] = torch.cuda.max_memory_allocated() / 1e9
        Path(result).write_text(json.dumps(peak))


# ---- driver ----------------------------------------------------------------------------------


def prepare(out: Path, size: str, max_seq_len: int) -> tuple:
    from rlaif_recipes.data import preference_dataset, tokenize_preferences
    from rlaif_recipes.models import make_tiny_model

    model_dir = out / f"model-{size}"
    if size == "smollm2":
        from rlaif_recipes.models.get_model import get_model

        model_dir = get_model("smollm2-135m-instruct")
    elif not (model_dir / "config.json").is_file():
        make_tiny_model(str(model_dir), seed=0, **SIZES[size])
    pairs = preference_dataset("xstest", split="train")
    text = out / "pairs.jsonl"
    text.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in pairs))
    ids = tokenize_preferences(preference_dataset(str(text)), str(model_dir), max_seq_len)
    return model_dir, text, [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in ids]


def torchtune_config(path: Path, run: Path, model_dir: Path, ids: Path, a: argparse.Namespace, compile_: bool) -> None:
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(model_dir),
        "checkpoint_files": ["model.safetensors"],
        "recipe_checkpoint": None,
        "output_dir": str(run / "checkpoints"),
        "model_type": "LLAMA3",
    }
    cfg = {
        "output_dir": str(run),
        "model": {"_component_": "rlaif_recipes.models.decoder_from_hf_dir", "checkpoint_dir": str(model_dir)},
        "tokenizer": {"_component_": "dpo_throughput.pad_tokenizer"},
        "checkpointer": checkpointer,
        "ref_checkpointer": checkpointer,
        "resume_from_checkpoint": False,
        "dataset": {"_component_": "dpo_throughput.pretokenized_pairs", "path": str(ids)},
        "seed": SEED,
        "shuffle": False,  # the rows are already in our recipe's order (`in_our_order`)
        "batch_size": a.batch_size,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-5, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 2},
        "loss": {"_component_": "torchtune.rlhf.loss.DPOLoss", "beta": 0.1, "label_smoothing": 0.0},
        "epochs": 1,
        "max_steps_per_epoch": a.steps,
        "gradient_accumulation_steps": 1,
        "clip_grad_norm": 1.0,
        "compile": compile_,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(run / "logs")},
        "log_every_n_steps": 1,
        "log_peak_memory_stats": a.device == "cuda",
        "device": a.device,
        "dtype": a.dtype,
        "enable_activation_checkpointing": a.activation_checkpointing,
        "enable_activation_offloading": False,
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML


def our_overrides(run: Path, model_dir: Path, text: Path, a: argparse.Namespace, reference: str, compile_: bool, pack: bool) -> List[str]:
    return [
        "--config", "dpo", f"seed={SEED}", f"checkpoint_dir={model_dir}", f"output_dir={run}", f"dataset.source={text}",
        "dataset.split=all", "eval_dataset=null", f"max_seq_len={a.max_seq_len}", f"batch_size={a.batch_size}",
        f"max_steps={a.steps}", f"device={a.device}", f"dtype={a.dtype}", "optimizer.lr=1e-5",
        "lr_scheduler.num_warmup_steps=2", "clip_grad_norm=1.0", f"reference={reference}",
        f"enable_activation_checkpointing={str(a.activation_checkpointing).lower()}", f"compile={str(compile_).lower()}",
        f"pack_pairs={str(pack).lower()}",
    ]


def launch(recipe: str, run: Path, args: List[str], a: argparse.Namespace) -> Dict[str, float]:
    result = run / "peak.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_port", str(a.port),
           str(Path(__file__).resolve()), "_worker", recipe, str(result), *args]
    env = {**os.environ, "DPO_BENCH_CLOCK": a.clock, "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{recipe} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    steps = []
    for f in sorted((run / "logs").glob("log_*.txt")):
        for line in f.read_text().splitlines():
            if "tokens_per_second_per_gpu:" in line:
                kv = dict(item.split(":", 1) for item in line.split("|", 1)[1].split())
                steps.append({k: float(v) for k, v in kv.items()})
    measured = [s["tokens_per_second_per_gpu"] for s in steps[a.warmup :]]
    compiled = sum(s.get("compile_seconds", 0.0) for s in steps)
    if not measured:
        sys.exit(f"{recipe}: no step metrics after {a.warmup} warm-up steps in {run / 'logs'}; raise --steps")
    peak = json.loads(result.read_text())
    return {"step_tokens_per_s": measured, "peak_gb": peak.get("peak_cuda_alloc_gb", peak["peak_rss_gb"]),
            "wall_s": time.perf_counter() - start, "compile_s": compiled}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flops_per_token(model_dir: Path) -> float:
    """2N for one forward pass, N = every weight except the embedding table."""
    c = json.loads((model_dir / "config.json").read_text())
    d, hd, layers = c["hidden_size"], c["head_dim"], c["num_hidden_layers"]
    q, kv, ff = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    n = layers * (d * q + 2 * d * kv + q * d + 3 * d * ff) + d * c["vocab_size"]
    return 2.0 * n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "dpo"), help="scratch dir (model, data, runs)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (random init, HF format)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--nproc", type=int, default=2, help="world size (torchtune's recipe needs >= 2 on CPU)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per rank per step")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    p.add_argument("--rounds", type=int, default=1, help="run the three recipes this many times, interleaved")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile in both recipes (both: each run twice)")
    p.add_argument("--pack", choices=["on", "off", "both"], default="on",
                   help="our pack_pairs (each pair's prompt run once; off: torchtune's chosen-over-rejected rows; both: our runs twice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what both recipes' step timers read: wall time, or each rank's CPU time (on a shared machine: "
                        "another process's load then slows neither recipe's figure; time a rank waits on the other is left out)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--port", type=int, default=0, help="torchrun master port (0: a free one)")
    a = p.parse_args()
    a.port = a.port or _free_port()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, text, rows = prepare(out, a.size, a.max_seq_len)
    if len(rows) < a.steps * a.batch_size * a.nproc:
        sys.exit(f"{len(rows)} pairs < steps x batch x ranks = {a.steps * a.batch_size * a.nproc}; lower --steps or --batch-size")
    ids = out / f"pairs-ids-{a.max_seq_len}-ordered.json"
    ids.write_text(json.dumps(in_our_order(rows, SEED, a.steps, a.batch_size, a.nproc)))
    load_before = os.getloadavg()
    compiles = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    packs = {"on": [True], "off": [False], "both": [True, False]}[a.pack]
    ours = [(f"{name}{'' if pack else ', unpacked pairs'}", "ours", reference, pack) for pack in packs
            for name, reference in (("ours, reference copy", "model"), ("ours, precomputed reference", "precomputed"))]
    runs = [(f"{name}{', compile' if c else ''}", recipe, reference, c, pack) for c in compiles
            for name, recipe, reference, pack in (("torchtune full_dpo_distributed", "torchtune", "model", False), *ours)]
    results: Dict[str, Dict[str, Any]] = {name: {"reference": ref, "step_tokens_per_s": [], "peak_gb": 0.0, "compile_s": []}
                                          for name, _, ref, _, _ in runs}
    for round_ in range(a.rounds):  # rounds interleave the recipes, so a burst of load hits all of them
        for name, recipe, reference, compile_, pack in runs:
            run = out / "runs" / f"{recipe}-{reference}-{'compile-' if compile_ else ''}{'' if pack else 'unpacked-'}{int(time.time())}"
            run.mkdir(parents=True)
            if recipe == "torchtune":
                torchtune_config(run / "config.yaml", run, model_dir, ids, a, compile_)
                args = ["--config", str(run / "config.yaml")]
            else:
                args = our_overrides(run, model_dir, text, a, reference, compile_, pack)
            r = launch(recipe, run, args, a)
            results[name]["step_tokens_per_s"] += r["step_tokens_per_s"]
            results[name]["peak_gb"] = max(results[name]["peak_gb"], r["peak_gb"])
            results[name]["compile_s"].append(r["compile_s"])
            print(f"  round {round_ + 1}, {name}: {statistics.median(r['step_tokens_per_s']):.0f} tokens/s/rank", file=sys.stderr)
    load_after = os.getloadavg()
    for r in results.values():
        r["tokens_per_s"] = statistics.median(r["step_tokens_per_s"])

    base = results[runs[0][0]]["tokens_per_s"]  # torchtune, first compile setting run
    fpt = flops_per_token(model_dir)
    print(f"\nOffline DPO throughput: {a.size} model ({fpt / 2 / 1e6:.1f}M non-embedding params), {a.device} {a.dtype}, "
          f"{a.nproc} rank(s), batch {a.batch_size} pairs/rank, max_seq_len {a.max_seq_len}, {a.steps} steps "
          f"x {a.rounds} round(s) (median of steps {a.warmup + 1}-{a.steps}), {a.clock} clock; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    mem = "peak CUDA alloc GB" if a.device == "cuda" else "peak RSS GB (rank 0)"
    print(f"| run | tokens/s/rank | vs torchtune | vs torchtune, same compile | {mem} | MFU | compile s (ours, apart) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        flops = fpt * (3 if r["reference"] == "precomputed" else 4)  # 6N train (+ 2N reference forward)
        mfu = f"{100 * r['tokens_per_s'] * flops / (a.peak_tflops * 1e12):.1f}%" if a.device == "cuda" else "n/a"
        same = results["torchtune full_dpo_distributed" + (", compile" if name.endswith(", compile") else "")]["tokens_per_s"]
        compiled = f"{statistics.fmean(r['compile_s']):.0f}" if name.startswith("ours") and name.endswith(", compile") else "-"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {r['tokens_per_s'] / same:.2f}x | "
              f"{r['peak_gb']:.2f} | {mfu} | {compiled} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "load": [load_before, load_after], "results": results}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
