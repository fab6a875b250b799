"""Pieces every recipe shares: the scoring run (fit with the estimator, then score), fresh
retraining on a kept subset, the target loss, rank-zero file output and small statistics.

Sign and units: a score is the predicted change of the target loss when the sample is removed
from training (positive helps, negative hurts). Coreset baselines keep the direction: higher
means more worth keeping (their metadata says ``higher_means``).

Before the scoring run, :func:`preflight` refuses what would otherwise fail only after training
(a Trainer that runs no step, a metric the model does not log, sizes beyond the data, estimator
options that do not fit the model) with a one-step trial fit on one device.

Distributed runs (``trainer=ddp``): every process runs the whole recipe (fits, scoring and
retraining take part in the collectives; each process runs its own one-device trial fit); only
global rank zero creates folders and writes files, and the rank-zero-only code calls no
collective. A training loader that does not shuffle keeps its order there
(:func:`distributed_train_loader`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler, Subset

from lightning_influence.config import (
    EstimatorConfig,
    check_estimator_target,
    check_output_dir,
    estimator_defaults,
    estimator_option_names,
    estimator_params,
    in_multirun,
    refused_config,
)
from lightning_influence.estimators.base import REGISTRY, Estimator, Target, build, estimator_class
from lightning_influence.scores import InfluenceScores, atomic_write_bytes, check_writable
from lightning_influence.validation import did_you_mean

__all__ = [
    "ScoredRun",
    "Preflight",
    "is_global_zero",
    "output_dir",
    "prepare",
    "harmonise_precision",
    "check_training_steps",
    "check_estimator",
    "predicts_removal",
    "removal_effect_estimators",
    "require_removal_scores",
    "preflight",
    "check_estimator_on_model",
    "target_subset",
    "distributed_train_loader",
    "user_callbacks",
    "make_trainer",
    "fit_and_score",
    "runs_in_this_process",
    "world_size_of",
    "ranking",
    "require_finite",
    "make_target",
    "train_dataset",
    "labels_of",
    "subset_datamodule",
    "retrain_fresh",
    "model_target_loss",
    "target_batches",
    "final_loss_scores",
    "summary",
    "paired_difference",
    "write_outputs",
    "sample_rows",
    "versions",
    "RECIPE_OUTPUTS",
    "check_outputs_writable",
    "claim_output_dir",
    "make_output_dir",
    "start_run",
    "fail_run",
    "end_run",
    "read_job_marker",
    "hydra_config_digest",
    "JOB_MARKER",
]


def is_global_zero() -> bool:
    """Is this process global rank zero (``True`` outside distributed runs)?"""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


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
    import uuid

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


# Lightning's precision names (and its aliases) -> the dtype the module's parameters train in.
_PRECISION_ALIASES = {"64": "64-true", "double": "64-true", "32": "32-true", "16": "16-mixed", "half": "16-mixed", "bf16": "bf16-mixed"}
_TRUE_PRECISION_DTYPES = {"64-true": "float64", "32-true": "float32", "16-true": "float16", "bf16-true": "bfloat16"}


def harmonise_precision(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data.dtype`` and ``trainer.precision`` made to agree, so that the model and
    its inputs share one dtype in every evaluation the recipes make outside Lightning's precision
    plugin (scores, target losses, retraining). A ``*-true`` precision with the default
    ``data.dtype=float32`` makes the data follow it (``64-true``: float64 data);
    ``data.dtype=float64`` with the default ``32-true`` makes the Trainer train in ``64-true``.
    Other disagreements (float64 data with mixed precision, half data in float32, ...) are refused
    with a message. A datamodule without a ``dtype`` argument is left alone."""
    data, trainer = cfg.get("data"), cfg.get("trainer")
    if not isinstance(data, DictConfig) or not isinstance(trainer, DictConfig) or "dtype" not in data:
        return cfg
    raw = trainer.get("precision")
    precision = _PRECISION_ALIASES.get(str(raw), str(raw)) if raw is not None else "32-true"
    dtype = str(data.dtype)
    weights = _TRUE_PRECISION_DTYPES.get(precision, "float32")  # mixed precision keeps float32 weights
    if dtype == weights:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        if dtype == "float32" and precision in _TRUE_PRECISION_DTYPES:
            cfg.data.dtype = weights
            note = f"trainer.precision={raw}: the data follow, data.dtype={weights}"
        elif precision == "32-true" and dtype == "float64":
            cfg.trainer.precision = "64-true"
            note = "data.dtype=float64: the model follows, trainer.precision=64-true"
        else:
            raise ValueError(
                f"data.dtype={dtype} does not match trainer.precision={raw} (the model trains in {weights}): the recipes "
                "evaluate the model on the data outside Lightning's precision plugin. Use data.dtype=float64 with "
                f"trainer.precision=64-true, or data.dtype={weights} with trainer.precision={raw}"
            )
    if is_global_zero():
        print(note, flush=True)
    return cfg


def check_training_steps(cfg: DictConfig) -> None:
    """Refuse, before any training, a Trainer config that runs no training step (the scores and
    the retrained models would be those of the untrained network)."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            raise ValueError(
                f"trainer.{key}={value} runs no training step: there is no training to score or to retrain. "
                f"Set trainer.{key} to a positive value{' (or -1: no limit)' if key == 'max_steps' else ''}"
            )
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and max_epochs < 0:
        bounded = (isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0) or trainer.get("max_time") is not None
        if not bounded:
            steps = "trainer.max_steps is not set" if max_steps is None else f"trainer.max_steps={max_steps} (no limit)"
            raise ValueError(
                f"trainer.max_epochs={max_epochs} trains without end (no epoch limit) and nothing else bounds the run: "
                f"{steps} and neither is trainer.max_time. The scoring fit and every retraining would "
                "never finish. Set trainer.max_epochs to a positive number of epochs, or bound the run with "
                "trainer.max_steps=<optimizer steps> (or trainer.max_time)"
            )


@dataclass
class Preflight:
    """What a recipe checks before its scoring run: the datamodule (set up), the training set's
    size, the size of the validation set (``None`` without one) and the metrics the model logs."""

    datamodule: Any
    num_train: int
    num_val: int | None
    metrics: set[str]


def preflight(
    cfg: DictConfig, out: Path, metric: str | None = None, target: str | None = None, target_samples: int | None = None,
    ids_are_positions: bool = True,
) -> Preflight:
    """Check what would otherwise fail only after training time was spent: a Trainer config that
    runs no step; then a one-step trial fit on one device in this process (one training,
    validation and test batch, the user's callbacks, no estimator) of a fresh model, which sets
    up the datamodule, runs the model on the data, and tells which metrics the model logs, so
    that a misspelt ``metric`` and a ``target_samples`` larger than the target are refused here;
    the estimator options that depend on the model (``params`` patterns that match none of its
    parameters, ``solver=exact`` above the size limit) are refused on the trial model too
    (:func:`check_estimator_on_model`). ``ids_are_positions``: the recipe reads samples by id as
    positions of the training set (retraining on subsets, labels for its report), which is
    checked (:func:`check_ids_are_positions`). Returns the datamodule (reused by the scoring run)
    and the sizes the recipe checks its own values against. What the trial refuses is raised as
    :class:`~lightning_influence.config.SetupRefused` (one line on the command line)."""
    check_training_steps(cfg)
    try:
        return _trial(cfg, out, metric, target, target_samples, ids_are_positions)
    except (ValueError, TypeError) as err:
        if not _raised_by_library(err):
            raise  # a fault in the user's code (a dataset, a model): its traceback is what helps
        raise refused_config(err, setup=True) from err


_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _raised_by_library(err: BaseException) -> bool:
    """Whether ``err`` was raised in this package's code (one of its refusals, with the fix in its
    message), not in the user's code, Lightning's or torch's."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _trial(
    cfg: DictConfig, out: Path, metric: str | None, target: str | None, target_samples: int | None, ids_are_positions: bool
) -> Preflight:
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    # One device in this process, whatever the strategy: no worker processes to start for a trial
    # (each DDP rank runs its own); this rank's device where ranks share a machine.
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    local_rank = os.environ.get("LOCAL_RANK")
    devices: Any = [int(local_rank)] if local_rank is not None and accelerator not in ("cpu", "auto") else 1
    trial = dict(
        max_epochs=1, max_steps=1, limit_train_batches=1, limit_val_batches=1, limit_test_batches=1, val_check_interval=1.0,
        check_val_every_n_epoch=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        strategy="auto", devices=devices, num_nodes=1, sync_batchnorm=False,
    )
    with quiet_lightning():
        trainer = make_trainer(cfg, out / "retraining", overrides=trial)
        trainer.fit(model, datamodule=datamodule)
        metrics = {k for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if is_overridden("test_dataloader", datamodule, L.LightningDataModule):
            results = trainer.test(model, datamodule=datamodule, verbose=False)
            metrics.update(results[0] if results else {})
    if cfg.get("estimator") is not None:
        check_estimator_on_model(estimator_params(cfg.estimator), model, next(iter(datamodule.train_dataloader()), None))
    if ids_are_positions:
        check_ids_are_positions(model, datamodule)
    num_train = len(train_dataset(datamodule))
    num_val = None
    if is_overridden("val_dataloader", datamodule, L.LightningDataModule):
        with contextlib.suppress(TypeError, AttributeError):
            num_val = len(datamodule.val_dataloader().dataset)
    if metric is not None and metric not in metrics:
        raise ValueError(
            f"recipe.metric={metric!r} is not logged by the model: a one-step trial run logged {sorted(metrics)}. "
            "Set recipe.metric to one of them"
        )
    if target_samples is not None:
        available = num_train if target == "train" else num_val
        if available is not None and target_samples > available:
            raise ValueError(
                f"recipe.target_samples={target_samples} exceeds the {available} samples of the {target} target; "
                f"lower it to at most {available}, or null for the whole target"
            )
    return Preflight(datamodule, num_train, num_val, metrics)


def check_ids_are_positions(model: L.LightningModule, datamodule: Any, probes: int = 64) -> None:
    """The recipes retrain on subsets of the training set taken by position, and read labels by
    position: sample id ``i`` must be item ``i`` of the training dataset (as
    :class:`~lightning_influence.IndexedDataset` gives). Checked on every id of a ``TensorDataset``
    read by the default ``sample_ids``, else on the first, the last and ``probes`` random items
    (collated and read with ``model.sample_ids``): ids kept from before a shuffle, or positions
    of the full set inside a ``Subset`` (``random_split``) would retrain without other samples
    than the ones scored."""
    from torch.utils.data import TensorDataset
    from torch.utils.data._utils.collate import default_collate

    from lightning_influence.data import IndexedDataset
    from lightning_influence.mixin import InfluenceMixin

    loader = datamodule.train_dataloader()
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, (IndexedDataset, IterableDataset)):
        return
    n = len(dataset)
    if n == 0:
        return
    if isinstance(dataset, TensorDataset) and getattr(type(model), "sample_ids", None) is InfluenceMixin.sample_ids:
        positions, ids = torch.arange(n), dataset.tensors[-1].reshape(-1).long().cpu()
    else:
        drawn = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:probes].tolist()
        positions = torch.tensor(sorted({0, n - 1, *drawn}))
        collate = getattr(loader, "collate_fn", None) or default_collate
        size = max(int(getattr(loader, "batch_size", None) or 1), 1)  # as the loader collates: a collate may need its batch size
        chunks = [positions[i : i + size] for i in range(0, positions.numel(), size)]
        ids = torch.cat([
            torch.as_tensor(model.sample_ids(collate([dataset[int(i)] for i in chunk]))).reshape(-1).long().cpu()  # type: ignore[operator]
            for chunk in chunks
        ])
    if ids.shape == positions.shape and torch.equal(ids, positions):
        return
    if ids.shape != positions.shape:
        found = f"{ids.numel()} ids for {positions.numel()} items"
    else:
        first = int((ids != positions).nonzero()[0, 0])
        found = f"item {int(positions[first])} carries sample id {int(ids[first])}"
    raise ValueError(
        f"the recipes take samples by position (retraining keeps the items at the positions of the kept ids, and labels "
        f"are read by position), so sample id i must be item i of the training dataset, but {found} "
        f"({type(dataset).__name__} of {n} items). Wrap the training dataset in lightning_influence.IndexedDataset (after "
        "any split: a Subset of an IndexedDataset carries the full set's positions), or make sample_ids(batch) return "
        "positions in the training dataset"
    )


def _parameter_summary(model: torch.nn.Module, shown: int = 8) -> str:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = ", ".join(n for n, _ in named[:shown]) + (", ..." if len(named) > shown else "")
    return f"{type(model).__name__} with {sum(p.numel() for _, p in named)} trainable values in {len(named)} tensors: {names}"


def check_estimator_on_model(est: EstimatorConfig, model: torch.nn.Module, batch: Any = None) -> None:
    """Refuse, on the trial ``model`` (a model of the configured architecture) and one training
    ``batch``, the estimator options that its ``scores()`` would refuse only after the whole
    scoring fit (:meth:`~lightning_influence.estimators.base.Estimator.check_module`: ``params``
    patterns that match nothing, an explicit ``exact`` solve above its size limit, K-FAC on
    layers it does not factor, an output split or class scores the model does not give). Cheap:
    no gradient, no curvature. Raises ``ValueError`` (``TypeError`` for a missing method) as
    ``estimator=<name> refused the one-step trial model (<its parameters>) ...``. Recording
    estimators (DiffIn, TracIn) check their options against the model when the scoring fit
    starts, before its first step."""
    estimator = build(est.name, **est.options)
    try:
        estimator.check_module(model, batch)
    except (ValueError, TypeError) as err:
        hint = ""
        if "matches params=" in str(err):
            first = next((n for n, p in model.named_parameters() if p.requires_grad), "")
            example = f" (e.g. ['{first.rsplit('.', 1)[0]}.*'])" if "." in first else ""
            hint = f"; set estimator.options.params to patterns of these names{example}, or null for all"
        raise type(err)(
            f"estimator={est.name} refused the one-step trial model ({_parameter_summary(model)}) with its estimator.options, "
            f"before the scoring fit: {err}{hint}"
        ) from err


def user_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Fresh instances of the ``callbacks`` group: a mapping ``name -> _target_ node`` (or a list)."""
    node = cfg.get("callbacks")
    if node is None:
        return []
    items = list(node.values()) if isinstance(node, DictConfig) else list(node) if isinstance(node, ListConfig) else None
    if items is None:
        raise TypeError(f"callbacks must be a mapping or a list of _target_ nodes, got {type(node).__name__}")
    result = []
    for item in items:
        if item is None:
            continue
        callback = instantiate(item)
        if not isinstance(callback, L.Callback):
            raise TypeError(f"callbacks entry {OmegaConf.to_yaml(item).strip()!r} gave a {type(callback).__name__}, not a lightning Callback")
        result.append(callback)
    return result


def make_trainer(cfg: DictConfig, out: Path, extra: Sequence[L.Callback] = (), overrides: dict[str, Any] | None = None) -> L.Trainer:
    """A fresh Trainer from ``cfg.trainer`` (with ``overrides``) with the user's callbacks plus
    ``extra``; ``default_root_dir`` is ``out`` unless the config sets it."""
    kwargs: dict[str, Any] = {"callbacks": [*user_callbacks(cfg), *extra], **(overrides or {})}
    if cfg.trainer.get("default_root_dir") is None:
        kwargs["default_root_dir"] = str(out)
    return instantiate(cfg.trainer, **kwargs)


def make_target(kind: str, datamodule: Any, sample_count: int | None = None, seed: int = 0) -> Target:
    """The :class:`Target` of a recipe: ``"val"`` (the datamodule's validation loader) or ``"train"``."""
    if kind == "val":
        return Target("val", datamodule.val_dataloader(), sample_count=sample_count, seed=seed)
    return Target("train", sample_count=sample_count, seed=seed)


def train_dataset(datamodule: Any) -> Any:
    """The training dataset (item ``i`` carries sample id ``i``; see :class:`~lightning_influence.IndexedDataset`)."""
    dataset = getattr(datamodule, "train_set", None)
    return dataset if dataset is not None else datamodule.train_dataloader().dataset


def labels_of(dataset: Any, ids: Iterable[int]) -> list[int | None]:
    """Class label of each sample: item ``(x, y, index)`` or ``{"label"|"labels"|"y"|"target": ...}``."""
    labels: list[int | None] = []
    for i in ids:
        item = dataset[int(i)]
        if isinstance(item, dict):
            y = next((item[k] for k in ("label", "labels", "y", "target") if k in item), None)
        elif isinstance(item, (tuple, list)) and len(item) >= 3:
            y = item[1]
        else:
            y = None
        labels.append(int(y) if y is not None and torch.as_tensor(y).numel() == 1 else None)
    return labels


@dataclass
class ScoredRun:
    """The scoring run: ``column`` holds one score per id of ``ids`` (a query target's columns
    summed), in ascending id order, so that rankings break ties by sample id (:func:`ranking`)."""

    datamodule: Any
    model: L.LightningModule
    trainer: L.Trainer
    estimator: Estimator
    scores: InfluenceScores
    ids: Tensor
    column: Tensor
    fit_seconds: float
    score_seconds: float
    callbacks: list[L.Callback] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(train_dataset(self.datamodule))


def predicts_removal(name: str) -> bool:
    """Does the estimator registered under ``name`` predict the change of the target loss when a
    sample is removed (the library's sign and units), rather than rank samples by some other
    measure (:attr:`~lightning_influence.estimators.Estimator.predicts_removal`)?"""
    return estimator_class(name).predicts_removal


def removal_effect_estimators() -> list[str]:
    """The registered estimators whose scores are predicted removal effects (:func:`predicts_removal`);
    one whose module cannot be imported (a missing optional dependency) is left out."""
    names = []
    for name in sorted(REGISTRY):
        with contextlib.suppress(ImportError, AttributeError, TypeError):
            if predicts_removal(name):
                names.append(name)
    return names


def require_removal_scores(name: str, options: dict[str, Any], recipe: str, predicted: bool = False) -> None:
    """Cleaning and deletion act on removal effects (lowest = most harmful): refuse, before any
    training, an estimator whose scores rank samples for a coreset instead. With ``predicted``
    (the deletion recipe, which sums scores into predicted target-loss changes), also refuse
    every ranking that is not a predicted removal effect (:func:`predicts_removal`: the final
    loss, outlier gradients, random numbers), naming the estimators that are."""
    if predicted and not predicts_removal(name):
        keeping = estimator_class(name).ranks_for_keeping
        kind = "ranks samples for a coreset (higher = harder, more worth keeping)" if keeping else "ranks samples"
        where = "recipe=coreset" if keeping else "recipe=cleaning or recipe=coreset, which act on rankings"
        raise ValueError(
            f"estimator {name!r} {kind} in its own units: its scores are not predicted changes of the target loss when a "
            f"sample is removed, so the {recipe} recipe's predicted change of a set (the sum of its scores) and its "
            f"comparison with the actual change would mean nothing. Use an estimator that predicts removal effects: "
            f"{', '.join(removal_effect_estimators())}; {name} belongs in {where}"
        )
    if estimator_class(name).ranks_for_keeping:
        raise ValueError(
            f"estimator {name!r} ranks samples for a coreset (higher = harder, more worth keeping, in its own units), "
            f"not by the effect of their removal: the {recipe} recipe would take its lowest scores, the easiest samples, "
            "for the most harmful. Use it with recipe=coreset, or here an influence estimator (diffin, tracin, ...), "
            "loss or outlier_gradient"
        )


def check_estimator(est: EstimatorConfig, target: Any, target_samples: int | None = None, seed: int | None = None) -> None:
    """Check the estimator config before the data are set up and anything trains: its options
    (those it sets, and the constructor defaults of those it does not) agree with
    ``recipe.target`` / ``recipe.target_samples`` and, with a target subset, the recipe's ``seed``
    (:func:`~lightning_influence.config.check_estimator_target`), and the estimator and its
    training callback (for the recording estimators, where most options are checked) construct
    from them -- cheap, no data, no training. A refused option is named as ``estimator.options``,
    with where it came from when a preset (``experiment=...``) set it."""
    check_estimator_target(est, target, target_samples, seed)
    try:
        build(est.name, **est.options).callback()
    except ValueError as err:
        raise ValueError(f"estimator={est.name}: estimator.options refused: {err}") from err
    except TypeError as err:
        raise TypeError(f"estimator={est.name}: estimator.options refused: {err}{_option_hint(est, err)}") from err


def _option_hint(est: EstimatorConfig, err: TypeError) -> str:
    """For an option the estimator does not take (``has no option 'windw'``, or Python's
    ``unexpected keyword argument 'windw'``): the closest of its options (those its config sets
    and its constructor's arguments) as ``estimator.options.<name>``, where the option came from
    when the command line did not set it (:func:`_option_source`), and how to remove it."""
    text = str(err)
    found = re.search(r"has no option '([^']+)'", text) or re.search(r"unexpected keyword argument '([^']+)'", text)
    if found is None:
        return ""
    key = found.group(1)
    known = [n for n in estimator_option_names({"name": est.name, "options": est.options}) if n != key]
    known += [n for n in estimator_defaults(est.name) if n not in known and n != key]
    hint = did_you_mean(key, known, "", prefix="estimator.options.")
    source = _option_source(key)
    remove = f"Remove the option with ~estimator.options.{key} on the command line{' (or drop it from the config that sets it)' if source else ''}"
    return f"; {hint} {source}{remove}" if hint else f". {source}{remove}"


def _option_source(key: str) -> str:
    """Where ``estimator.options.<key>`` came from, when the command line did not set it: the
    preset (``experiment=<name>``) that sets it, else the configs of the defaults list. Empty
    outside a Hydra run, or when a command-line override sets the key."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    runtime = HydraConfig.get()
    path = f"estimator.options.{key}"
    if any(str(o).lstrip("+~").split("=", 1)[0] == path for o in runtime.overrides.task):
        return ""
    choices = runtime.runtime.choices
    experiment, estimator = choices.get("experiment"), choices.get("estimator")
    if experiment and _preset_sets(str(experiment), path):
        return (
            f"The command line does not set {path}: the preset experiment={experiment} does (for the estimator it was "
            f"written for), and estimator={estimator} does not take it. "
        )
    where = f"experiment={experiment}, " if experiment else ""
    return f"The command line does not set {path}: a config of the defaults list does ({where}estimator={estimator}, ...). "


def _preset_sets(experiment: str, path: str) -> bool:
    """Does the shipped preset ``conf/experiment/<experiment>.yaml`` set the key ``path``?"""
    from importlib import resources

    try:
        text = resources.files("lightning_influence.conf").joinpath("experiment", f"{experiment}.yaml").read_text()
        return OmegaConf.select(OmegaConf.create(text), path, default=None) is not None
    except Exception:  # not a shipped preset (a user's, on the search path), or unreadable
        return False


def fit_and_score(
    cfg: DictConfig,
    out: Path,
    target_kind: str,
    target_samples: int | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
    datamodule: Any = None,
) -> ScoredRun:
    """Seed, instantiate data (unless ``datamodule`` is given, e.g. :func:`preflight`'s) / model /
    estimator, ``fit`` with the estimator's callback (and ``extra_callbacks``), then score every
    training sample for the ``target_kind`` target."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if datamodule is None:
        datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    params = estimator_params(cfg.estimator)
    estimator = build(params.name, **params.options)
    recording = estimator.callback()
    extra = [*([recording] if recording is not None else []), *extra_callbacks]
    trainer = make_trainer(cfg, out, extra)
    start = time.perf_counter()
    with train_loader_in_order(datamodule):
        trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    if runs_in_this_process(trainer) and trainer.global_step == 0:
        raise RuntimeError(
            "the scoring fit ran no optimizer step (trainer.max_epochs, max_steps, max_time, limit_train_batches or a "
            "callback stopped it before the first step): there is no training to score. Let it train at least one step"
        )
    if hasattr(datamodule, "setup"):
        # Under ddp_spawn the datamodule was set up in the worker processes only; setup is idempotent.
        datamodule.setup("fit")
    start = time.perf_counter()
    target = make_target(target_kind, datamodule, target_samples, int(cfg.seed))
    scores = estimator.scores(model, datamodule.train_dataloader(), target)
    score_seconds = time.perf_counter() - start
    if len(scores) == 0:
        raise RuntimeError(f"estimator {params.name!r} scored no training sample (did fit run any training step?)")
    column = scores.values if scores.values.dim() == 1 else scores.values.sum(dim=1)
    require_finite(column, scores.ids, f"estimator {params.name!r}", "training diverged or the estimator failed")
    by_id = torch.argsort(scores.ids, stable=True)  # ranks break ties by position: make that the id, whatever the estimator's order
    return ScoredRun(datamodule, model, trainer, estimator, scores, scores.ids[by_id], column[by_id], fit_seconds, score_seconds, extra)


def world_size_of(cfg: DictConfig) -> int:
    """The number of processes the configured Trainer trains with (``trainer.world_size``: devices
    x nodes, ``devices=auto`` resolved), from a Trainer built here and never run: no process is
    started, no callback or logger is made, nothing trains, and torch's determinism flags are left
    as they are (``deterministic=None``)."""
    with quiet_lightning():
        trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False, default_root_dir=None, deterministic=None)
    return max(int(getattr(trainer, "world_size", 1) or 1), 1)


def ranking(column: Tensor, descending: bool = False) -> Tensor:
    """Positions of ``column`` in ascending order (``descending``: highest first), NaN last in
    both directions (as :meth:`~lightning_influence.InfluenceScores.most_helpful`), ties in
    position order (ascending sample id for a :class:`ScoredRun`'s column). ``torch.argsort(descending=True)`` would put NaN first."""
    # ascending order puts NaN last; negating ranks the highest first and keeps ties in order
    return torch.argsort(-column if descending else column, stable=True)


def require_finite(column: Tensor, ids: Tensor, what: str, why: str) -> None:
    """Refuse a score column with NaN or infinite values, saying how many and which samples: the
    recipes rank, remove, keep and sum every score, so the run stops here, after the scoring fit
    and before any detection, selection or retraining."""
    bad = ~torch.isfinite(column)
    if not bool(bad.any()):
        return
    nan, inf = int(torch.isnan(column).sum()), int(torch.isinf(column).sum())
    first = ids[bad][:5].tolist()
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    raise FloatingPointError(
        f"{what} gave {' and '.join(p for p in parts if p)} of its {column.numel()} scores (sample ids "
        f"{', '.join(str(i) for i in first)}{', ...' if int(bad.sum()) > len(first) else ''}): {why}. The recipe acts on "
        "every score (a NaN has no rank), so it stops before detection, selection and retraining; look for a diverging "
        "run (a lower learning rate, gradient clipping) or a non-finite input or loss in those samples"
    )


def runs_in_this_process(trainer: L.Trainer) -> bool:
    """Did this process run the fit itself (one device, or DDP re-running the script), so that the
    Trainer's step count is the fit's? Under spawn launchers the workers ran it."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is None:
        return True
    try:
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    except ImportError:  # pragma: no cover - lightning moved it: skip the check
        return False
    return isinstance(launcher, _SubprocessScriptLauncher)


def target_subset(kind: str, batches: list[Any], sample_count: int | None, seed: int, sample_ids: Any = None) -> list[Any]:
    """The target ``batches`` restricted to the ``sample_count`` samples the estimators score
    against (``recipe.target_samples``): the same draw as :class:`~lightning_influence.targets.TargetGradient`
    (by position in loader order, or by sample id with ``sample_ids``, e.g. for ``"train"``).
    Without ``sample_count``: ``batches`` as they are."""
    if sample_count is None:
        return batches
    from lightning_influence.batches import batch_size, select_samples
    from lightning_influence.targets import TargetGradient

    chooser = TargetGradient(kind, lambda: batches, sample_count=sample_count, seed=seed, sample_ids=sample_ids)  # type: ignore[arg-type]
    chooser._resolve_subset()  # the estimators' own draw, so the subsets cannot drift apart
    subset = chooser.subset
    assert subset is not None
    kept, position = [], 0
    for batch in batches:
        size = batch_size(batch, "target batch")
        if sample_ids is not None:
            rows = torch.isin(torch.as_tensor(sample_ids(batch)).reshape(-1).cpu(), subset).nonzero().reshape(-1)
        else:
            rows = subset[(subset >= position) & (subset < position + size)] - position
        position += size
        if rows.numel():
            kept.append(select_samples(batch, rows, size))
    return kept


# ---------------------------------------------------------------------- data order under DDP
def _is_shuffled(loader: DataLoader) -> bool:
    """Does the loader shuffle (a ``RandomSampler``; a custom sampler counts as shuffling)?"""
    return not isinstance(loader.sampler, SequentialSampler)


def distributed_train_loader(loader: Any, trainer: Any) -> Any:
    """Lightning gives the training loader of a multi-process run a ``DistributedSampler`` that
    shuffles, whatever the loader's own sampler; for a loader that does not shuffle
    (``data.shuffle=false``) this returns the loader with ``DistributedSampler(shuffle=False)``,
    which Lightning keeps: every rank reads its shard in dataset order. Other loaders (shuffled,
    custom samplers or batch samplers, iterable datasets) and one-process runs: unchanged."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    connector = getattr(trainer, "_accelerator_connector", None)
    if not kwargs or not getattr(connector, "use_distributed_sampler", True):
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if _is_shuffled(loader) or type(loader.batch_sampler) is not BatchSampler:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=DistributedSampler(loader.dataset, shuffle=False, **kwargs),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


def _train_loader_in_order(datamodule: Any) -> Any:
    return distributed_train_loader(type(datamodule).train_dataloader(datamodule), getattr(datamodule, "trainer", None))


@contextlib.contextmanager
def train_loader_in_order(datamodule: Any) -> Iterator[None]:
    """During the block, ``datamodule.train_dataloader()`` goes through :func:`distributed_train_loader`
    (an instance attribute, removed afterwards), so that a fit under DDP honours a loader that
    does not shuffle."""
    patch = isinstance(datamodule, L.LightningDataModule) and "train_dataloader" not in vars(datamodule)
    if patch:
        datamodule.train_dataloader = functools.partial(_train_loader_in_order, datamodule)
    try:
        yield
    finally:
        if patch:
            vars(datamodule).pop("train_dataloader", None)


# ---------------------------------------------------------------------- retraining
def subset_datamodule(base: Any, keep_ids: Sequence[int] | Tensor, seed: int) -> L.LightningDataModule:
    """A datamodule training on the samples ``keep_ids`` of ``base``'s training set (ids kept:
    items are taken from the same dataset), shuffled with ``seed`` when ``base``'s training
    loader shuffles (else in ``keep_ids`` order, also under DDP: see
    :func:`distributed_train_loader`); validation and test loaders are ``base``'s. Sample id
    ``i`` must be position ``i`` of the training dataset, as with
    :class:`~lightning_influence.IndexedDataset`."""
    keep = [int(i) for i in (keep_ids.tolist() if isinstance(keep_ids, Tensor) else keep_ids)]
    if not keep:
        raise ValueError("retraining needs at least one kept sample")
    hooks = {"val_dataloader", "test_dataloader"}
    present = {h for h in hooks if is_overridden(h, base, L.LightningDataModule)}

    def setup(self: Any, stage: str | None = None) -> None:
        if hasattr(base, "setup"):
            base.setup(stage)

    def train_dataloader(self: Any) -> DataLoader:
        loader = base.train_dataloader()
        dataset = loader.dataset
        if max(keep) >= len(dataset) or min(keep) < 0:
            raise ValueError(f"kept sample ids reach {max(keep)}, beyond the training set of {len(dataset)} samples")
        shuffle = not isinstance(loader, DataLoader) or _is_shuffled(loader)
        subset = DataLoader(
            Subset(dataset, keep),
            batch_size=loader.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            drop_last=loader.drop_last,
            pin_memory=loader.pin_memory,
        )
        return distributed_train_loader(subset, getattr(self, "trainer", None))

    methods: dict[str, Any] = {
        "setup": setup,
        "train_dataloader": train_dataloader,
        # The class is made here, so pickling (ddp_spawn sends the datamodule to its workers)
        # rebuilds the instance through this function instead of looking the class up by name.
        "__reduce__": lambda self: (subset_datamodule, (base, keep, seed)),
    }
    for hook in present:
        methods[hook] = lambda self, _h=hook: getattr(base, _h)()
    cls = type(f"Subset{type(base).__name__}", (L.LightningDataModule,), methods)
    return cls()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer info lines (devices, tips, "fit stopped") off for the many
    retraining runs; warnings still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def retrain_fresh(
    cfg: DictConfig,
    datamodule: Any,
    keep_ids: Sequence[int] | Tensor,
    seed: int,
    out: Path,
    target_loaders: dict[str, Iterable[Any]] | None = None,
) -> dict[str, float]:
    """A fresh, seeded Trainer run of ``cfg.model`` on ``keep_ids`` (the same trainer config and
    user callbacks, no estimator). Returns the logged validation and test metrics (``test_*``
    from ``trainer.test`` when the datamodule has a test loader) and, for each entry of
    ``target_loaders``, ``target_loss/<name>``: the mean per-sample loss over that loader."""
    L.seed_everything(int(seed), workers=True, verbose=False)
    model = instantiate(cfg.model)
    data = subset_datamodule(datamodule, keep_ids, int(seed))
    with quiet_lightning():
        trainer = make_trainer(cfg, out)
        trainer.fit(model, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if is_overridden("test_dataloader", data, L.LightningDataModule):
            results = trainer.test(model, datamodule=data, verbose=False)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    for name, loader in (target_loaders or {}).items():
        metrics[f"target_loss/{name}"] = model_target_loss(model, loader)
    return metrics


def metric_of(metrics: dict[str, float], name: str) -> float:
    """``metrics[name]`` with a clear error naming what was logged."""
    if name not in metrics:
        raise KeyError(f"the retrained model logged no {name!r}; logged: {sorted(metrics)}. Set recipe.metric to one of them")
    return metrics[name]


def target_batches(kind: str, datamodule: Any) -> list[Any]:
    """The batches of the target: the validation loader, or the whole training set in order."""
    if kind == "val":
        return list(datamodule.val_dataloader())
    loader = datamodule.train_dataloader()
    return list(DataLoader(loader.dataset, batch_size=max(loader.batch_size or 1, 256), shuffle=False, collate_fn=loader.collate_fn))


def model_target_loss(model: L.LightningModule, batches: Iterable[Any]) -> float:
    """Mean per-sample loss of ``model`` over ``batches`` (evaluation mode; units of the loss)."""
    from lightning_influence.evaluation.retraining import target_loss

    device = next(model.parameters()).device
    moved = [model.transfer_batch_to_device(b, device, 0) for b in batches]
    return float(target_loss(model, dict(model.named_parameters()), moved))


@torch.no_grad()
def final_loss_scores(run: ScoredRun) -> Tensor:
    """The plain final-loss ranking, aligned with ``run.ids``: minus each sample's training loss
    at the final parameters (the lowest = the highest loss = the most suspicious)."""
    try:
        scores = build("loss", progress=False).scores(run.model, run.datamodule.train_dataloader(), "train")
        lookup = scores.to_dict()
        return torch.tensor([lookup[int(i)] for i in run.ids.tolist()], dtype=torch.float64)
    except (ImportError, KeyError, AttributeError):
        pass
    dataset = train_dataset(run.datamodule)
    model = run.model
    was_training = model.training
    model.eval()
    losses = []
    device = next(model.parameters()).device
    for batch in DataLoader(Subset(dataset, run.ids.tolist()), batch_size=512):
        batch = model.transfer_batch_to_device(batch, device, 0)
        losses.append(model.per_sample_loss(batch).detach().to("cpu", torch.float64))
    model.train(was_training)
    return -torch.cat(losses)


# ---------------------------------------------------------------------- statistics
def summary(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, sample standard deviation ``std`` (0 for one value), ``min``, ``max``, ``n``, ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": n, "values": xs}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """:func:`summary` of ``a[s] - b[s]`` over paired seeds ``s``."""
    return summary([x - y for x, y in zip(a, b, strict=True)])


# ---------------------------------------------------------------------- output
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


#: Every file a recipe may write into its output folder.
RECIPE_OUTPUTS = (
    "scores.pt", "scores.csv", "report.json", "config.yaml",
    "score_histogram.png", "detection_curve.png", "most_harmful.png", "predicted_vs_actual.png",
)


def stale_outputs(out: Path, written: Iterable[str]) -> list[str]:
    """The recipe outputs in ``out`` (:data:`RECIPE_OUTPUTS` and the files the previous
    ``report.json`` lists) that are not among ``written``: left there by an earlier run."""
    names = set(RECIPE_OUTPUTS)
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        previous = json.loads((out / "report.json").read_text()).get("files") or {}
        names |= {str(v) for v in previous.values() if isinstance(v, str) and "/" not in v and "\\" not in v}
    return sorted(n for n in names - set(written) if (out / n).is_file())


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
    text = json.dumps(_finite(report), indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write_bytes(out / "report.json", text.encode())
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
