"""Input checks shared by the ground-truth helpers (metrics, LDS, subset and leave-one-out
retraining): sample ids, score vectors, flags and fractions, each refused with what is wrong and
how to fix it instead of being cast, truncated or misaligned silently."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_flags", "as_ids", "as_numbers", "check_same_length", "require_ids_cover"]


def _is_array(value: Any) -> bool:
    """A tensor or an array-like with a dtype (numpy), converted as a whole."""
    return isinstance(value, Tensor) or (hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "__array__"))


def _shown(items: Iterable[Any], limit: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (", ..." if len(items) > limit else "")


def as_ids(name: str, ids: Any, *, unique: bool = False, flatten: bool = False) -> Tensor:
    """``ids`` as a CPU int64 ``Tensor[N]``, or ``ValueError``.

    Accepts an integer tensor or numpy array (1-D; any shape when ``flatten``) or an iterable of
    integers (Python or numpy ints, integer 0-d tensors). Refuses floating-point, complex and
    boolean ids (``0.7`` is not silently sample 0), and, when ``unique``, repeated ids (naming them).
    """
    if _is_array(ids):
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must hold integer sample ids, got an array torch cannot read: {err}") from None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"{name} must hold integer sample ids, got a {t.dtype} {type(ids).__name__}: pass integer ids "
                f"({name}.long() if they are whole numbers)"
            )
        if t.ndim != 1 and not flatten:
            raise ValueError(f"{name} must be a 1-D sequence of sample ids, got shape {tuple(t.shape)}")
        t = t.detach().to("cpu", torch.long).reshape(-1)
    else:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise ValueError(f"{name} must be a sequence of integer sample ids, got {type(ids).__name__}")
        values = []
        for pos, i in enumerate(ids):
            is_bool = isinstance(i, bool) or type(i).__name__ == "bool_" or (isinstance(i, Tensor) and i.dtype == torch.bool)
            try:
                if is_bool:
                    raise TypeError
                values.append(operator.index(i))
            except TypeError:
                raise ValueError(
                    f"{name} must hold integer sample ids, but position {pos} holds {i!r} ({type(i).__name__}): pass "
                    "integer ids (a float is not rounded to an id)"
                ) from None
        try:
            t = torch.tensor(values, dtype=torch.long)
        except (OverflowError, RuntimeError) as err:
            raise ValueError(f"{name} holds an id outside the int64 range: {err}") from None
    if unique and t.numel():
        distinct, counts = t.unique(return_counts=True)
        if distinct.numel() != t.numel():
            repeated = distinct[counts > 1].tolist()
            raise ValueError(
                f"{name} must not repeat a sample id, but {len(repeated)} id(s) occur more than once ({_shown(repeated)}): "
                "each sample is scored or removed once; drop the repeats (e.g. torch.unique)"
            )
    return t


def as_numbers(name: str, values: Any, *, finite: bool = True) -> Tensor:
    """``values`` as a CPU float64 ``Tensor[N]`` (from a tensor, a numpy array or a sequence of
    numbers), or ``ValueError``: not 1-D, complex, boolean, or (when ``finite``) NaN or infinite.
    An ``InfluenceScores`` is refused: its values must be put in the order of the other argument
    (by sample id), which a position-wise metric cannot do for it."""
    if type(values).__name__ == "InfluenceScores" and hasattr(values, "values_for"):
        raise TypeError(
            f"{name} is an InfluenceScores, whose samples need not be in the order of the other argument's: pass "
            f"{name}.values_for(ids), the scores of the ids the other argument holds, in their order"
        )
    try:
        probe = values if _is_array(values) else torch.as_tensor(values)
        probe = torch.as_tensor(probe)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {err}") from None
    if probe.is_complex():
        raise ValueError(f"{name} is complex ({probe.dtype}); scores are real numbers: pass {name}.real if that is meant")
    if probe.dtype == torch.bool:
        raise ValueError(f"{name} holds booleans; pass numbers (float scores)")
    if _is_array(values):
        t = probe.detach().to("cpu", torch.float64)
    else:
        # dtype at construction: a list of Python floats would otherwise pass through float32
        t = torch.as_tensor(values, dtype=torch.float64, device="cpu")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one number per sample), got shape {tuple(t.shape)}")
    if finite:
        bad = (~torch.isfinite(t)).nonzero().reshape(-1)
        if bad.numel():
            raise ValueError(
                f"{name} has {bad.numel()} non-finite value(s) (NaN or infinite), first at position {int(bad[0])} "
                f"({float(t[bad[0]])}): drop those samples or fix how they were computed"
            )
    return t


def as_flags(name: str, values: Any) -> Tensor:
    """``values`` as a CPU bool ``Tensor[N]``: booleans, or numbers that are all 0 or 1; else ``ValueError``."""
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a 1-D sequence of booleans: {err}") from None
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one flag per sample), got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} is complex ({t.dtype}); pass booleans")
    t = t.detach().cpu()
    if t.dtype != torch.bool:
        bad = ((t != 0) & (t != 1)).nonzero().reshape(-1)
        if bad.numel():
            raise ValueError(
                f"{name} must be booleans (or 0/1), but position {int(bad[0])} holds {t[bad[0]].item()!r}: pass a bool "
                "mask such as is_bad = labels != clean_labels"
            )
        t = t != 0
    return t


def check_same_length(first: str, a: Tensor, second: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{first} and {second} must have the same length (one entry per sample, in the same order), got "
            f"{a.shape[0]} and {b.shape[0]}"
        )


def require_ids_cover(ids_name: str, ids: Tensor, needed: Iterable[int], what: str) -> None:
    """``KeyError`` naming the ids of ``needed`` that ``ids`` lacks (``what``: where they are needed)."""
    present = set(ids.tolist())
    missing = sorted({int(i) for i in needed} - present)
    if missing:
        raise KeyError(
            f"{len(missing)} sample id(s) of {what} are without a score: {ids_name} lacks {_shown(missing, 10)}; "
            "score every removed sample, or leave those samples out of the removal sets"
        )
