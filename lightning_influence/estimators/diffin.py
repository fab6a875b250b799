"""Diff-In behind the common estimator interface: the :class:`~lightning_influence.DiffIn`
callback records during ``fit`` (and sweeps, with :mod:`~lightning_influence.estimators.diffin_sweep`);
:meth:`DiffInEstimator.scores` hands back what it computed."""

from __future__ import annotations

from typing import ClassVar

from lightning_influence.callbacks.diffin import DiffIn
from lightning_influence.estimators.base import CallbackEstimator


class DiffInEstimator(CallbackEstimator):
    """Diff-In (replay or online). ``options`` are :class:`~lightning_influence.DiffIn`'s arguments
    (``target``, ``mode``, ``window``, ...). Add :meth:`callback` to the Trainer before ``fit``."""

    name: ClassVar[str] = "diffin"
    options_from: ClassVar[type | None] = DiffIn
