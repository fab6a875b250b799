"""The output folder of a recipe run: created and marked (the job marker, with the run's id and
status) on global rank zero before any training, checked writable, and at the end the report,
scores and config written into it, each atomically. Only global rank zero creates folders and
writes files, and this code calls no collective."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lightning_influence.config import check_output_dir, in_multirun
from lightning_influence.distributed import is_global_zero
from lightning_influence.recipes.training_set import labels_of
from lightning_influence.scores import InfluenceScores, atomic_write_bytes, check_writable

__all__ = [
    "JOB_MARKER",
    "RECIPE_OUTPUTS",
    "check_outputs_writable",
    "claim_output_dir",
    "end_run",
    "fail_run",
    "hydra_config_digest",
    "make_output_dir",
    "output_dir",
    "prepare",
    "read_job_marker",
    "report_json",
    "sample_rows",
    "stale_outputs",
    "start_run",
    "versions",
    "write_outputs",
]


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` when set, else the Hydra run dir of the current job."""
    explicit = cfg.get("output_dir")
    if explicit is not None:
        return Path(str(explicit)).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("outside a Hydra run, set cfg.output_dir (e.g. the override output_dir=/some/dir)")


def prepare(cfg: DictConfig, plots: bool = False) -> Path:
    """The output folder (created on rank zero) after applying ``num_threads``; with ``plots``,
    fail before any training when matplotlib is missing. Also refused before any training: a
    fixed ``output_dir`` shared by the jobs of a multirun
    (:func:`~lightning_influence.config.check_output_dir`, :func:`claim_output_dir`) and an output
    folder that cannot be created (:func:`make_output_dir`) or that the recipe could not write its
    files into (:func:`check_outputs_writable`). Marks the folder as this run's, running
    (:func:`start_run`): outputs of an earlier run there are no longer taken as a run's own."""
    if plots:
        from lightning_influence.plots import require_matplotlib

        require_matplotlib()
    out = output_dir(cfg)
    check_output_dir(cfg)
    if is_global_zero():
        make_output_dir(out)
        check_outputs_writable(out, plots)
        start_run(out)
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    return out


def make_output_dir(out: Path) -> None:
    """Create the output folder ``out`` (and its parents), or refuse with the folder's name and
    the fix: a path that is a file, or one that cannot be created (any ``OSError``: a parent that
    is a file, a read-only or special file system such as ``/proc``, no permission, ...)."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"the output folder {out} is a file, not a folder: the recipe writes scores.pt, report.json, ... into it. "
            "Choose another output folder (output_dir=... or hydra.run.dir=...)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"the output folder {out} could not be created ({type(err).__name__}: {err.strerror or err}): the recipe writes "
            "scores.pt, report.json, ... into it. Choose an output folder that can be created and written "
            "(output_dir=... or hydra.run.dir=...)"
        ) from err


def check_outputs_writable(out: Path, plots: bool = True) -> None:
    """Refuse, before any training, an output folder into which the recipe could not write its
    files at the end (:data:`RECIPE_OUTPUTS`; the plots only with ``plots``): one of the file
    names taken by a folder (``report.json/``), or a folder this process cannot create files in."""
    for name in RECIPE_OUTPUTS:
        if name.endswith(".png") and not plots:
            continue
        path = out / name
        if path.is_dir():
            raise ValueError(
                f"{path} is a folder: the recipe writes its {name} there after training and retraining, and could not. "
                f"Remove or rename that folder, or write into another output folder (output_dir=... or hydra.run.dir=...)"
            )
    try:
        check_writable(out / "report.json", "the recipe's output folder", what="file")
    except ValueError as err:
        cause = err.__cause__
        why = f"{type(cause).__name__}: {cause.strerror or cause}" if isinstance(cause, OSError) else str(err)
        raise ValueError(
            f"the output folder {out} is not writable ({why}): the recipe writes scores.pt, report.json, ... into it after "
            "training. Make that folder writable, or write into another one (output_dir=... or hydra.run.dir=...)"
        ) from err


#: Every file a recipe may write into its output folder.
RECIPE_OUTPUTS = (
    "scores.pt", "scores.csv", "report.json", "config.yaml",
    "score_histogram.png", "detection_curve.png", "most_harmful.png", "predicted_vs_actual.png",
)


#: The file by which a run marks its output folder (:func:`start_run`, :func:`claim_output_dir`):
#: the run's id, its status (``running``, ``finished``, ``failed``) and, in a Hydra multirun,
#: the sweep's folder and the job's number.
JOB_MARKER = ".lightning-influence-job.json"


#: The runs of this process that started (:func:`start_run`) and did not end yet, by output folder.
_RUNS: dict[str, dict[str, Any]] = {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_job_marker(out: Path) -> dict[str, Any] | None:
    """The job marker of ``out`` (:data:`JOB_MARKER`), ``None`` without a readable one."""
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((out / JOB_MARKER).read_text())
        return marker if isinstance(marker, dict) else None
    return None


def _multirun_job() -> dict[str, Any]:
    """In a Hydra multirun, the sweep's folder, the job's number and folder; else ``{}``."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return {}
    runtime = HydraConfig.get()
    job_dir = Path(str(runtime.runtime.output_dir)).resolve()
    return {"sweep_dir": str(job_dir.parent), "job_num": int(runtime.job.num), "job_dir": str(job_dir)}


def hydra_config_digest() -> str | None:
    """The SHA-256 of the Hydra job's ``.hydra/config.yaml`` (the composed config Hydra wrote when
    this job started), ``None`` outside Hydra or without that file. A report carries it, so that a
    report next to a ``.hydra/`` folder that a later run rewrote is told from that run's own."""
    import hashlib

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    runtime = HydraConfig.get()
    subdir = runtime.output_subdir
    if subdir is None:
        return None
    with contextlib.suppress(OSError):
        return hashlib.sha256((Path(str(runtime.runtime.output_dir)) / str(subdir) / "config.yaml").read_bytes()).hexdigest()
    return None


def claim_output_dir(out: Path, run: dict[str, Any] | None = None) -> None:
    """Write the job marker of ``out`` (:data:`JOB_MARKER`): ``run`` (the run's id and status,
    :func:`start_run`) and, in a Hydra multirun, the sweep's folder and the job's number. In a
    multirun, refuse first, before any training, a folder that another job of the same sweep
    marked: an interpolated ``output_dir`` that does not differ between the jobs (``output_dir``
    without interpolation is refused by :func:`~lightning_influence.config.check_output_dir` in
    every job). The same job run again (same sweep folder and number) may reuse its folder.
    Outside a multirun without ``run``: nothing."""
    job = _multirun_job()
    if not job and run is None:
        return
    previous = read_job_marker(out)
    if job and previous is not None and previous.get("sweep_dir") == job["sweep_dir"] and previous.get("job_num") != job["job_num"]:
        raise ValueError(
            f"output_dir resolves to {out}, the output folder of job {previous.get('job_num')} of this multirun "
            f"({job['sweep_dir']}): job {job['job_num']} would write its outputs over that job's. Give each job its own "
            "folder: output_dir=null (each job writes into its own folder under hydra.sweep.dir), or a path that differs "
            "between the jobs, e.g. with ${hydra:job.num}"
        )
    atomic_write_bytes(out / JOB_MARKER, (json.dumps({**job, **(run or {})}, indent=2) + "\n").encode())


def start_run(out: Path) -> dict[str, Any]:
    """On global rank zero, before any training: mark ``out`` as the folder of a new run (a fresh
    run id, status ``running``, the start time; :func:`claim_output_dir`). From then on, outputs
    of an earlier run in that folder are not taken as this run's: :func:`write_outputs` writes the
    run id into ``report.json`` and sets the status to ``finished``; a failed run sets it to
    ``failed`` (:func:`fail_run`); the aggregation skips a report whose run id is not the
    marker's. The earlier files are left as they are. Returns the run's record."""
    run = {"run_id": uuid.uuid4().hex, "status": "running", "started": _now(), "hydra_config_sha256": hydra_config_digest()}
    claim_output_dir(out, run)
    _RUNS[str(out)] = run
    return run


def end_run(out: Path) -> None:
    """Forget this process's record of the run with output folder ``out`` (:func:`start_run`)."""
    _RUNS.pop(str(out), None)


def fail_run(out: Path, err: BaseException) -> list[str]:
    """After a failed run with output folder ``out`` (on global rank zero): the job marker says
    ``failed`` (when this run had marked the folder, :func:`start_run`), and a warning names the
    recipe outputs there, which are an earlier run's, not this one's. Returns their names."""
    if not is_global_zero():
        return []
    run = _RUNS.get(str(out))
    if run is not None and run["status"] == "finished":  # failed after writing its outputs: they are its own
        return []
    marker = read_job_marker(out) if run is not None else None
    if run is not None and marker is not None and marker.get("run_id") == run["run_id"]:
        run["status"] = "failed"
        with contextlib.suppress(OSError):
            marker.update(status="failed", ended=_now(), error=f"{type(err).__name__}: {err}"[:2000])
            atomic_write_bytes(out / JOB_MARKER, (json.dumps(marker, indent=2) + "\n").encode())
    earlier = stale_outputs(out, []) if out.is_dir() else []
    if earlier:
        warnings.warn(
            f"the run failed; {out} holds outputs of an earlier run, not of this one: {', '.join(earlier)}. They are left as "
            f"they were{' and its job marker ' + JOB_MARKER + ' says this run failed (aggregate skips the folder)' if run else ''}; "
            "delete them or use a fresh output folder (hydra.run.dir=... or output_dir=...), so that they are not read as this run's",
            UserWarning,
            stacklevel=2,
        )
    return earlier


def stale_outputs(out: Path, written: Iterable[str]) -> list[str]:
    """The recipe outputs in ``out`` (:data:`RECIPE_OUTPUTS` and the files the previous
    ``report.json`` lists) that are not among ``written``: left there by an earlier run."""
    names = set(RECIPE_OUTPUTS)
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        previous = json.loads((out / "report.json").read_text()).get("files") or {}
        names |= {str(v) for v in previous.values() if isinstance(v, str) and "/" not in v and "\\" not in v}
    return sorted(n for n in names - set(written) if (out / n).is_file())


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__}


def sample_rows(dataset: Any, ids: Tensor, values: Tensor, flipped: set[int] | None = None) -> list[dict[str, Any]]:
    """Report rows ``{id, score, label, flipped}`` for the given samples."""
    labels = labels_of(dataset, ids.tolist())
    return [
        {"id": int(i), "score": float(v), "label": y, "flipped": (int(i) in flipped) if flipped is not None else None}
        for i, v, y in zip(ids.tolist(), values.tolist(), labels, strict=True)
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.value
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


#: Lists of more integers than this (sample ids) take one line each in ``report.json``.
_COMPACT_INTS = 8


def report_json(report: dict[str, Any]) -> str:
    """``report`` as the text of ``report.json``: indented JSON, NaN and infinities as ``null``,
    and every list of more than a few integers (the sample ids of the removed, kept or deleted
    sets) on one line, so that ids take about as much room as in ``scores.csv``, not a line each."""
    token = f"@@ids-{uuid.uuid4().hex}-"
    lines: list[str] = []

    def lift(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: lift(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            if len(value) > _COMPACT_INTS and all(type(v) is int for v in value):
                lines.append(json.dumps(list(value)))
                return f"{token}{len(lines) - 1}"
            return [lift(v) for v in value]
        return value

    text = json.dumps(lift(_finite(report)), indent=2, allow_nan=False, default=_json_default)
    for i, line in enumerate(lines):
        text = text.replace(f'"{token}{i}"', line, 1)
    return text + "\n"


def write_outputs(out: Path, cfg: DictConfig, report: dict[str, Any], scores: InfluenceScores | None) -> None:
    """On global rank zero: ``scores.pt`` (+ ``scores.csv``), ``config.yaml`` and ``report.json``,
    each atomically; ``report["run"]`` is the run's id (:func:`start_run`) and the job marker then
    says ``finished``. Files of an earlier run in the same folder that this run did not write are
    left as they are, named in ``report["stale_files"]`` and in a warning."""
    if not is_global_zero():
        return
    run = _RUNS.get(str(out)) or start_run(out)  # a caller that did not go through prepare: a run of its own
    files = report.setdefault("files", {})
    stale = stale_outputs(out, files.values())
    report["stale_files"] = stale
    report["run"] = {"id": run["run_id"], "started": run["started"], "hydra_config_sha256": run["hydra_config_sha256"]}
    if scores is not None:
        scores.save(out / "scores.pt")
        scores.to_csv(out / "scores.csv")
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    atomic_write_bytes(out / "report.json", report_json(report).encode())
    marker = read_job_marker(out) or {}
    run.update(status="finished", ended=_now())
    atomic_write_bytes(out / JOB_MARKER, (json.dumps({**marker, **run}, indent=2) + "\n").encode())
    if stale:
        warnings.warn(
            f"{out} holds files of an earlier run that this {report.get('recipe', 'recipe')} run did not write: "
            f"{', '.join(stale)}. They are left as they were; use a fresh output folder (hydra.run.dir=... or "
            "output_dir=...) or delete them, so that they are not read as this run's",
            UserWarning,
            stacklevel=2,
        )
