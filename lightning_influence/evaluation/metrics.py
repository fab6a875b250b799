"""Agreement between influence scores and the retraining ground truth.

Both are dimensionless correlations in [-1, 1], computed in float64 (Pearson with
``torchmetrics.functional``, Spearman as the Pearson correlation of average ranks); +1 means
the scores order (Spearman) or linearly track (Pearson) the true influence exactly, with the
same sign convention. The detection ROC-AUC is the Mann-Whitney statistic of the average
ranks, in float64 too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef

from lightning_influence.evaluation._checks import as_flags, as_numbers, check_same_length
from lightning_influence.validation import check_fraction

__all__ = ["average_ranks", "detection_auroc", "fraction_found", "pearson", "spearman"]

ArrayLike = Tensor | Sequence[float]


def _validated(scores: ArrayLike, truth: ArrayLike) -> tuple[Tensor, Tensor]:
    x, y = as_numbers("scores", scores), as_numbers("truth", truth)
    check_same_length("scores", x, "truth", y)
    if x.numel() < 3:
        raise ValueError(f"a correlation needs at least 3 pairs, got {x.numel()}")
    for name, t in (("scores", x), ("truth", y)):
        if bool((t == t[0]).all()):
            raise ValueError(f"{name} is constant: the correlation is undefined")
    return x, y


def _standardised(t: Tensor) -> Tensor:
    """``t`` centred and scaled so that its largest absolute deviation lies in [0.5, 1): squares
    and products of the values can then neither overflow nor underflow (values near 1e200 or
    1e-200 would). Scaling is by powers of two, exact, and the correlation is invariant to it."""

    def rescale(v: Tensor) -> Tensor:
        _, exponent = torch.frexp(v.abs().max())
        half = exponent // 2  # two factors, each within float64's range even for exponents near +-1074
        return v * torch.pow(2.0, -half.double()) * torch.pow(2.0, -(exponent - half).double())

    scaled = rescale(t)  # |value| < 1 first: the mean of values near 1e308 would overflow
    return rescale(scaled - scaled.mean())


def average_ranks(t: Tensor) -> Tensor:
    """The 1-based ranks of ``t`` in float64, ties given their average rank (exact for any length:
    integer positions, no float32 or int32 sums)."""
    order = torch.argsort(t, stable=True)
    sorted_values = t[order]
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # the last 1-based position of each tie group
    mean_rank = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty(t.numel(), dtype=torch.float64, device=t.device)
    ranks[order] = torch.repeat_interleave(mean_rank, counts)
    return ranks


def spearman(scores: ArrayLike, truth: ArrayLike) -> float:
    """Spearman rank correlation of ``scores`` with ``truth``: the Pearson correlation of their
    average ranks (ties get their average rank, as ``scipy.stats.spearmanr``).

    Dimensionless, in [-1, 1]. Raises ``ValueError`` unless both are 1-D, of equal length
    >= 3, finite and not constant.
    """
    x, y = _validated(scores, truth)
    return pearson(average_ranks(x), average_ranks(y))


def pearson(scores: ArrayLike, truth: ArrayLike) -> float:
    """Pearson (linear) correlation of ``scores`` with ``truth``.

    Dimensionless, in [-1, 1]. Raises ``ValueError`` unless both are 1-D, of equal length
    >= 3, finite and not constant. Computed on the values centred and rescaled (exactly, by
    powers of two), so very large or very small magnitudes (1e200, 1e-200) neither overflow nor
    underflow.
    """
    x, y = _validated(scores, truth)
    value = float(pearson_corrcoef(_standardised(x), _standardised(y)))
    if value != value:  # nan: torchmetrics found a variance it cannot resolve even after rescaling
        raise ValueError(
            "scores or truth vary too little relative to their largest deviation for a float64 Pearson correlation "
            "(after rescaling, so not an overflow)"
        )
    return value


def _scores_and_flags(scores: ArrayLike, positives: Tensor | Sequence[bool]) -> tuple[Tensor, Tensor]:
    x, pos = as_numbers("scores", scores), as_flags("positives", positives)
    check_same_length("scores", x, "positives", pos)
    return x, pos


def detection_auroc(scores: ArrayLike, positives: Tensor | Sequence[bool]) -> float:
    """ROC-AUC of finding the ``positives`` (e.g. flipped labels) by ranking the *lowest* scores
    first: with the library's sign, harmful samples have negative scores. Dimensionless, in
    [0, 1]; 0.5 is chance. ``scores``: 1-D, real, finite; ``positives``: 1-D booleans (or 0/1)
    of the same length. Raises ``ValueError`` otherwise, or without both positives and negatives."""
    x, pos = _scores_and_flags(scores, positives)
    if bool(pos.all()) or not bool(pos.any()):
        raise ValueError("detection ROC-AUC needs both positive and negative samples")
    # Mann-Whitney: the chance that a random positive ranks before a random negative (ties count half).
    ranks = average_ranks(-x)
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    return (float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def fraction_found(scores: ArrayLike, positives: Tensor | Sequence[bool], fraction: float) -> float:
    """Recall of the ``fraction`` of samples with the lowest scores (most harmful first; ties
    broken by position): how many of all the ``positives`` are among them, as a share of the
    positives (not of the samples taken). In [0, 1]; chance is ``fraction``.
    ``scores`` and ``positives`` as for :func:`detection_auroc`; ``fraction`` in (0, 1]."""
    fraction = check_fraction("fraction", fraction, include_one=True)
    x, pos = _scores_and_flags(scores, positives)
    total = int(pos.sum())
    if total == 0:
        raise ValueError("there are no positives to find")
    k = max(1, round(fraction * x.numel()))
    return int(pos[torch.argsort(x, stable=True)[:k]].sum()) / total
