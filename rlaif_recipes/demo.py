"""`make demo`: cut an over-cautious policy's false-refusal rate with AI feedback, on CPU.

Every stage is one of the package's recipes, run as a user would run it (`rlaif run ...`); this
file only puts them in order and prints the before/after table.

1. Starting policy: the tiny model fine-tuned with torchtune's SFT recipe on XSTest's annotated
   completions (`demo_policy`), so it refuses many safe prompts, like the model it imitates.
2. `evaluate` it on held-out prompts no stage trains on.
3. Row 1, the reference case: `online_dpo` on benign training prompts; the judge is the router over
   the encoder reward model under the `false_refusal` rubric (doubtful pairs go to a review file).
4. Row 2: the same on safe and unsafe training prompts under the prompt-aware `helpful_harmless`
   rubric: the reward model must infer from the prompt text whether to answer or decline.
5. `evaluate` each result and write demo.json / demo.md / demo.png.

`--offline` (`make demo-offline`) runs row 1 the classic way instead: `generate_pairs` from the
starting policy, `judge_pairs` with the same judge, `dpo` on the judged pairs, then `evaluate`.

A finished stage is skipped on a re-run (its output is there), so an interrupted demo continues.

    python -m rlaif_recipes.demo [--out outputs/demo] [--steps N] [--offline]
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

from rlaif_recipes import demo_policy
from rlaif_recipes.report import Bars, read_report, write_report

ROWS = {
    "false_refusal": {
        "title": "benign prompts, false_refusal rubric",
        "steps": 120,
        "overrides": ["rubric=false_refusal", "data=xstest_safe"],
    },
    "helpful_harmless": {
        "title": "safe + unsafe prompts, helpful_harmless rubric",
        "steps": 300,
        "overrides": ["rubric=helpful_harmless", "data=xstest_all", "n=4"],
    },
}
# The online stage's settings for the demo's few-million-parameter policy (a real model keeps the
# config's defaults: a far smaller learning rate). Row 2 must teach a prompt-dependent choice, which
# this policy carries over to unseen prompts only slowly: it samples 4 replies a prompt (best vs
# worst, so more pairs hold one answer and one refusal) for 300 steps; bench/row2_ceiling.py shows an
# oracle judge needs as much.
ONLINE = [
    "judge=router", "judge@judge.judge=reward_model", "judge.min_confidence=0.1",
    "sampler.max_tokens=48", "prompts_per_step=16", "n=2", "loss.beta=0.1", "optimizer.lr=2.5e-4",
    "checkpoint_every=40", "sync_every=1",
]  # fmt: skip


def rlaif(args: Sequence[str], log: Path) -> None:
    """Run `rlaif ARGS`, output to `log`; a failure names the stage's log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "rlaif"), *args]
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"demo stage failed: {' '.join(args[:2])}; see {log}")


def evaluate(checkpoint: Path, out: Path, label: str, seed: int) -> Dict[str, float]:
    if not (out / "eval.json").is_file():
        rlaif(["run", "evaluate", f"checkpoint_dir={checkpoint}", f"output_dir={out}", f"label={label}", f"seed={seed}"], out.with_suffix(".log"))
    return read_report(str(out), "eval")["metrics"]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint (a manifest is written last) under a training run's output_dir."""
    done = sorted((m.parent for m in run_dir.rglob("step_*/checkpoint.json")), key=lambda p: p.name)
    if not done:
        raise FileNotFoundError(f"no finished checkpoint under {run_dir}")
    return done[-1]


def offline(policy: Path, out: Path, seed: int) -> Path:
    """Row 1 the classic way: sample pairs once, judge them, DPO on the result; return the checkpoint."""
    if not any(out.glob("dpo/**/step_*/checkpoint.json")):
        rlaif(["run", "generate_pairs", f"checkpoint_dir={policy}", f"output_dir={out / 'pairs'}", "n=4", "sampler.max_tokens=48",
               "data=xstest_safe", f"seed={seed}"], out / "generate_pairs.log")  # fmt: skip
        rlaif(["run", "judge_pairs", f"input_dir={out / 'pairs'}", f"output_dir={out / 'prefs'}", f"checkpoint_dir={policy}",
               *ONLINE[:3], "rubric=false_refusal", f"seed={seed}"], out / "judge_pairs.log")  # fmt: skip
        rlaif(["run", "dpo", f"checkpoint_dir={policy}", f"dataset.source={out / 'prefs'}", f"output_dir={out / 'dpo'}",
               "epochs=4", "optimizer.lr=2.5e-4", "batch_size=8", "eval_dataset=null", f"seed={seed}"], out / "dpo.log")  # fmt: skip
    return latest_checkpoint(out / "dpo")


def online(
    policy: Path, out: Path, row: str, steps: int, seed: int, overrides: Sequence[str] = (), settings: Sequence[str] = tuple(ONLINE)
) -> Path:
    """Run online DPO from `policy` with `settings` (the demo's: ONLINE), then the row's and `overrides`;
    skipped when finished. Returns its last checkpoint."""
    final = out / "checkpoints" / f"step_{steps:07d}"
    if not (final / "checkpoint.json").is_file():
        resume = ["resume_from_checkpoint=true"] if any((out / "checkpoints").glob("step_*")) else []
        rlaif(
            ["run", "online_dpo", f"checkpoint_dir={policy}", f"output_dir={out}", f"max_steps={steps}", f"seed={seed}",
             *settings, *ROWS[row]["overrides"], *overrides, *resume],
            out.with_suffix(".log"),
        )  # fmt: skip
    return final


def main(argv: Sequence[str] | None = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="directory for every stage's output")
    parser.add_argument("--steps", type=int, default=None, help="online DPO steps for every row (default: each row's own)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, SFT, sampling and training")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which RLAIF rows to run")
    parser.add_argument("--offline", action="store_true", help="row 1 as generate_pairs -> judge_pairs -> dpo")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the online_dpo runs (e.g. optimizer.lr=1e-4)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = Path(args.out)
    start = time.perf_counter()

    print("1/4 starting policy: tiny model + SFT on XSTest completions", flush=True)
    policy = demo_policy.starting_policy(out, seed=args.seed)
    print("2/4 evaluate the starting policy", flush=True)
    results = {"before (SFT policy)": evaluate(policy, out / "eval" / "before", "before", args.seed)}
    if args.offline:
        print("3/4 offline: generate_pairs -> judge_pairs -> dpo (row 1's judge and rubric)", flush=True)
        trained = offline(policy, out / "offline", args.seed)
        print("4/4 evaluate the DPO policy", flush=True)
        results[f"after: offline DPO, {ROWS['false_refusal']['title']}"] = evaluate(trained, out / "eval" / "offline", "offline", args.seed)
        args.rows = ["false_refusal"]
    for i, row in enumerate([] if args.offline else args.rows):
        steps = args.steps or ROWS[row]["steps"]
        print(f"3/4 online DPO, row {i + 1}: {ROWS[row]['title']} ({steps} steps)", flush=True)
        trained = online(policy, out / f"online_{row}", row, steps, args.seed, args.overrides)
        print(f"4/4 evaluate row {i + 1}", flush=True)
        results[f"after: {ROWS[row]['title']}"] = evaluate(trained, out / "eval" / row, row, args.seed)
    minutes = (time.perf_counter() - start) / 60
    print(table(results, out, args.rows, minutes, "demo_offline" if args.offline else "demo"))
    return results


def table(results: Dict[str, Dict[str, float]], out: Path, rows: List[str], minutes: float, name: str) -> str:
    """The before/after table (demo.md / .json / .png) and what each judge rewarded."""
    lines = [
        {"policy": policy, "false refusals (safe, held out)": m["false_refusal_rate"], "refusals (unsafe, held out)": m["unsafe_refusal_rate"],
         "gap (unsafe - safe)": m["unsafe_refusal_rate"] - m["false_refusal_rate"], "short replies (all)": m.get("short_reply_rate"),
         "distinct replies (all)": m.get("distinct_reply_rate")}
        for policy, m in results.items()
    ]  # fmt: skip
    notes = [
        f"This invocation: {minutes:.1f} minutes (stages finished by an earlier run are reused). Refusals are "
        "classified by XSTest's phrase matcher, independent of the judge. Short replies (under 4 words) and one "
        "template for every prompt (few distinct replies) are no refusal but no answer either: a falling refusal rate "
        "counts only while short replies stay rare and replies stay distinct."
    ]
    if "false_refusal" in rows:
        notes.append(
            "Row 1's judge rewarded answering over refusing whatever the prompt, so it can lower unsafe refusals too: "
            "the policy learns exactly what the judge rewards."
        )
    if "helpful_harmless" in rows:
        notes.append(
            "Row 2's judge rewarded answering benign requests and declining harmful ones, inferring harm from the prompt "
            "text with a head trained on human labels; it should widen the gap between unsafe and safe refusal rates."
        )
    series = {
        "false refusals (safe)": {r["policy"]: r["false refusals (safe, held out)"] for r in lines},
        "refusals (unsafe)": {r["policy"]: r["refusals (unsafe, held out)"] for r in lines},
    }
    paths = write_report(
        str(out), name, {"rows": lines, "minutes": minutes}, lines, title="RLAIF against false refusals",
        notes=notes, plot=Bars(series, title="Held-out refusal rates", ylabel="rate", ylim=(0, 1)),
    )  # fmt: skip
    return paths["md"].read_text() + f"\n(written to {paths['md']}, {paths['png']}; metrics in {paths['json']})"


if __name__ == "__main__":
    main()
