"""Lightning callbacks that compute influence while ``Trainer.fit`` runs."""

from lightning_influence.callbacks.diffin import DiffIn

__all__ = ["DiffIn"]
