"""Aggregate a multirun directory: the accuracy-vs-fraction table (Markdown and CSV) and plot.

    python -m lightning_influence.recipes.aggregate multirun/<date>/<time> [--out DIR] [--no-plot]
    lightning-influence-aggregate multirun/<date>/<time>

Reads every ``report.json`` below the directory and their ``summary`` rows (one per method and
fraction: the coreset recipe's kept fraction, the cleaning recipe's removed fraction; each row's
value under the name of its ``metric``, e.g. ``"test_acc"`` or ``"test_mse"``, or, in reports
written before rows named it so, under ``"accuracy"``: :func:`row_value`), and the
Hydra overrides of each job (``.hydra/overrides.yaml`` next to the report). Jobs are pooled only
over their seeds: the overrides that differ between jobs, other than seeds (``seed``,
``recipe.seeds``, ``data.seed``, ...), the estimator (the table's rows) and the fraction (its
columns), make separate configurations (e.g. ``model.lr=0.1`` and ``model.lr=0.5``), each with
its own table. Writes, into ``--out`` (default: the directory):

- ``aggregate.md``: per recipe and configuration, a table method x fraction of
  ``mean +- std (n)`` of the metric over the jobs (seeds); the std is the sample standard
  deviation over jobs.
- ``aggregate.csv``: ``recipe, metric, method, fraction, mean, std, n, config``.
- ``accuracy_vs_fraction.png`` (matplotlib; skipped with ``--no-plot``).

Job folders (those holding ``.hydra/``) without a ``report.json`` -- failed, killed or unfinished
jobs --, reports that are not the last run's in their folder -- an earlier run's outputs, left
there by a run that failed, was killed or is still running (the run id in the report is not the
one of the folder's job marker, or ``.hydra/config.yaml`` changed since the report's run started;
:func:`not_own_report`) -- and reports without accuracy rows (the deletion recipe's: its
predicted vs actual changes stay in each report.json) are skipped with a warning that names them
and says why; ``aggregate.md`` ends with a note that counts them. Reports written before runs
recorded an id, in folders no later run marked, are taken as before (nothing to check them
against).

Baselines have rows of their own, named ``"<name> (baseline)"`` (the cleaning recipe's
``no removal (baseline)``, ``final loss (baseline)`` and ``random removal (baseline)``; older
reports' bare ``no_removal``, ``loss`` and ``random`` are renamed so): the ``random`` and
``loss`` estimators' rows are other procedures and never pool with them. A row is a baseline
when the report says so (``"baseline": true``) or, in reports without the field, when its
method is not the job's estimator. Each cell's ``n`` counts the jobs (seeds) of one procedure.

A baseline that several jobs report for the same run (repeated by every job of a sweep over
estimators) counts once: two
rows are the same run when their recipe, metric, method, fraction and seed agree and so do the
jobs' overrides other than the estimator and the fraction swept (which a baseline does not
depend on), and so does the value. Rows of jobs without overrides (reports made by hand or by
``lightning_influence.app.run``) are told apart by seed and value only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_influence.recipes.outputs import JOB_MARKER, read_job_marker
from lightning_influence.recipes.retraining import summary
from lightning_influence.scores import atomic_write_bytes

__all__ = [
    "collect", "scan", "Scan", "not_own_report", "aggregate", "configurations", "markdown_table", "baseline_method", "row_value", "main",
]

Key = tuple[str, str, str, str, float]  # recipe, metric, configuration, method, fraction

#: Overrides that only reseed a job: the jobs that differ in these alone are pooled.
SEED_KEY = re.compile(r"(^|[._])seeds?$")
#: Overrides that choose the estimator: the rows of a table.
METHOD_KEYS = frozenset({"estimator", "estimator.name"})
#: Overrides that set the fraction kept or removed: the columns of a table.
FRACTION_KEYS = frozenset({"recipe.fraction", "recipe.remove_fraction", "recipe.remove_count"})


def is_seed_key(key: str) -> bool:
    """``seed``, ``recipe.seeds``, ``data.seed``, ``data.noise_seed``, ``estimator.options.seed``, ..."""
    return bool(SEED_KEY.search(key))


def read_overrides(job: Path) -> dict[str, str] | None:
    """``key -> value`` of the job's Hydra overrides (``.hydra/overrides.yaml``), ``None`` without one."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path} is not a readable list of overrides: {err}") from None
    result: dict[str, str] = {}
    for item in items:
        text = str(item)
        if text.startswith("~"):  # a deleted key
            result[text[1:].partition("=")[0]] = "<deleted>"
        else:
            key, _, value = text.partition("=")
            result[key.lstrip("+")] = value
    return result


#: Row names of the cleaning recipe's baselines, as reports before these names wrote them.
LEGACY_BASELINES = {"no_removal": "no removal (baseline)", "loss": "final loss (baseline)", "random": "random removal (baseline)"}


def baseline_method(method: str) -> str:
    """The table's name of a baseline row: ``"<name> (baseline)"`` (the cleaning recipe's
    ``no_removal``, ``loss`` and ``random`` of older reports: ``"no removal (baseline)"``, ...),
    so that a baseline never shares a row with an estimator of the same name (the ``random``
    estimator's removal is another procedure than random removal)."""
    if method.endswith("(baseline)"):
        return method
    return LEGACY_BASELINES.get(method, f"{method} (baseline)")


#: The recipes whose reports carry the accuracy rows this module tabulates.
SUPPORTED_RECIPES = ("cleaning", "coreset")


def _natural(path: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


@dataclass
class Scan:
    """What :func:`scan` found below a directory: the summary ``rows``; the Hydra job folders
    (holding ``.hydra/``) without a ``report.json`` (failed, killed or unfinished jobs); the
    reports without accuracy rows (``(job, recipe)``: a deletion sweep, ...); and the reports
    that are not their folder's last run's (``(job, why)``, :func:`not_own_report`)."""

    rows: list[dict[str, Any]]
    without_report: list[str]
    unsupported: list[tuple[str, str]]
    not_own: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per kind of skipped folder, naming them."""
        lines = []
        if self.not_own:
            lines.append(
                f"skipped {len(self.not_own)} job folder(s) whose report.json is not the last run's there (outputs of an earlier "
                "run, left in the folder by a run that failed, was killed or is still running): "
                + "; ".join(f"{job} ({why})" for job, why in self.not_own)
            )
        if self.without_report:
            lines.append(
                f"skipped {len(self.without_report)} job folder(s) without report.json (failed, killed or unfinished jobs): "
                + ", ".join(self.without_report)
            )
        if self.unsupported:
            lines.append(
                f"skipped {len(self.unsupported)} report(s) without accuracy rows: " + ", ".join(f"{job} ({recipe})" for job, recipe in self.unsupported)
                + f"; aggregate tabulates the {' and '.join(SUPPORTED_RECIPES)} recipes (a deletion report holds its "
                "predicted vs actual changes and their correlations in its report.json: 'sets', 'correlation')"
            )
        return lines


def not_own_report(folder: Path, report: dict[str, Any]) -> str | None:
    """Why the ``report.json`` in ``folder`` is not the report of the last run there, or ``None``
    when it is (or when nothing tells). A run marks its folder when it starts (the job marker
    :data:`~lightning_influence.recipes.outputs.JOB_MARKER`: a run id, ``running``) and writes that
    id into its report at the end. Not the last run's: a report whose run id (or a report without
    one, of a version that wrote none) is not the marker's: the last run failed, was killed or is
    still running, and the report is an earlier run's; and a report next to a ``.hydra/`` folder
    whose ``config.yaml`` is not the one the report's run started with: a later job with another
    config started there (Hydra rewrote ``.hydra/``) and wrote no report. A report without a run
    id in a folder whose marker has none either (written before run ids) is taken as before."""
    run = report.get("run")
    run_id = run.get("id") if isinstance(run, dict) else None
    marker = read_job_marker(folder)
    marked = marker.get("run_id") if marker is not None else None
    if marked is not None and marked != run_id:
        status = str(marker.get("status"))
        last = {"failed": "failed", "running": "did not finish (killed, or still running)"}.get(status, f"is {status}")
        error = f": {str(marker['error'])[:300]}" if status == "failed" and marker.get("error") else ""
        return (
            f"the last run there, started {marker.get('started')}, {last}{error}; its report.json is of an earlier run "
            f"({'run ' + str(run_id) if run_id else 'without run id'}, not run {marked} of {JOB_MARKER})"
        )
    digest = run.get("hydra_config_sha256") if isinstance(run, dict) else None
    config = folder / ".hydra" / "config.yaml"
    if digest and config.is_file():
        try:
            current = hashlib.sha256(config.read_bytes()).hexdigest()
        except OSError:
            current = None
        if current is not None and current != digest:
            return (
                "its .hydra/config.yaml is not the config its report.json's run started with: a later run with another "
                "config started there and wrote no report (it failed before its output folder was marked)"
            )
    return None


def row_value(row: dict[str, Any]) -> Any:
    """The value of a ``summary`` row: under the name of its ``metric`` (``row["test_mse"]`` for
    ``"metric": "test_mse"``), else under ``"accuracy"``, where reports written before the rows
    named the field after the metric kept it, whatever the metric (``None`` without either)."""
    metric = row.get("metric")
    if isinstance(metric, str) and metric in row:
        return row[metric]
    return row.get("accuracy")


def scan(directory: str | Path) -> Scan:
    """The summary rows of every ``report.json`` below ``directory`` (see :func:`collect`) and what
    was skipped: job folders without a report, reports of recipes without accuracy rows."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no multirun directory at {root}")
    rows: list[dict[str, Any]] = []
    unsupported: list[tuple[str, str]] = []
    not_own: list[tuple[str, str]] = []
    for path in sorted(root.rglob("report.json"), key=lambda p: _natural(str(p.relative_to(root)))):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable report: {err}") from None
        job = str(path.parent.relative_to(root))
        if isinstance(report, dict) and (why := not_own_report(path.parent, report)) is not None:
            not_own.append((job, why))
            continue
        overrides = read_overrides(path.parent)
        node = report.get("estimator")
        estimator = node.get("name") if isinstance(node, dict) else None
        found = 0
        for row in report.get("summary") or []:
            if row_value(row) is None or row.get("fraction") is None:
                continue
            method, baseline = str(row["method"]), row.get("baseline")
            if baseline is None:  # reports without the field: any row of another method (or of an unknown estimator)
                labelled = estimator is not None and method != str(estimator)
                baseline = estimator is None or labelled
            else:
                labelled = bool(baseline)
            if labelled:
                method = baseline_method(method)
            rows.append({**row, "method": method, "reported_method": row["method"], "job": job, "overrides": overrides, "baseline": bool(baseline)})
            found += 1
        if not found:
            unsupported.append((job, str(report.get("recipe", "unknown"))))
    jobs = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    missing = sorted((str(j.relative_to(root)) for j in jobs if not (j / "report.json").is_file()), key=_natural)
    return Scan(rows, missing, unsupported, not_own)


def collect(directory: str | Path) -> list[dict[str, Any]]:
    """The ``summary`` rows of every ``report.json`` below ``directory``, each with ``"job"`` (its
    folder), ``"overrides"`` (its Hydra overrides, ``None`` without ``.hydra/overrides.yaml``),
    ``"baseline"`` (the report's flag; in reports without it, a row of another method than the
    job's estimator) and ``"reported_method"`` (the report's name; ``"method"`` is a baseline's
    table name, :func:`baseline_method`). Job folders without a
    report (failed or killed jobs) and reports without accuracy rows (the deletion recipe's) are
    named in a warning; without any row, an error says why."""
    return _checked_rows(scan(directory), directory)


def _checked_rows(found: Scan, directory: str | Path) -> list[dict[str, Any]]:
    if not found.rows:
        root = Path(directory)
        recipes = sorted({recipe for _, recipe in found.unsupported})
        if found.unsupported:
            reason = (
                f"the {len(found.unsupported)} report(s) there are of the {', '.join(recipes)} recipe: aggregate tabulates the "
                f"accuracy rows of the {' and '.join(SUPPORTED_RECIPES)} recipes (accuracy vs fraction); a deletion report "
                "holds its predicted vs actual changes and their correlations in its report.json ('sets', 'correlation')"
            )
        else:
            reason = "did the runs finish (python -m lightning_influence -m ...)?"
        skipped = [note for note in found.notes() if "without report.json" in note or "not the last run's" in note]
        missing = f" ({'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"no report.json with accuracy rows below {root}: {reason}{missing}")
    for note in found.notes():
        warnings.warn(f"{Path(directory)}: {note}", UserWarning, stacklevel=2)
    return found.rows


def configurations(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """``(configuration keys, pooled keys)``: the overrides whose values differ between the jobs,
    split into those that make separate configurations and the seeds that are pooled (the
    estimator and the fraction are the tables' rows and columns)."""
    jobs: dict[str, dict[str, str]] = {}
    for row in rows:
        jobs.setdefault(row["job"], row.get("overrides") or {})
    keys = sorted({k for o in jobs.values() for k in o})
    varying = [k for k in keys if len({o.get(k) for o in jobs.values()}) > 1]
    pooled = [k for k in varying if is_seed_key(k)]
    config = [k for k in varying if not is_seed_key(k) and k not in METHOD_KEYS and k not in FRACTION_KEYS]
    return config, pooled


def _config_label(overrides: dict[str, str] | None, keys: Sequence[str]) -> str:
    o = overrides or {}
    return ", ".join(f"{k}={o[k]}" if k in o else f"{k} unset" for k in keys)


def aggregate(rows: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """``(recipe, metric, configuration, method, fraction) -> summary`` of the accuracies over the
    jobs; ``configuration`` is ``"key=value, ..."`` of the overrides that tell it apart (``""``
    when every job shares them; see :func:`configurations`).

    A job counts once per cell. A baseline row (a method other than the job's estimator) repeated
    by another job counts once when recipe, metric, method, fraction, seed and value agree and the
    two jobs' overrides agree outside the estimator and the swept fraction: the same run, reported
    by every job of a sweep over estimators. Rows that differ in any other override (``recipe.seeds``,
    ``model.lr``, ...) are different runs even when their values coincide."""
    config_keys, _ = configurations(rows)
    groups: dict[Key, list[float]] = defaultdict(list)
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        overrides = row.get("overrides") or {}
        config = _config_label(row.get("overrides"), config_keys)
        key = (str(row.get("recipe", "?")), str(row.get("metric", "accuracy")), config, str(row["method"]), round(float(row["fraction"]), 6))
        value = float(row_value(row))
        if (key, "job", row["job"]) in seen:  # a report that repeats a row: one job, one ranking, once
            continue
        seen.add((key, "job", row["job"]))
        if row.get("baseline") and row.get("seed") is not None:
            context = tuple(sorted((k, v) for k, v in overrides.items() if k not in METHOD_KEYS and k not in FRACTION_KEYS and not k.startswith("estimator.")))
            run = (key, row.get("seed"), context, value)
            if run in seen:
                continue
            seen.add(run)
        groups[key].append(value)
    return {k: summary(v) for k, v in sorted(groups.items())}


def markdown_table(cells: dict[Key, dict[str, Any]], pooled: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """One Markdown table per recipe, metric and configuration: rows = methods, columns =
    fractions, ``mean +- std (n)``; ``pooled``: the overrides the jobs of a cell differ in;
    ``notes``: lines added below the tables (what was skipped, :meth:`Scan.notes`)."""
    parts = []
    over = f"over jobs differing in {', '.join(pooled)}" if pooled else "over jobs"
    for recipe, metric, config in dict.fromkeys(k[:3] for k in cells):
        keys = [k for k in cells if k[:3] == (recipe, metric, config)]
        fractions = sorted({k[4] for k in keys})
        methods = list(dict.fromkeys(k[3] for k in keys))
        word = "kept" if recipe == "coreset" else "removed" if recipe == "cleaning" else ""
        header = "| method | " + " | ".join(f"{f:g} {word}".strip() for f in fractions) + " |"
        title = f"{recipe}: {metric}" + (f" [{config}]" if config else "") + f", mean +- std {over} (n)"
        lines = [title, "", header, "|---|" + "---|" * len(fractions)]
        for m in methods:
            row = []
            for f in fractions:
                s = cells.get((recipe, metric, config, m, f))
                row.append("" if s is None else f"{s['mean']:.4f} +- {s['std']:.4f} ({s['n']})")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
    if notes:
        parts.append("\n".join(f"Note: {n[0].upper()}{n[1:]}." for n in notes))
    return "\n\n".join(parts) + "\n"


def _csv(cells: dict[Key, dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["recipe", "metric", "method", "fraction", "mean", "std", "n", "config"])
    for (recipe, metric, config, method, fraction), s in cells.items():
        writer.writerow([recipe, metric, method, f"{fraction:g}", f"{s['mean']:.6f}", f"{s['std']:.6f}", s["n"], config])
    return buffer.getvalue()


def write(directory: str | Path, out: str | Path | None = None, plot: bool = True) -> dict[str, Path]:
    """Aggregate ``directory`` and write the table, CSV and (``plot``) the figure into ``out``."""
    found = scan(directory)
    rows = _checked_rows(found, directory)  # refuses a directory without rows, warns about what was skipped
    cells = aggregate(rows)
    _, pooled = configurations(rows)
    target = Path(out) if out is not None else Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": atomic_write_bytes(target / "aggregate.md", markdown_table(cells, pooled, found.notes()).encode()),
        "csv": atomic_write_bytes(target / "aggregate.csv", _csv(cells).encode()),
    }
    if plot:
        from lightning_influence import plots

        curves: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        metrics = {k[1] for k in cells}
        several_recipes, several_configs = len({k[0] for k in cells}) > 1, len({k[2] for k in cells}) > 1
        for (recipe, _, config, method, fraction), s in cells.items():
            name = f"{recipe}: {method}" if several_recipes else method
            name = f"{name} [{config}]" if several_configs else name
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            files = write(args.directory, args.out, plot=not args.no_plot)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(files["markdown"].read_text(), end="")
    print("Wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
