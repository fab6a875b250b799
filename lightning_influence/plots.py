"""Figures of the recipes (PNG files), drawn with matplotlib, an optional dependency:
``pip install 'lightning-influence[plots]'``.

No pyplot and no global backend switch: each figure is a ``matplotlib.figure.Figure`` rendered
by the Agg canvas, so drawing never touches the caller's matplotlib state. Every function
writes ``path`` atomically and returns it.

Scores follow the library's sign: the predicted change of the target loss when the sample is
removed (positive helps, negative hurts).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_influence.scores import atomic_write_bytes

__all__ = [
    "require_matplotlib",
    "score_histogram",
    "detection_curve",
    "predicted_vs_actual",
    "accuracy_vs_fraction",
    "image_grid",
]


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or an ``ImportError`` that says how to install it or turn plots off."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the recipe plots need matplotlib: pip install 'lightning-influence[plots]' (or pip install matplotlib), "
            "or turn the plots off with recipe.plots=false"
        ) from err
    return matplotlib


def _figure(width: float = 5.0, height: float = 3.6) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def score_histogram(
    path: str | Path,
    scores: Tensor,
    marked: Tensor | None = None,
    *,
    xlabel: str = "score",
    title: str = "",
    names: tuple[str, str] = ("clean", "flipped label"),
) -> Path:
    """Histogram of ``scores``; with a boolean ``marked`` (e.g. flipped labels), the other and the
    marked samples as two overlaid histograms named ``names``."""
    fig = _figure()
    ax = fig.add_subplot()
    values = scores.detach().double().cpu()
    bins = torch.linspace(float(values.min()), float(values.max()) + 1e-12, 41).tolist()
    if marked is not None and bool(marked.any()):
        ax.hist(values[~marked].tolist(), bins=bins, alpha=0.6, label=names[0], color="tab:blue")
        ax.hist(values[marked].tolist(), bins=bins, alpha=0.7, label=names[1], color="tab:red")
        ax.legend()
    else:
        ax.hist(values.tolist(), bins=bins, color="tab:blue")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title or "score distribution")
    return _save(fig, path)


def detection_curve(path: str | Path, rankings: Mapping[str, Tensor], positives: Tensor, *, title: str = "") -> Path:
    """Share of the ``positives`` found (y) against the share of samples inspected (x), inspecting
    the lowest value of each ranking first; the diagonal is chance."""
    fig = _figure()
    ax = fig.add_subplot()
    pos = positives.bool().cpu()
    total = max(int(pos.sum()), 1)
    n = pos.numel()
    x = (torch.arange(n + 1, dtype=torch.float64) / n).tolist()
    for name, values in rankings.items():
        order = torch.argsort(values.double().cpu(), stable=True)
        found = torch.cat([torch.zeros(1), pos[order].double().cumsum(0)]) / total
        ax.plot(x, found.tolist(), label=name)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="chance")
    ax.set_xlabel("fraction of training samples inspected (most suspicious first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    ax.set_title(title or "mislabel detection")
    return _save(fig, path)


def predicted_vs_actual(
    path: str | Path, predicted: Sequence[float], actual: Sequence[float], groups: Sequence[str] | None = None, *, units: str = "target loss", title: str = ""
) -> Path:
    """Scatter of predicted against actual target change per deletion set (one colour per group), with y = x."""
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    labels = list(groups) if groups is not None else ["sets"] * len(predicted)
    for group in dict.fromkeys(labels):
        xs = [p for p, g in zip(predicted, labels, strict=True) if g == group]
        ys = [a for a, g in zip(actual, labels, strict=True) if g == group]
        ax.scatter(xs, ys, label=group, s=22)
    values = [*predicted, *actual]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], linestyle="--", color="gray", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel(f"predicted change ({units})")
    ax.set_ylabel(f"actual change after retraining ({units})")
    ax.legend()
    ax.set_title(title or "predicted vs actual")
    return _save(fig, path)


def accuracy_vs_fraction(
    path: str | Path, curves: Mapping[str, Sequence[tuple[float, float, float]]], *, ylabel: str = "test accuracy", title: str = ""
) -> Path:
    """One line per method through ``(fraction, mean, std)`` points, with the std as error bars."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, points in curves.items():
        pts = sorted(points)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name)
    ax.set_xlabel("fraction of the training set kept")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title or "coreset selection")
    return _save(fig, path)


def image_grid(path: str | Path, images: Sequence[Tensor], captions: Sequence[str], *, columns: int = 5, title: str = "") -> Path:
    """Grayscale images (``[H, W]``, ``[1, H, W]`` or flat with a square size) with captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    rows = max(1, math.ceil(len(images) / columns))
    fig = _figure(1.5 * columns, 1.7 * rows + 0.3)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(as_image(image).tolist(), cmap="gray_r", interpolation="nearest")
        ax.set_title(caption, fontsize=7)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def as_image(x: Tensor) -> Tensor:
    """``x`` as a 2-D ``[H, W]`` tensor; ``ValueError`` when it is not a single-channel image."""
    x = torch.as_tensor(x).detach().cpu().double()
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 1:
        side = math.isqrt(x.numel())
        if side * side != x.numel():
            raise ValueError(f"a flat input of {x.numel()} values is not a square image")
        x = x.reshape(side, side)
    if x.dim() != 2:
        raise ValueError(f"not a single-channel image: shape {tuple(x.shape)}")
    return x
