"""One online-DPO train phase on SmolLM2-135M-Instruct, measured apart from sampling: where its time
goes and what `compile` and the fused AdamW change.

Why: the online step is 1/3 sampling and 2/3 training (bench/RESULTS.md), so the train phase bounds
the speedup over TRL. This runs the phase the recipe runs (policy forward + backward on chosen and
rejected rows in one batch, reference forward on a frozen copy, DPO loss, AdamW step; bf16) on the
real pairs of a step that `bench/online_dpo.py` trained (its step-00002.parquet), in one process:

- eager with the per-parameter AdamW loop, eager with the fused AdamW, each on torchtune's
  chosen-over-rejected rows (`pack_pairs=false`), then eager and compiled (`compile=true`: layers
  and loss) on packed pairs (the configs now: each pair's prompt runs once); compile time is
  reported apart, the timed reps come after a warm-up rep;
- on packed pairs, the log-softmax as autograd computes it on fp32 logits (before) beside
  `logprobs.token_logprobs` (chunked, the recipes' now);
- each layout's positions, real tokens and padding share, and torch.profiler's top operators of
  one eager step;
- GFLOP/s of the phase (8 x matmul params per token: 6 policy + 2 reference; the head only on
  response tokens) against the best square bf16 matmul and against the phase's own matmul shapes
  (`online_dpo.shape_peak`), both measured in this process.

    python bench/train_step.py outputs/bench/bench_online_ours/steps/step-00002.parquet --reps 2
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

import pyarrow.parquet as pq
import torch
from torch.profiler import ProfilerActivity, profile
from torchtune import training
from torchtune.rlhf.loss import DPOLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_dpo import flops, matmul_params, peak_flops, shape_peak  # noqa: E402

from rlaif_recipes import logprobs  # noqa: E402
from rlaif_recipes.logprobs import collate_pairs, encode_pair, pair_logprobs  # noqa: E402
from rlaif_recipes.models import decoder_from_hf_dir, hf_checkpointer  # noqa: E402
from rlaif_recipes.models.get_model import get_model  # noqa: E402
from rlaif_recipes.models.hf_model import hf_config  # noqa: E402
from rlaif_recipes.policy import compile_seconds, compile_training  # noqa: E402


def train_phase(model, ref, loss_fn, opt, batch) -> Dict[str, float]:
    """The recipe's train phase on one batch, each part timed."""
    t, start = {}, time.perf_counter()
    policy = pair_logprobs(model, batch)
    t["policy forward"], start = time.perf_counter() - start, time.perf_counter()
    with torch.no_grad():
        reference = pair_logprobs(ref, batch)
    t["reference forward"], start = time.perf_counter() - start, time.perf_counter()
    losses, _, _ = loss_fn(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    losses.mean().backward()
    t["backward"], start = time.perf_counter() - start, time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t["AdamW"] = time.perf_counter() - start
    return t


def autograd_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-softmax as it was before `logprobs.token_logprobs`: autograd on fp32 logits."""
    fp32 = logits.float()
    return fp32.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(fp32, dim=-1)


@contextlib.contextmanager
def log_softmax_by_autograd(on: bool):
    chunked = logprobs.token_logprobs
    logprobs.token_logprobs = autograd_token_logprobs if on else chunked
    try:
        yield
    finally:
        logprobs.token_logprobs = chunked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step_file", help="a step-XXXXX.parquet of an online_dpo run on SmolLM2")
    p.add_argument("--reps", type=int, default=2, help="timed reps per setting, after one warm-up")
    p.add_argument("--skip-compile", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    model_dir = get_model("smollm2-135m-instruct")
    weights = hf_checkpointer(str(model_dir), output_dir="/tmp/train_step_unused").load_checkpoint()["model"]
    rows = [r for r in pq.read_table(a.step_file).to_pylist() if r["chosen"] is not None]
    pairs = [encode_pair(r["prompt_token_ids"], r["response_token_ids"][r["chosen"]], r["response_token_ids"][r["rejected"]]) for r in rows]
    response = sum(len(q.chosen) + len(q.rejected) for q in pairs)
    params = matmul_params(model_dir)
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    context = hf_config(str(model_dir))["max_position_embeddings"]
    layouts = {}  # packed or not -> (batch, GFLOP of a phase)
    for packed in (False, True):
        batch = collate_pairs(pairs, pad_id=0, pack_within=context if packed else None)
        real = sum((len(q.prompt) + 1 if packed else 2 * len(q.prompt)) + len(q.chosen) + len(q.rejected) for q in pairs)
        layouts[packed] = batch, flops(params, real, response, 8)
        print(f"{len(pairs)} pairs, {'packed' if packed else 'unpacked'}: batch {tuple(batch.input_ids.shape)} = {batch.input_ids.numel()} "
              f"positions, {real} real tokens ({100 * (1 - real / batch.input_ids.numel()):.1f}% padding), {response} response tokens; "
              f"{layouts[packed][1] / 1e9:.1f} GFLOP a phase")
    square = peak_flops(torch.bfloat16)
    own = shape_peak(model_dir, layouts[False][0].input_ids.numel(), response, torch.bfloat16)
    print(f"bf16 peaks: square {square / 1e9:.0f} GFLOP/s, the unpacked phase's own shapes {own / 1e9:.0f} GFLOP/s")

    settings = [("eager, per-parameter AdamW, unpacked", dict(fused=False, foreach=False), False, False, False),
                ("eager, fused AdamW, unpacked", dict(fused=True), False, False, False),
                ("eager, fused AdamW, packed, log-softmax by autograd", dict(fused=True), False, True, True),
                ("eager, fused AdamW, packed", dict(fused=True), False, True, False)]
    if not a.skip_compile:
        settings.append(("compile, fused AdamW, packed", dict(fused=True), True, True, False))
    results = {}
    for name, opt_kwargs, compiled, packed, by_autograd in settings:
        batch, phase_flops = layouts[packed]
        with training.set_default_dtype(torch.bfloat16):
            model, ref = decoder_from_hf_dir(str(model_dir)), decoder_from_hf_dir(str(model_dir))
        model.load_state_dict(weights)
        ref.load_state_dict(weights)
        ref.eval().requires_grad_(False)
        loss_fn = DPOLoss(beta=0.1)
        if compiled:
            loss_fn = compile_training([model, ref], loss_fn, verbose=False)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-6, **opt_kwargs)

        before = compile_seconds()
        start = time.perf_counter()
        with log_softmax_by_autograd(by_autograd):
            train_phase(model, ref, loss_fn, opt, batch)
            warmup, compile_s = time.perf_counter() - start, compile_seconds() - before
            reps = [train_phase(model, ref, loss_fn, opt, batch) for _ in range(a.reps)]
        results[name] = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        total = statistics.median(sum(r.values()) for r in reps)
        print(f"| {name} | {total:.2f} | " + " | ".join(f"{results[name][k]:.2f}" for k in reps[0])
              + f" | {phase_flops / total / 1e9:.1f} | {100 * phase_flops / total / square:.1f}% | {100 * phase_flops / total / own:.1f}% | "
              f"{warmup:.0f} (compile {compile_s:.0f}) | load {os.getloadavg()[0]:.2f} |", flush=True)
        if name == "eager, fused AdamW, packed":
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_phase(model, ref, loss_fn, opt, batch)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=55))
    print("columns: setting | phase s (median) | policy forward | reference forward | backward | AdamW | GFLOP/s | share of square "
          "bf16 peak | share of own-shape peak | first (warm-up) phase s | load")


if __name__ == "__main__":
    main()
