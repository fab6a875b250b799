"""Ground truth for judging influence estimators.

- :func:`leave_one_out` / :func:`retrain`: exact trajectory-specific leave-out retraining of
  what a Lightning run did (same initial parameters, micro-batches, gradient-accumulation
  normaliser, learning rates, gradient clipping and real ``torch.optim`` optimizer -- see
  :data:`RETRAINABLE_OPTIMIZERS`; the removed samples taken out of every micro-batch; batch
  norm replayed with each run's own batch and running statistics).
  Influence ``I(z) = F(theta_T^{-z}) - F(theta_T)``, in the units of the target loss ``F``
  (:func:`target_loss`); positive means the sample helps (removing it raises the loss),
  negative means it hurts -- the sign of every score in the library.
- :class:`TrainingStep` / :class:`OptimizerSpec`: one recorded optimizer step, and the
  optimizer (class, parameter groups, hyperparameters) with the gradient clipping.
- :func:`spearman` / :func:`pearson`: dimensionless correlations in [-1, 1] of scores with
  that ground truth.
- :func:`linear_datamodeling_score` (LDS): the same for group removals, over random subsets
  retrained by :func:`subset_retraining`.
- :func:`detection_auroc` / :func:`fraction_found`: how well the most harmful scores find
  known bad samples (e.g. flipped labels).
- :class:`StepRecorder`: a callback that records a run's initial parameters, optimizer and
  steps, the inputs of :func:`leave_one_out`.
"""

from lightning_influence.evaluation.datamodels import SubsetRetraining, linear_datamodeling_score, random_removals, subset_retraining
from lightning_influence.evaluation.metrics import detection_auroc, fraction_found, pearson, spearman
from lightning_influence.evaluation.recorder import StepRecorder
from lightning_influence.evaluation.retraining import (
    RETRAINABLE_OPTIMIZERS,
    OptimizerSpec,
    TrainingStep,
    check_recorded_ids,
    hyperparameter_changes,
    leave_one_out,
    optimizer_lrs,
    recorded_ids,
    retrain,
    target_loss,
)

__all__ = [
    "SubsetRetraining",
    "detection_auroc",
    "fraction_found",
    "linear_datamodeling_score",
    "random_removals",
    "subset_retraining",
    "RETRAINABLE_OPTIMIZERS",
    "OptimizerSpec",
    "StepRecorder",
    "TrainingStep",
    "check_recorded_ids",
    "recorded_ids",
    "hyperparameter_changes",
    "leave_one_out",
    "optimizer_lrs",
    "pearson",
    "retrain",
    "spearman",
    "target_loss",
]
