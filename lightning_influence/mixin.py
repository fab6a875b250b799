"""The data contract between a LightningModule and the influence estimators."""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_influence.batches import map_tensors

if TYPE_CHECKING:
    from lightning_influence.scores import InfluenceScores

LossTap = Callable[[Any, Tensor], None]
"""``(batch, losses) -> None``: told of every ``per_sample_loss(batch)`` result while set."""

_LOSS_TAPS: weakref.WeakKeyDictionary[Any, dict[int, LossTap]] = weakref.WeakKeyDictionary()
"""module -> {owner id: loss tap} (outside the module: copies of a module do not inherit them)."""

SAMPLE_ID_KEY = "index"
"""Key under which :class:`~lightning_influence.data.IndexedDataset` stores a sample's id in dict items."""


class InfluenceMixin:
    """Makes a LightningModule influence-aware.

    Subclasses implement :meth:`per_sample_loss`; its mean over a batch must be the loss that
    ``training_step`` optimises (checked on the first step). :meth:`sample_ids` finds each
    sample's id in the batch; the default reads ``batch["index"]`` for dict batches and the last
    element for tuple/list batches, which is what :class:`~lightning_influence.data.IndexedDataset`
    produces. After ``fit`` with an influence callback, :attr:`influence` holds the scores.

    Coupled batch losses (contrastive losses such as CLIP's InfoNCE, where each sample's loss
    depends on the other samples of its batch as negatives): set :attr:`coupled_batch_loss` to
    ``True``. Removing ``z`` then means recomputing the batch loss on the sub-batch without ``z``
    (``per_sample_loss(remove_from_batch(batch, i)).mean()``), so ``z`` is also gone as a negative
    of the others; the estimators and the leave-one-out ground truth use that semantics.
    """

    sample_id_key: str = SAMPLE_ID_KEY
    coupled_batch_loss: bool = False
    """``True`` if a sample's loss depends on the other samples of its batch (in-batch negatives):
    leave-one-out then re-evaluates :meth:`per_sample_loss` on the sub-batch without the sample
    (:meth:`remove_from_batch`) instead of dropping its term from the batch mean."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each subclass's own per_sample_loss hands its results to the module's loss taps (set_loss_tap).
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("per_sample_loss")
        if isinstance(method, types.FunctionType) and not getattr(method, "_taps_losses", False):
            cls.per_sample_loss = _tapped(method)  # type: ignore[method-assign]

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
            ids, where = batch[self.sample_id_key], f"batch[{self.sample_id_key!r}]"
        elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
            ids, where = batch[-1], "the batch's last element"
        else:
            raise TypeError(
                f"cannot find sample ids in a batch of type {type(batch).__name__}: wrap the dataset in "
                "lightning_influence.IndexedDataset (ids become the last tuple element or batch['index']) "
                "or override sample_ids(batch)"
            )
        try:
            return torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"the default sample_ids(batch) reads {where} as the sample ids, but it is a {type(ids).__name__} that is "
                f"not a sequence of integers ({err}). A list of training loaders gives a list batch whose last element is "
                "a whole batch of the last loader; ids given as strings (file names) are not positions in the dataset. "
                "Wrap the dataset in lightning_influence.IndexedDataset (integer ids become the last tuple element or "
                "batch['index']), or override sample_ids(batch) to return integer ids"
            ) from None

    def remove_from_batch(self, batch: Any, index: int | Tensor) -> Any:
        """The batch without its sample at position ``index`` (``0 <= index < B``), for modules with
        :attr:`coupled_batch_loss`, and for every module with batch norm (or instance norm with running
        statistics), whose ground-truth retraining (:func:`~lightning_influence.evaluation.retrain`)
        evaluates each run's sub-batches with it: ``per_sample_loss`` of the result must return ``B - 1``
        losses and ``sample_ids`` the ids without ``batch``'s ``index``-th. For a batch-norm model the
        retraining first checks that the eval-mode losses of the result are the full batch's without
        position ``index``, and refuses a mismatch.

        The default drops row ``index`` along dim 0 of every tensor of the batch (nested tuples,
        lists, dicts, named tuples and dataclasses) whose first dimension is the batch size ``B`` (``sample_ids(batch).numel()``);
        other leaves are kept as they are; override it when a batch holds a tensor that is not per sample
        but may have ``B`` rows (class weights of ``B`` classes). It accepts a 0-d integer tensor as ``index`` and is
        written with tensor operations only, so the estimators can vectorise it over ``index`` with
        ``torch.func.vmap``; an override may use Python control flow (the estimators then fall back
        to one call per removed sample).
        """
        size = int(torch.as_tensor(self.sample_ids(batch)).numel())
        if size < 1:
            raise ValueError("remove_from_batch needs a batch of at least one sample")
        keep: Tensor | None = None

        def drop(leaf: Tensor) -> Tensor:
            nonlocal keep
            if leaf.dim() == 0 or leaf.shape[0] != size:
                return leaf
            if keep is None or keep.device != leaf.device:
                # positions 0..B-2, shifted by one from ``index`` on: every row but ``index``
                rows = torch.arange(size - 1, device=leaf.device)
                at = index.to(leaf.device) if isinstance(index, Tensor) else int(index)
                keep = rows + (rows >= at).long()
            return leaf.index_select(0, keep)

        return map_tensors(drop, batch)

    def set_loss_tap(self, owner: object, tap: LossTap | None) -> None:
        """Let ``tap(batch, losses)`` see what every ``per_sample_loss(batch)`` call returns, on
        behalf of ``owner`` (one tap per owner; ``None``: remove the owner's). ``DiffIn`` sets one
        for the duration of each training batch to reuse the per-sample losses ``training_step``
        computes at the step's parameters (saving a forward pass per step); the call itself is
        unchanged."""
        taps = _LOSS_TAPS.get(self)
        if tap is not None:
            _LOSS_TAPS.setdefault(self, {})[id(owner)] = tap
        elif taps is not None:
            taps.pop(id(owner), None)
            if not taps:
                del _LOSS_TAPS[self]

    @property
    def influence(self) -> InfluenceScores | None:
        """Scores written by the last influence callback run on this module (``None`` before)."""
        return getattr(self, "_influence_scores", None)

    @influence.setter
    def influence(self, scores: InfluenceScores | None) -> None:
        object.__setattr__(self, "_influence_scores", scores)


def _tapped(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``per_sample_loss`` that also hands its result to the module's loss tap, if one is set."""

    @functools.wraps(method)
    def per_sample_loss(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Tensor:
        losses = method(self, batch, *args, **kwargs)
        taps = _LOSS_TAPS.get(self)
        if taps and not args and not kwargs:
            for tap in list(taps.values()):
                tap(batch, losses)
        return losses

    per_sample_loss._taps_losses = True  # type: ignore[attr-defined]
    return per_sample_loss
