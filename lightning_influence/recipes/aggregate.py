"""Aggregate a multirun directory: the accuracy-vs-fraction table (Markdown and CSV) and plot.

    python -m lightning_influence.recipes.aggregate multirun/<date>/<time> [--out DIR] [--no-plot]
    lightning-influence-aggregate multirun/<date>/<time>

Reads every ``report.json`` below the directory and their ``summary`` rows (one per method and
fraction: the coreset recipe's kept fraction, the cleaning recipe's removed fraction), groups
them by recipe, method and fraction, and writes, into ``--out`` (default: the directory):

- ``aggregate.md``: per recipe, a table method x fraction of ``mean +- std (n)`` of the metric
  over the jobs (seeds); the std is the sample standard deviation over jobs.
- ``aggregate.csv``: ``recipe, metric, method, fraction, mean, std, n``.
- ``accuracy_vs_fraction.png`` (matplotlib; skipped with ``--no-plot``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_influence.recipes.common import summary
from lightning_influence.scores import atomic_write_bytes

__all__ = ["collect", "aggregate", "markdown_table", "main"]

Key = tuple[str, str, str, float]  # recipe, metric, method, fraction


def collect(directory: str | Path) -> list[dict[str, Any]]:
    """The ``summary`` rows of every ``report.json`` below ``directory`` (with ``"job"``: its folder)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no multirun directory at {root}")
    rows = []
    for path in sorted(root.rglob("report.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable report: {err}") from None
        for row in report.get("summary") or []:
            if row.get("accuracy") is None or row.get("fraction") is None:
                continue
            rows.append({**row, "job": str(path.parent.relative_to(root))})
    if not rows:
        raise ValueError(f"no report.json with summary rows below {root}: did the runs finish (python -m lightning_influence -m ...)?")
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """``(recipe, metric, method, fraction) -> summary`` of the accuracies over the jobs. A row that
    repeats another's method, fraction, seed and accuracy is the same run reported by two jobs
    (the baselines of a sweep over estimators: no removal, the final loss, random) and counts once."""
    groups: dict[Key, list[float]] = defaultdict(list)
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        key = (str(row.get("recipe", "?")), str(row.get("metric", "accuracy")), str(row["method"]), round(float(row["fraction"]), 6))
        run = (*key, row.get("seed"), float(row["accuracy"]))
        if row.get("seed") is not None and run in seen:
            continue
        seen.add(run)
        groups[key].append(float(row["accuracy"]))
    return {k: summary(v) for k, v in sorted(groups.items())}


def markdown_table(cells: dict[Key, dict[str, Any]]) -> str:
    """One Markdown table per recipe: rows = methods, columns = fractions, ``mean +- std (n)``."""
    parts = []
    for recipe, metric in dict.fromkeys((k[0], k[1]) for k in cells):
        keys = [k for k in cells if k[:2] == (recipe, metric)]
        fractions = sorted({k[3] for k in keys})
        methods = list(dict.fromkeys(k[2] for k in keys))
        word = "kept" if recipe == "coreset" else "removed" if recipe == "cleaning" else ""
        header = "| method | " + " | ".join(f"{f:g} {word}".strip() for f in fractions) + " |"
        lines = [f"{recipe}: {metric}, mean +- std over jobs (n)", "", header, "|---|" + "---|" * len(fractions)]
        for m in methods:
            row = []
            for f in fractions:
                s = cells.get((recipe, metric, m, f))
                row.append("" if s is None else f"{s['mean']:.4f} +- {s['std']:.4f} ({s['n']})")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _csv(cells: dict[Key, dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["recipe", "metric", "method", "fraction", "mean", "std", "n"])
    for (recipe, metric, method, fraction), s in cells.items():
        writer.writerow([recipe, metric, method, f"{fraction:g}", f"{s['mean']:.6f}", f"{s['std']:.6f}", s["n"]])
    return buffer.getvalue()


def write(directory: str | Path, out: str | Path | None = None, plot: bool = True) -> dict[str, Path]:
    """Aggregate ``directory`` and write the table, CSV and (``plot``) the figure into ``out``."""
    cells = aggregate(collect(directory))
    target = Path(out) if out is not None else Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": atomic_write_bytes(target / "aggregate.md", markdown_table(cells).encode()),
        "csv": atomic_write_bytes(target / "aggregate.csv", _csv(cells).encode()),
    }
    if plot:
        from lightning_influence import plots

        curves: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        metrics = {k[1] for k in cells}
        for (recipe, metric, method, fraction), s in cells.items():
            name = method if len({k[0] for k in cells}) == 1 else f"{recipe}: {method}"
            curves[name].append((fraction, s["mean"], s["std"]))
        files["plot"] = plots.accuracy_vs_fraction(target / "accuracy_vs_fraction.png", curves, ylabel=", ".join(sorted(metrics)))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-influence-aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="a multirun directory (multirun/<date>/<time>) or any folder holding report.json files")
    parser.add_argument("--out", default=None, help="where to write aggregate.md/.csv/.png (default: the directory)")
    parser.add_argument("--no-plot", action="store_true", help="skip accuracy_vs_fraction.png (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        files = write(args.directory, args.out, plot=not args.no_plot)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text(), end="")
    print("Wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
