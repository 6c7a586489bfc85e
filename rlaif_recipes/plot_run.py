"""`rlaif plot RUN_DIR`: one PNG of a training run's curves, from what the run logged.

online_dpo runs are read from metrics.jsonl, dpo runs from their DiskLogger files (logs/log_*.txt,
"Step N | key:value ..."). Each panel shows the keys the run logged; a panel with none says so.
"""

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from rlaif_recipes.errors import DataError, OutputError
from rlaif_recipes.files import atomic_write

Series = Dict[str, List[Tuple[int, float]]]  # key -> [(step, value)]
# (panel title, the keys drawn in it, stacked?)
PANELS: Sequence[Tuple[str, Sequence[str], bool]] = (
    ("loss", ("loss", "eval/loss"), False),
    ("chosen win rate (judge) / reward accuracy", ("judge/win_rate_chosen", "rewards/accuracies", "eval/rewards/accuracies"), False),
    ("reward margin", ("rewards/margins", "eval/rewards/margins"), False),
    ("KL to the reference (mean log-ratio)", ("kl/reference",), False),
    ("response length (tokens)", ("response/tokens_mean",), False),
    ("tie / settled / abstain share of comparisons", ("judge/tie_rate", "judge/settled_rate", "judge/abstain_rate"), False),
    ("label provenance (pairs)", ("labels/ai", "labels/human"), True),
    ("time per step (s)", ("time/sample", "time/judge", "time/train", "time/sync"), True),
)


def read_run(run_dir: str) -> Series:
    """Every numeric metric a run logged, by key, in step order."""
    root = Path(run_dir)
    rows: List[Tuple[int, Dict[str, float]]] = []
    if (root / "metrics.jsonl").is_file():
        for n, line in enumerate((root / "metrics.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    m = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{root / 'metrics.jsonl'}: line {n} is not JSON ({e.msg}); fix or remove that line") from None
                rows.append((int(m["step"]), {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}))
    else:
        for log in sorted((root / "logs").glob("log_*.txt")):
            for line in log.read_text().splitlines():
                match = re.match(r"Step (\d+) \| (.*)", line)
                if match:
                    rows.append((int(match.group(1)), {k: float(v) for k, v in (kv.split(":", 1) for kv in match.group(2).split())}))
    if not rows:
        raise DataError(f"{root} has no metrics.jsonl and no logs/log_*.txt with 'Step N | ...' lines; point rlaif plot at an online_dpo or dpo output_dir")
    series: Series = {}
    for step, metrics in sorted(rows, key=lambda r: r[0]):
        for key, value in metrics.items():
            if key != "step" and math.isfinite(value):
                series.setdefault(key, []).append((step, value))
    return series


def plot_run(run_dir: str, out: str = "") -> Path:
    """Write the run's curves to `out` (default RUN_DIR/run.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    series = read_run(run_dir)
    fig, axes = plt.subplots(4, 2, figsize=(12, 13))
    for ax, (title, keys, stacked) in zip(axes.flat, PANELS):
        drawn = [k for k in keys if k in series]
        if stacked and drawn:
            steps = sorted({s for k in drawn for s, _ in series[k]})
            values = [[dict(series[k]).get(s, 0.0) for s in steps] for k in drawn]
            ax.stackplot(steps, values, labels=drawn, alpha=0.8)
        for key in [] if stacked else drawn:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=key)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).resolve().name}: {max(s for v in series.values() for s, _ in v)} steps")
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "run.png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    except OSError as e:  # the temp file beside it is what failed: name the file asked for
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another --out") from None
    finally:
        plt.close(fig)
    return path
