"""One report, three files: NAME.json (for machines), NAME.md (for people), NAME.png (a bar chart).

Recipes that measure something (`audit_judge`, `evaluate`) hand their numbers here so every report
has the same shape:

    write_report(output_dir, "audit", metrics={"agreement": 0.91, ...},
                 rows=[{"metric": "agreement", "value": 0.91}, ...],
                 plot=Bars({"rule": {"agreement": 0.91, "tie_rate": 0.02}}, ylabel="rate"))

Each file is written atomically (`files.atomic_write`), so a reader never sees half a report.
"""

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from rlaif_recipes.files import atomic_write, atomic_write_text


@dataclass
class Bars:
    """A grouped bar chart: `series` maps a series name (e.g. "before", "after") to {category: value}.
    One series gives a plain bar chart. Missing values (None/NaN) are left out."""

    series: Mapping[str, Mapping[str, Optional[float]]]
    title: str = ""
    ylabel: str = ""
    ylim: Optional[Tuple[float, float]] = None
    categories: List[str] = field(default_factory=list)  # order of the x axis; default: first seen
    percent: bool = False  # values are fractions, drawn and labelled as percentages


def write_report(
    output_dir: str,
    name: str,
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] = (),
    *,
    title: str = "",
    notes: Sequence[str] = (),
    plot: Optional[Bars] = None,
) -> Dict[str, Path]:
    """Write NAME.json (title, metrics, rows, notes), NAME.md (rows, notes, plot, then the flat
    metrics as tables) and, given a plot, NAME.png under `output_dir`.
    Returns {"json": path, "md": path[, "png": path]}."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "title": title or name, "metrics": dict(metrics), "rows": [dict(r) for r in rows], "notes": list(notes)}
    paths = {
        "json": atomic_write_text(out / f"{name}.json", json.dumps(_jsonable(doc), indent=2, sort_keys=False) + "\n"),
        "md": atomic_write_text(out / f"{name}.md", _markdown(doc, png=f"{name}.png" if plot else None)),
    }
    if plot is not None:
        paths["png"] = _write_png(out / f"{name}.png", plot)
    return paths


def read_report(output_dir: str, name: str) -> Dict[str, Any]:
    """The JSON half of a report, as written."""
    return json.loads((Path(output_dir) / f"{name}.json").read_text())


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """Rows of dicts as a Markdown table (columns: the given ones, else every key in first-seen order)."""
    if not rows:
        return ""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    """Floats to 4 significant places, None as an empty cell, pipes escaped."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# ---- internals --------------------------------------------------------------------------------


def _markdown(doc: Mapping[str, Any], png: Optional[str]) -> str:
    """The rows (the headline table) first, then notes and the plot, then every flat metric."""
    parts = [f"# {doc['title']}", ""]
    if doc["rows"]:
        parts += [markdown_table(doc["rows"]), ""]
    parts += [f"- {n}" for n in doc["notes"]] + ([""] if doc["notes"] else [])
    if png:
        parts += [f"![{doc['title']}]({png})", ""]
    flat = [{"metric": k, "value": v} for k, v in doc["metrics"].items() if not isinstance(v, (dict, list))]
    if flat:
        parts += (["## All metrics", ""] if doc["rows"] else []) + [markdown_table(flat), ""]
    return "\n".join(parts)


def _write_png(path: Path, plot: Bars) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    categories = plot.categories or list(dict.fromkeys(c for values in plot.series.values() for c in values))
    scale, fmt = (100.0, "%.1f%%") if plot.percent else (1.0, "%.3g")
    width = 0.8 / max(len(plot.series), 1)
    # long names wrap under their bars, level, instead of running diagonally over the plot
    labels = [textwrap.fill(c, 22) for c in categories]
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.9 * len(categories) + 1.5), 3.2 + 0.18 * lines))
    for k, (label, values) in enumerate(plot.series.items()):
        xs = [i + (k - (len(plot.series) - 1) / 2) * width for i, c in enumerate(categories) if _number(values.get(c))]
        ys = [scale * float(values[c]) for c in categories if _number(values.get(c))]
        bars = ax.bar(xs, ys, width=width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
    ax.set_xticks(range(len(categories)), labels, fontsize=8)
    ax.set_title(plot.title)
    ax.set_ylabel(plot.ylabel)
    if plot.ylim:
        ax.set_ylim(plot.ylim[0] * scale, plot.ylim[1] * scale * 1.08)  # room for the labels over full bars
    if plot.percent:
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter())
    if len(plot.series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (strict JSON); anything else unknown becomes its string."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
