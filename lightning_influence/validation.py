"""Argument checks shared by the callbacks, estimators and recipes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["check_count", "did_you_mean"]


def check_count(name: str, value: object, none_ok: bool = False, meaning: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a positive ``int`` (a number of steps, samples or
    iterations), or ``None`` where ``none_ok``. ``meaning`` is added to the message, e.g.
    ``"the number of checkpoints"``."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int" + (f" ({meaning})" if meaning else "") + (" or None" if none_ok else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def did_you_mean(key: str, choices: Iterable[str], otherwise: str, prefix: str = "") -> str:
    """``"did you mean A or B?"`` for the choices closest to a misspelt ``key`` (each shown with
    ``prefix``), else ``otherwise``: the hint of a refused key."""
    close = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(prefix + c for c in close)}?" if close else otherwise
