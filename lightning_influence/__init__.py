"""lightning-influence: which training samples help and which hurt, computed while ``Trainer.fit`` runs.

Sign convention for every score: the predicted change of the target loss when the sample is
removed from training. Positive: the sample helps. Negative: the sample hurts.
"""

from lightning_influence.callbacks import DiffIn, TracIn
from lightning_influence.data import IndexedDataset
from lightning_influence.estimators import Estimator, Target, build
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.scores import InfluenceScores, ScoreFileError

__all__ = ["DiffIn", "Estimator", "IndexedDataset", "InfluenceMixin", "InfluenceScores", "ScoreFileError", "Target", "TracIn", "build"]
__version__ = "0.1.0"
