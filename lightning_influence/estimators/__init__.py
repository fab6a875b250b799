"""Influence estimators behind one interface (:class:`Estimator`), selected by name with
:func:`build`. Every estimator reports the predicted change of the target loss when a sample is
removed from training (positive: the sample helps)."""

from lightning_influence.estimators.base import REGISTRY, Estimator, Target, available, build, estimator_class

__all__ = ["REGISTRY", "Estimator", "Target", "available", "build", "estimator_class"]
