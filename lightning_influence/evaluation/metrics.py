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

__all__ = ["detection_auroc", "fraction_found", "pearson", "spearman"]

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


def detection_auroc(scores: ArrayLike, positives: Tensor | Sequence[bool]) -> float:
    """ROC-AUC of finding the ``positives`` (e.g. flipped labels) by ranking the *lowest* scores
    first: with the library's sign, harmful samples have negative scores. Dimensionless, in
    [0, 1]; 0.5 is chance. Raises ``ValueError`` without both positives and negatives."""
    from torchmetrics.functional import auroc

    x = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    pos = torch.as_tensor(positives, dtype=torch.bool).reshape(-1)
    if x.numel() != pos.numel():
        raise ValueError(f"scores and positives must have the same length, got {x.numel()} and {pos.numel()}")
    if bool(pos.all()) or not bool(pos.any()):
        raise ValueError("detection ROC-AUC needs both positive and negative samples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("scores has non-finite values")
    return float(auroc(-x, pos.long(), task="binary"))


def fraction_found(scores: ArrayLike, positives: Tensor | Sequence[bool], fraction: float) -> float:
    """Share of the ``positives`` among the ``fraction`` of samples with the lowest scores
    (most harmful first; ties broken by position). In [0, 1]; chance is ``fraction``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    x = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    pos = torch.as_tensor(positives, dtype=torch.bool).reshape(-1)
    if x.numel() != pos.numel():
        raise ValueError(f"scores and positives must have the same length, got {x.numel()} and {pos.numel()}")
    total = int(pos.sum())
    if total == 0:
        raise ValueError("there are no positives to find")
    k = max(1, round(fraction * x.numel()))
    return int(pos[torch.argsort(x, stable=True)[:k]].sum()) / total
