"""Batch normalisation as training runs it: which layers normalise with statistics of the batch,
which buffers training writes, and a way to evaluate the training-mode function without writing them.

In training mode ``nn.BatchNorm1d/2d/3d`` normalise each batch with its own mean and (biased)
variance over the batch (and spatial) dimensions, so every sample's output depends on the other
samples of its batch, and, with ``track_running_stats=True``, update ``running_mean`` and
``running_var`` in place (``running = (1 - momentum) * running + momentum * batch_statistic``,
the variance unbiased; with ``momentum=None`` a cumulative average, ``momentum = 1 /
num_batches_tracked``), which evaluation mode then normalises with. ``track_running_stats=False``
normalises with batch statistics in both modes and writes nothing. Instance normalisation
normalises each sample on its own; with ``track_running_stats=True`` it also updates running
statistics averaged over the batch, which evaluation mode uses.

Used by the ground-truth retraining (:mod:`lightning_influence.evaluation.retraining`), which
keeps these buffers per run, and available to estimators that score batch-norm models as trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "NORMALISATION_LAYERS",
    "batch_statistics",
    "batch_statistics_layers",
    "fixed_statistics",
    "is_batch_statistics_layer",
    "removal_gap",
    "running_statistics",
    "sync_batch_norm_layers",
]

NORMALISATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""Layers whose training-mode forward reads statistics of the batch or writes running statistics."""

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def running_statistics(module: nn.Module) -> list[str]:
    """Full names (as in ``module.named_buffers()``) of the buffers that a training-mode forward of
    ``module`` writes in its normalisation layers: ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of every batch or instance norm with ``track_running_stats=True``."""
    names: list[str] = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, NORMALISATION_LAYERS) and sub.track_running_stats:
            names += [_name(prefix, b) for b in _RUNNING if sub._buffers.get(b) is not None]
    return names


def is_batch_statistics_layer(layer: nn.Module) -> bool:
    """``layer``'s training-mode forward depends on the whole batch: a batch norm (its output), or an
    instance norm with running statistics (the running statistics it writes average over the batch)."""
    return isinstance(layer, nn.modules.batchnorm._BatchNorm) or (
        isinstance(layer, nn.modules.instancenorm._InstanceNorm) and layer.track_running_stats
    )


def removal_gap(full: torch.Tensor, sub: torch.Tensor, index: int) -> tuple[float, float]:
    """How far the per-sample losses ``sub`` of a batch without its sample ``index`` are from the full
    batch's losses ``full`` without that position, and the rounding tolerance of that comparison. Both
    evaluated where every sample's loss is its own (evaluation mode, :func:`fixed_statistics`): a gap
    above the tolerance means the removal took out more than the sample."""
    expected = torch.cat([full[:index], full[index + 1 :]])
    gap = float((sub.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    return gap, 1e3 * torch.finfo(full.dtype).eps * (1.0 + float(full.abs().max()))


def batch_statistics_layers(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` whose training-mode forward depends on the whole batch:
    every batch norm (its output), and instance norm with running statistics (the running
    statistics it writes average over the batch). Removing a sample from a batch changes what
    these layers compute for, or record from, the other samples."""
    return [prefix or type(module).__name__ for prefix, sub in module.named_modules() if is_batch_statistics_layer(sub)]


def sync_batch_norm_layers(module: nn.Module) -> list[str]:
    """Names of the ``nn.SyncBatchNorm`` submodules of ``module`` (statistics over every process's batch)."""
    return [prefix or type(module).__name__ for prefix, sub in module.named_modules() if isinstance(sub, nn.SyncBatchNorm)]


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within the context, every batch norm of ``module`` normalises with the statistics of the
    batch it is given, as in training, and writes no buffer (no running statistics, no
    ``num_batches_tracked``); instance norm with running statistics normalises each sample with its
    own statistics, as in training, and writes nothing either. The other layers keep their mode
    (dropout stays off in evaluation mode). On exit every layer's mode and settings are restored;
    the buffers are never touched, so the context also works inside ``torch.func`` transforms
    (``vmap``, ``grad``, ``jvp``), which refuse writes to module tensors.

    Batch norm is switched to ``training=True, track_running_stats=False`` (its forward then
    passes no running statistics to ``F.batch_norm``); instance norm has its running-statistics
    buffers hidden (set to ``None``) while in the context, so do not pass them to
    ``torch.func.functional_call`` inside it."""
    saved: list[tuple[nn.Module, bool, bool, dict[str, object]]] = []
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            saved.append((sub, sub.training, sub.track_running_stats, {}))
            sub.training, sub.track_running_stats = True, False
        elif isinstance(sub, nn.modules.instancenorm._InstanceNorm) and sub.track_running_stats:
            hidden = {b: sub._buffers[b] for b in ("running_mean", "running_var") if b in sub._buffers}
            saved.append((sub, sub.training, sub.track_running_stats, hidden))
            for b in hidden:
                sub._buffers[b] = None
            sub.training = True
    try:
        yield
    finally:
        for sub, training, track, hidden in saved:
            sub.training, sub.track_running_stats = training, track
            sub._buffers.update(hidden)


@contextlib.contextmanager
def fixed_statistics(module: nn.Module) -> Iterator[None]:
    """Batch norm without running statistics (``track_running_stats=False``, which normalises with batch
    statistics in evaluation mode too) given fixed ones (mean 0, variance 1) within the context, so that
    in evaluation mode every sample's output is its own; restored on exit."""
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype, device = (torch.get_default_dtype(), None) if first is None else (first.dtype, first.device)
    hidden: list[tuple[nn.Module, bool]] = []
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is None:
            hidden.append((sub, sub.track_running_stats))
            sub._buffers["running_mean"] = torch.zeros(sub.num_features, dtype=dtype, device=device)
            sub._buffers["running_var"] = torch.ones(sub.num_features, dtype=dtype, device=device)
            sub.track_running_stats = True
    try:
        yield
    finally:
        for sub, track in hidden:
            sub._buffers["running_mean"] = None
            sub._buffers["running_var"] = None
            sub.track_running_stats = track
