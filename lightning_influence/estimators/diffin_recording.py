"""Diff-In behind the common estimator interface: the :class:`~lightning_influence.DiffIn`
callback records during ``fit``; :meth:`DiffInEstimator.scores` hands back what it computed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import lightning as L

from lightning_influence.callbacks.diffin import DiffIn
from lightning_influence.estimators.base import Estimator, Target, check_recorded_target
from lightning_influence.scores import InfluenceScores


class DiffInEstimator(Estimator):
    """Diff-In (replay or online). ``options`` are :class:`~lightning_influence.DiffIn`'s arguments
    (``target``, ``mode``, ``window``, ...). Add :meth:`callback` to the Trainer before ``fit``."""

    name: ClassVar[str] = "diffin"
    records_training: ClassVar[bool] = True
    options_from: ClassVar[type | None] = DiffIn

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._callback: DiffIn | None = DiffIn(**options)  # validates the options now

    def callback(self) -> DiffIn:
        assert self._callback is not None
        return self._callback

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        if self._callback is None or self._callback.scores is None:
            raise RuntimeError("Diff-In records during fit: add estimator.callback() to the Trainer, run fit, then call scores()")
        check_recorded_target("DiffIn", self._callback, target)
        return self._callback.scores
