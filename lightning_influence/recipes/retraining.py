"""Retraining on a kept subset and what is measured on it: fresh, seeded Trainer runs of the
configured model on the kept samples (:func:`retrain_fresh`), the loss over a target
(:func:`model_target_loss`, :func:`target_subset`), and the statistics over seeds
(:func:`summary`, :func:`paired_difference`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_influence.recipes.trainers import make_trainer, quiet_lightning
from lightning_influence.recipes.training_set import distributed_train_loader, is_shuffled

__all__ = [
    "metric_of",
    "model_target_loss",
    "paired_difference",
    "retrain_fresh",
    "subset_datamodule",
    "summary",
    "target_batches",
    "target_subset",
]


def subset_datamodule(base: Any, keep_ids: Sequence[int] | Tensor, seed: int) -> L.LightningDataModule:
    """A datamodule training on the samples ``keep_ids`` of ``base``'s training set (ids kept:
    items are taken from the same dataset), shuffled with ``seed`` when ``base``'s training
    loader shuffles (else in ``keep_ids`` order, also under DDP: see
    :func:`~lightning_influence.recipes.training_set.distributed_train_loader`); validation and
    test loaders are ``base``'s. Sample id ``i`` must be position ``i`` of the training dataset,
    as with :class:`~lightning_influence.IndexedDataset`."""
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
        shuffle = not isinstance(loader, DataLoader) or is_shuffled(loader)
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


def model_target_loss(model: L.LightningModule, batches: Iterable[Any]) -> float:
    """Mean per-sample loss of ``model`` over ``batches`` (evaluation mode; units of the loss)."""
    from lightning_influence.evaluation.retraining import target_loss

    device = next(model.parameters()).device
    moved = [model.transfer_batch_to_device(b, device, 0) for b in batches]
    return float(target_loss(model, dict(model.named_parameters()), moved))


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
