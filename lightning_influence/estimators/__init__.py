"""Influence estimators. Every estimator reports the predicted change of the target loss when a
sample is removed from training (positive: the sample helps)."""

from lightning_influence.estimators.diffin import DiffInSweep, ScoreAccumulator

__all__ = ["DiffInSweep", "ScoreAccumulator"]
