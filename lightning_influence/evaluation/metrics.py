"""Agreement between influence scores and the retraining ground truth.

Both are dimensionless correlations in [-1, 1], computed in float64 with
``torchmetrics.functional``; +1 means the scores order (Spearman) or linearly track
(Pearson) the true influence exactly, with the same sign convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

__all__ = ["pearson", "spearman"]

ArrayLike = Tensor | Sequence[float]


def _validated(scores: ArrayLike, truth: ArrayLike) -> tuple[Tensor, Tensor]:
    pair = []
    for name, values in (("scores", scores), ("truth", truth)):
        try:
            # dtype at construction: a list of Python floats would otherwise pass through float32
            t = torch.as_tensor(values, dtype=torch.float64, device="cpu").detach()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a 1-D sequence of numbers: {err}") from err
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        pair.append(t)
    x, y = pair
    if x.numel() != y.numel():
        raise ValueError(f"scores and truth must have the same length, got {x.numel()} and {y.numel()}")
    if x.numel() < 3:
        raise ValueError(f"a correlation needs at least 3 pairs, got {x.numel()}")
    for name, t in (("scores", x), ("truth", y)):
        bad = (~torch.isfinite(t)).nonzero().reshape(-1)
        if bad.numel():
            raise ValueError(f"{name} has {bad.numel()} non-finite value(s), first at position {int(bad[0])}")
        if bool((t == t[0]).all()):
            raise ValueError(f"{name} is constant: the correlation is undefined")
    return x, y


def spearman(scores: ArrayLike, truth: ArrayLike) -> float:
    """Spearman rank correlation of ``scores`` with ``truth`` (ties get their average rank).

    Dimensionless, in [-1, 1]. Raises ``ValueError`` unless both are 1-D, of equal length
    >= 3, finite and not constant. (torchmetrics adds 1e-6 to the product of the rank standard
    deviations, a relative bias below 2e-6 for n >= 3 and far smaller for larger n.)
    """
    x, y = _validated(scores, truth)
    return float(spearman_corrcoef(x, y))


def pearson(scores: ArrayLike, truth: ArrayLike) -> float:
    """Pearson (linear) correlation of ``scores`` with ``truth``.

    Dimensionless, in [-1, 1]. Raises ``ValueError`` unless both are 1-D, of equal length
    >= 3, finite and not constant (or so close to constant that float64 cannot resolve it).
    """
    x, y = _validated(scores, truth)
    value = float(pearson_corrcoef(x, y))
    if value != value:  # nan: torchmetrics found a variance too small to resolve
        raise ValueError("scores or truth vary too little for a float64 Pearson correlation")
    return value
