"""lightning-influence: which training samples help and which hurt, computed while ``Trainer.fit`` runs.

Sign convention for every score: the predicted change of the target loss when the sample is
removed from training. Positive: the sample helps. Negative: the sample hurts.
"""

from lightning_influence.callbacks import DiffIn
from lightning_influence.data import IndexedDataset
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.scores import InfluenceScores, ScoreFileError

__all__ = ["DiffIn", "IndexedDataset", "InfluenceMixin", "InfluenceScores", "ScoreFileError"]
__version__ = "0.1.0"
