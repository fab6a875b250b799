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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.evaluation.metrics import spearman
from lightning_influence.evaluation.retraining import OptimizerSpec, TrainingStep, retrain, target_loss

__all__ = ["SubsetRetraining", "random_removals", "subset_retraining", "linear_datamodeling_score"]


@dataclass(frozen=True)
class SubsetRetraining:
    """Realised effects of removing each of ``removals`` (sets of sample ids).

    ``changes``: float64 ``Tensor[M]``, ``F(theta^{-R_m}) - F(theta)`` in the target loss's units.
    """

    removals: tuple[tuple[int, ...], ...]
    changes: Tensor

    def predicted(self, ids: Tensor, scores: Tensor) -> Tensor:
        """Additive prediction ``sum_{z in R_m} score(z)`` per removal set (float64 ``Tensor[M]``).
        Every removed id must have a score."""
        position = {int(i): k for k, i in enumerate(ids.reshape(-1).tolist())}
        values = scores.detach().to(torch.float64).reshape(-1)
        out = torch.zeros(len(self.removals), dtype=torch.float64)
        for m, removal in enumerate(self.removals):
            missing = [i for i in removal if i not in position]
            if missing:
                raise KeyError(f"removal set {m} holds {len(missing)} id(s) without a score, e.g. {missing[0]}")
            out[m] = values[[position[i] for i in removal]].sum()
        return out


def random_removals(ids: Sequence[int] | Tensor, count: int, keep_fraction: float = 0.5, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` random removal sets, each dropping ``1 - keep_fraction`` of ``ids`` (seeded)."""
    if not 0.0 < keep_fraction < 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1), got {keep_fraction}")
    if count < 3:
        raise ValueError(f"an LDS needs at least 3 subsets, got count={count}")
    pool = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    drop = pool.numel() - round(keep_fraction * pool.numel())
    g = torch.Generator().manual_seed(seed)
    return [tuple(sorted(pool[torch.randperm(pool.numel(), generator=g)[:drop]].tolist())) for _ in range(count)]


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
    """Retrain the recorded run once without each removal set and once with nothing removed."""
    batches = list(target_batches)
    runs: list[tuple[int, ...]] = [(), *(tuple(int(i) for i in r) for r in removals)]
    losses = []
    for start in range(0, len(runs), chunk_size):
        final = retrain(module, initial_params, steps, optimizer, runs[start : start + chunk_size], chunk_size=chunk_size)
        losses.append(target_loss(module, final, batches, chunk_size=chunk_size))
    f = torch.cat(losses)
    return SubsetRetraining(tuple(runs[1:]), f[1:] - f[0])


def linear_datamodeling_score(retrained: SubsetRetraining, ids: Tensor, scores: Tensor) -> float:
    """Spearman correlation, over the removal sets, of the additive prediction with the realised change."""
    return spearman(retrained.predicted(ids, scores), retrained.changes)
