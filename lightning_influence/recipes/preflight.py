"""What a recipe refuses before its scoring run, that would otherwise fail only after training: a
Trainer config that runs no step or never ends (:func:`check_training_steps`, the config alone),
then a one-step trial fit on one device (:func:`preflight`): a metric the model does not log,
sizes beyond the data, estimator options that do not fit the model, sample ids that are not
positions of the training set. Under DDP each process runs its own one-device trial fit."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig
from torch.utils.data import IterableDataset

from lightning_influence.config import EstimatorConfig, estimator_params, refused_config
from lightning_influence.estimators.base import build
from lightning_influence.recipes.trainers import make_trainer, quiet_lightning
from lightning_influence.recipes.training_set import train_dataset

__all__ = ["Preflight", "check_estimator_on_model", "check_ids_are_positions", "check_training_steps", "preflight"]


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
