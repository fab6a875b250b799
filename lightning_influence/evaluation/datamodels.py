"""The linear datamodeling score (LDS): do the scores predict what retraining on *subsets* does?

Removing a set ``R`` of samples is predicted, additively, to change the target by the sum of
their scores (the library's sign: a score is the target-loss change when the sample is
removed). For ``M`` random subsets that keep a fraction ``alpha`` of the data, the model is
retrained without the rest (:func:`~lightning_influence.evaluation.retraining.retrain`) and the
LDS is the Spearman correlation, over subsets, between the predicted and the realised change
of the target loss. Dimensionless, in [-1, 1]; it judges group effects, where leave-one-out
judges single samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.evaluation._checks import as_ids, as_numbers, check_same_length, require_ids_cover
from lightning_influence.evaluation.metrics import spearman
from lightning_influence.evaluation.retraining import OptimizerSpec, TrainingStep, check_recorded_ids, retrain, target_batch_list, target_loss
from lightning_influence.validation import check_fraction

__all__ = ["SubsetRetraining", "random_removals", "subset_retraining", "linear_datamodeling_score"]


@dataclass(frozen=True)
class SubsetRetraining:
    """Realised effects of removing each of ``removals`` (sets of sample ids).

    ``removals``: one tuple of distinct integer sample ids per removal set, none empty.
    ``changes``: float64 ``Tensor[M]``, ``F(theta^{-R_m}) - F(theta)`` in the target loss's units,
    one per removal set.
    """

    removals: tuple[tuple[int, ...], ...]
    changes: Tensor

    def __post_init__(self) -> None:
        removals = _removal_sets(self.removals)
        changes = as_numbers("changes", self.changes, finite=False)
        if changes.numel() != len(removals):
            raise ValueError(
                f"SubsetRetraining needs one change per removal set, got {changes.numel()} changes for {len(removals)} removal sets"
            )
        object.__setattr__(self, "removals", removals)
        object.__setattr__(self, "changes", changes)

    def predicted(self, ids: Tensor | Sequence[int], scores: Tensor | Sequence[float]) -> Tensor:
        """Additive prediction ``sum_{z in R_m} score(z)`` per removal set (float64 ``Tensor[M]``).

        ``ids``: distinct integer sample ids; ``scores``: one real number per id, in the same order
        (tensors, numpy arrays or lists). Every removed id must have a finite score (``KeyError``
        naming the ones that have none); ``ValueError`` for ids and scores of different lengths,
        repeated or non-integer ids, non-numeric scores, and NaN or infinite scores of removed ids."""
        ids_t = as_ids("ids", ids, unique=True)
        values = as_numbers("scores", scores, finite=False)
        check_same_length("ids", ids_t, "scores", values)
        require_ids_cover("ids", ids_t, {i for removal in self.removals for i in removal}, "the removal sets")
        position = {i: k for k, i in enumerate(ids_t.tolist())}
        removed = sorted({i for removal in self.removals for i in removal})
        bad = [i for i, v in zip(removed, values[[position[i] for i in removed]].tolist(), strict=True) if not math.isfinite(v)]
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            raise ValueError(
                f"{len(bad)} removed sample id(s) have a NaN or infinite score ({shown}): the additive prediction of "
                "their removal sets is undefined; leave those samples out of the removal sets"
            )
        out = torch.zeros(len(self.removals), dtype=torch.float64)
        for m, removal in enumerate(self.removals):
            out[m] = values[[position[i] for i in removal]].sum()
        return out


def _removal_sets(removals: Any) -> tuple[tuple[int, ...], ...]:
    """``removals`` as tuples of distinct integer ids, none empty; ``ValueError`` otherwise."""
    if isinstance(removals, (str, bytes)) or not isinstance(removals, Iterable):
        raise ValueError(f"removals must be a sequence of removal sets (collections of sample ids), got {type(removals).__name__}")
    out = []
    for m, removal in enumerate(removals):
        ids = as_ids(f"removal set {m}", removal, unique=True)
        if ids.numel() == 0:
            raise ValueError(
                f"removal set {m} is empty: removing nothing measures nothing (its change is 0 by construction); "
                "give every removal set at least one sample id"
            )
        out.append(tuple(ids.tolist()))
    return tuple(out)


def random_removals(ids: Sequence[int] | Tensor, count: int, keep_fraction: float = 0.5, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` (>= 3) random removal sets, each dropping ``len(ids) - round(keep_fraction * len(ids))``
    of the distinct integer ``ids`` (seeded; each set sorted). Raises ``ValueError`` for repeated or
    non-integer ids, and for a ``keep_fraction`` that would drop none of them (empty removal sets
    measure nothing) or all of them (every set the same), saying which values work."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 3:
        raise ValueError(f"an LDS needs at least 3 subsets: count must be an int >= 3, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    keep = check_fraction("keep_fraction", keep_fraction, include_one=False)
    pool = as_ids("ids", ids, unique=True)
    n = pool.numel()
    if n < 2:
        raise ValueError(f"random removal sets need at least 2 distinct ids (some removed, some kept), got {n}")
    drop = n - round(keep * n)
    if drop == 0:
        needed = max(n + 1, math.floor(0.5 / (1.0 - keep)) - 1)
        while needed - round(keep * needed) < 1:
            needed += 1
        raise ValueError(
            f"keep_fraction={keep_fraction!r} keeps all {n} ids, so every removal set would be empty and measure nothing: "
            f"use keep_fraction <= {n - 1}/{n} (removing at least one of the {n} ids), or pass at least {needed} ids"
        )
    if drop == n:
        raise ValueError(
            f"keep_fraction={keep_fraction!r} keeps none of the {n} ids, so every removal set would remove all of them "
            f"(the same set each time): use keep_fraction >= 1/{n} (keeping at least one of them)"
        )
    g = torch.Generator().manual_seed(seed)
    return [tuple(sorted(pool[torch.randperm(n, generator=g)[:drop]].tolist())) for _ in range(count)]


def subset_retraining(
    module: nn.Module,
    initial_params: Mapping[str, Tensor],
    steps: Sequence[TrainingStep],
    optimizer: OptimizerSpec,
    removals: Sequence[Sequence[int]],
    target_batches: Iterable[Any],
    *,
    chunk_size: int = 64,
) -> SubsetRetraining:
    """Retrain the recorded run once without each removal set and once with nothing removed.

    ``removals``: collections of distinct integer sample ids, none empty (``ValueError`` otherwise:
    a repeated id would be counted twice by :meth:`SubsetRetraining.predicted` but removed once), each
    id held by a recorded step (``ValueError`` naming those that are not:
    :func:`~lightning_influence.evaluation.retraining.check_recorded_ids`)."""
    runs: list[tuple[int, ...]] = [(), *_removal_sets(removals)]
    check_recorded_ids(module, steps, {i for run in runs for i in run})
    batches = target_batch_list(target_batches)
    losses = []
    for start in range(0, len(runs), chunk_size):
        final = retrain(module, initial_params, steps, optimizer, runs[start : start + chunk_size], chunk_size=chunk_size)
        losses.append(target_loss(module, final, batches, chunk_size=chunk_size))
    f = torch.cat(losses)
    return SubsetRetraining(tuple(runs[1:]), f[1:] - f[0])


def linear_datamodeling_score(
    retrained: SubsetRetraining, ids: Tensor | Sequence[int], scores: Tensor | Sequence[float]
) -> float:
    """Spearman correlation, over the removal sets, of the additive prediction with the realised change.

    ``ids`` and ``scores`` as for :meth:`SubsetRetraining.predicted`: one score per distinct id,
    covering every removed id."""
    if not isinstance(retrained, SubsetRetraining):
        raise TypeError(f"retrained must be the SubsetRetraining that subset_retraining returns, got {type(retrained).__name__}")
    return spearman(retrained.predicted(ids, scores), retrained.changes)
