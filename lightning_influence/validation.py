"""Argument checks shared by the callbacks, estimators and recipes."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SEED_RANGE", "check_callback_name", "check_count", "check_seed", "did_you_mean"]

#: The seeds that numpy's and so ``lightning.seed_everything``'s generators accept: 0 .. 2**32 - 1.
SEED_RANGE = (0, 2**32 - 1)


def check_count(name: str, value: object, none_ok: bool = False, meaning: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a positive ``int`` (a number of steps, samples or
    iterations), or ``None`` where ``none_ok``. ``meaning`` is added to the message, e.g.
    ``"the number of checkpoints"``."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int" + (f" ({meaning})" if meaning else "") + (" or None" if none_ok else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def check_callback_name(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` (a callback's ``name`` argument) is ``None`` or a
    non-empty ``str``."""
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be None or a non-empty string such as 'test_set', got {name!r} ({type(name).__name__})")


def did_you_mean(key: str, choices: Iterable[str], otherwise: str, prefix: str = "") -> str:
    """``"did you mean A or B?"`` for the choices closest to a misspelt ``key`` (each shown with
    ``prefix``), else ``otherwise``: the hint of a refused key."""
    close = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(prefix + c for c in close)}?" if close else otherwise


def check_seed(name: str, value: object, none_ok: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is an ``int`` (or ``None`` where ``none_ok``) and
    ``ValueError`` unless it lies in :data:`SEED_RANGE`, naming ``name`` and a valid example."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer{' or None' if none_ok else ''}, got {value!r}: e.g. {name}=0")
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"{name}={value} is out of range: a seed must be an integer in [{low}, {high}] (numpy's range, which "
            f"lightning.seed_everything seeds), e.g. {name}=0"
        )


def check_fraction(name: str, value: Any, *, include_one: bool) -> float:
    """``value`` as a float in ``(0, 1]`` (``include_one``) or ``(0, 1)``, else ``ValueError``."""
    high = "1]" if include_one else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not (
        isinstance(value, Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
    ):
        raise ValueError(f"{name} must be a number in (0, {high}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not (math.isfinite(number) and 0.0 < number and (number <= 1.0 if include_one else number < 1.0)):
        raise ValueError(f"{name} must be in (0, {high}, got {value!r}")
    return number
