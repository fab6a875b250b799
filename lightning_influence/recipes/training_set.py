"""The training set as the recipes read it: item ``i`` is sample id ``i`` (labels are read by
position), and under DDP a training loader that does not shuffle keeps its order
(:func:`distributed_train_loader`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler

__all__ = [
    "are_classes",
    "class_labels",
    "distributed_train_loader",
    "is_shuffled",
    "labels_of",
    "train_dataset",
    "train_loader_in_order",
]


def train_dataset(datamodule: Any) -> Any:
    """The training dataset (item ``i`` carries sample id ``i``; see :class:`~lightning_influence.IndexedDataset`)."""
    dataset = getattr(datamodule, "train_set", None)
    return dataset if dataset is not None else datamodule.train_dataloader().dataset


def labels_of(dataset: Any, ids: Iterable[int]) -> list[int | float | None]:
    """Label (or regression target) of each sample, as it is: an ``int`` for an integer or
    boolean label, a ``float`` for a floating-point one (``-5.46`` stays ``-5.46``); ``None``
    where the item carries no single value. Items ``(x, y, index)`` or dicts with
    ``"label"|"labels"|"y"|"target"``. Whether the labels are classes: :func:`class_labels`."""
    labels: list[int | float | None] = []
    for i in ids:
        item = dataset[int(i)]
        if isinstance(item, dict):
            y = next((item[k] for k in ("label", "labels", "y", "target") if k in item), None)
        elif isinstance(item, (tuple, list)) and len(item) >= 3:
            y = item[1]
        else:
            y = None
        labels.append(_scalar(y))
    return labels


def _scalar(y: Any) -> int | float | None:
    if y is None:
        return None
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.numel() != 1 or t.is_complex():
        return None
    if not t.is_floating_point():
        return int(t.item())
    if t.dtype == torch.float64:
        return float(t.item())
    # float32 (or narrower): the shortest decimal that is the same float32, -5.46 rather than -5.460000038146973
    return float(str(numpy.float32(t.item())))


def class_labels(labels: Sequence[int | float | None], purpose: str, fix: str) -> list[int]:
    """``labels`` (:func:`labels_of`) as class indices for ``purpose`` (e.g. ``"recipe.class_balanced=true"``):
    integers, or floats that are all whole numbers (``0.0``/``1.0`` targets of a binary
    classifier). Refuses, naming ``purpose`` and the ``fix``, a sample without a label and
    non-integer values (a regression target: truncating it would make "classes" of its integer
    parts)."""
    missing = sum(y is None for y in labels)
    if missing:
        raise ValueError(
            f"{purpose} needs a class label for every training sample, and {missing} of {len(labels)} carry none "
            f"(items (x, y, index) or dicts with 'label', 'labels', 'y' or 'target'). {fix}"
        )
    fractional = [y for y in labels if isinstance(y, float) and not float(y).is_integer()]
    if fractional:
        shown = ", ".join(f"{y:g}" for y in fractional[:3])
        raise ValueError(
            f"{purpose} needs class labels, but {len(fractional)} of the {len(labels)} training labels read are not whole numbers "
            f"(e.g. {shown}): a regression target has no classes. {fix}"
        )
    return [int(y) for y in labels]  # type: ignore[arg-type]


def are_classes(labels: Sequence[int | float | None]) -> bool:
    """Are ``labels`` (:func:`labels_of`) class indices (:func:`class_labels` would take them)?"""
    return all(y is not None and (not isinstance(y, float) or float(y).is_integer()) for y in labels)


def is_shuffled(loader: DataLoader) -> bool:
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
    if is_shuffled(loader) or type(loader.batch_sampler) is not BatchSampler:
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
