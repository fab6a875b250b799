"""The data contract between a LightningModule and the influence estimators."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_influence.scores import InfluenceScores

SAMPLE_ID_KEY = "index"
"""Key under which :class:`~lightning_influence.data.IndexedDataset` stores a sample's id in dict items."""


class InfluenceMixin:
    """Makes a LightningModule influence-aware.

    Subclasses implement :meth:`per_sample_loss`; its mean over a batch must be the loss that
    ``training_step`` optimises (checked on the first step). :meth:`sample_ids` finds each
    sample's id in the batch; the default reads ``batch["index"]`` for dict batches and the last
    element for tuple/list batches, which is what :class:`~lightning_influence.data.IndexedDataset`
    produces. After ``fit`` with an influence callback, :attr:`influence` holds the scores.
    """

    sample_id_key: str = SAMPLE_ID_KEY

    def per_sample_loss(self, batch: Any) -> Tensor:
        """Unreduced loss of each sample in ``batch``: a floating ``Tensor[B]``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement per_sample_loss(batch) -> Tensor[B], the unreduced loss "
            "of each sample, whose mean is the loss that training_step returns"
        )

    def sample_ids(self, batch: Any) -> Tensor:
        """Integer id of each sample in ``batch`` (``LongTensor[B]``), unique within the training set."""
        if isinstance(batch, Mapping):
            if self.sample_id_key not in batch:
                raise KeyError(
                    f"the batch has no sample ids: dict batch keys are {sorted(map(str, batch))}, expected "
                    f"{self.sample_id_key!r}. Wrap the dataset in lightning_influence.IndexedDataset, or set "
                    "sample_id_key, or override sample_ids(batch)"
                )
            ids = batch[self.sample_id_key]
        elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
            ids = batch[-1]
        else:
            raise TypeError(
                f"cannot find sample ids in a batch of type {type(batch).__name__}: wrap the dataset in "
                "lightning_influence.IndexedDataset (ids become the last tuple element or batch['index']) "
                "or override sample_ids(batch)"
            )
        return torch.as_tensor(ids)

    @property
    def influence(self) -> InfluenceScores | None:
        """Scores written by the last influence callback run on this module (``None`` before)."""
        return getattr(self, "_influence_scores", None)

    @influence.setter
    def influence(self, scores: InfluenceScores | None) -> None:
        object.__setattr__(self, "_influence_scores", scores)
