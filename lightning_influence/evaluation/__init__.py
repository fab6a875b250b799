"""Ground truth for judging influence estimators.

- :func:`leave_one_out` / :func:`retrain`: exact trajectory-specific leave-out retraining for
  plain SGD (same initial parameters, batches and learning rates; the removed samples taken
  out of every batch). Influence ``I(z) = F(theta_T^{-z}) - F(theta_T)``, in the units of the
  target loss ``F`` (:func:`target_loss`); positive means the sample helps (removing it raises
  the loss), negative means it hurts -- the sign of every score in the library.
- :func:`spearman` / :func:`pearson`: dimensionless correlations in [-1, 1] of scores with
  that ground truth.
- :class:`StepRecorder`: a callback that records a run's initial parameters, batches and
  learning rates, the inputs of :func:`leave_one_out`.
"""

from lightning_influence.evaluation.metrics import pearson, spearman
from lightning_influence.evaluation.recorder import StepRecorder
from lightning_influence.evaluation.retraining import (
    SGDStep,
    leave_one_out,
    optimizer_lrs,
    retrain,
    sgd_param_groups,
    target_loss,
)

__all__ = [
    "SGDStep",
    "StepRecorder",
    "leave_one_out",
    "optimizer_lrs",
    "pearson",
    "retrain",
    "sgd_param_groups",
    "spearman",
    "target_loss",
]
