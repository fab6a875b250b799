"""Lightning callbacks that compute influence while ``Trainer.fit`` runs, or record what a
post-hoc estimator needs (parameter checkpoints, forgetting events)."""

from lightning_influence.callbacks.checkpoints import ParameterCheckpoints
from lightning_influence.callbacks.diffin import DiffIn
from lightning_influence.callbacks.forgetting import ForgettingEvents
from lightning_influence.callbacks.tracin import TracIn

__all__ = ["DiffIn", "ForgettingEvents", "ParameterCheckpoints", "TracIn"]
