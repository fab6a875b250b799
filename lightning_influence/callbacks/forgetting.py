"""Forgetting events (Toneva et al., 2019), counted while ``Trainer.fit`` runs.

A *forgetting event* is a presentation at which a sample is classified wrongly after having
been classified correctly at its previous presentation. A sample is *learned* once it has been
classified correctly at some presentation; samples never learned during training are the
hardest of all (Toneva et al. treat them as forgotten infinitely often).

Predictions come from the :data:`OUTPUTS_METHOD` contract (see :func:`model_outputs`): the
module's ``per_sample_outputs(batch) -> (logits[B, C], labels[B])``, or a function passed as
``outputs=``. They are read in ``on_train_batch_start``, i.e. at the moment of presentation,
before the optimizer step that uses the batch (what the training forward pass sees), with a
separate forward pass under ``torch.no_grad`` in evaluation mode (dropout off, batch-norm
running statistics used and left unchanged). Cost: one extra forward pass per training batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_influence.checks import (
    check_id_type,
    check_id_values,
    check_single_device,
    check_training_dataset,
    dataset_length,
    draws_with_replacement,
)
from lightning_influence.kernels import evaluation_mode

__all__ = ["OUTPUTS_METHOD", "ForgettingEvents", "OutputsFn", "check_outputs_contract", "model_outputs"]

OUTPUTS_METHOD = "per_sample_outputs"
"""Name of the optional module method ``(batch) -> (logits[B, C], labels)`` that classification
estimators (EL2N, forgetting events) read. ``labels``: class indices ``LongTensor[B]`` or
target distributions ``Tensor[B, C]``."""

OutputsFn = Callable[[torch.nn.Module, Any], tuple[Tensor, Tensor]]
"""``(module, batch) -> (logits[B, C], labels)``: an explicit replacement for the module method."""


def check_outputs_contract(module: torch.nn.Module, outputs: OutputsFn | None = None, batch: Any = None) -> None:
    """Refuse a module without per-sample class scores (no ``outputs`` function and no
    :data:`OUTPUTS_METHOD`); given a ``batch``, also evaluate them once (evaluation mode, no
    gradient) and refuse outputs of the wrong kind or shape (:func:`model_outputs`)."""
    if outputs is None and not callable(getattr(module, OUTPUTS_METHOD, None)):
        raise TypeError(
            f"{type(module).__name__} does not provide per-sample class scores: define a method "
            f"{OUTPUTS_METHOD}(self, batch) -> (logits[B, C], labels[B]) on the module (e.g. "
            "`return self(batch[0]), batch[1]`), or pass outputs=lambda module, batch: (module(batch[0]), batch[1]) "
            "to the estimator"
        )
    if batch is not None:
        with evaluation_mode(module), torch.no_grad():
            check_class_labels(*model_outputs(module, batch, outputs))


def check_class_labels(logits: Tensor, labels: Tensor) -> None:
    """Refuse outputs that are not class scores with class labels (reads the labels' values, so
    called on one batch, or per batch by post-hoc estimators): at least two classes; indices
    ``[B]`` of an integer dtype in ``[0, C)``; distributions ``[B, C]`` with non-negative rows
    summing to 1 (multi-label 0/1 targets or regression targets are not class labels)."""
    classes = logits.shape[-1]
    if classes < 2:
        raise ValueError(
            f"{OUTPUTS_METHOD} returned logits of shape {tuple(logits.shape)}: one class score per sample. These "
            "estimators need scores over C >= 2 classes (a softmax over one column is always 1); for a binary model "
            "with one logit z, return torch.stack([torch.zeros_like(z), z], dim=-1)"
        )
    if labels.dim() == 1:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{OUTPUTS_METHOD} returned labels of dtype {labels.dtype}: class indices must be integers")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"{OUTPUTS_METHOD} returned class indices in [{int(labels.min())}, {int(labels.max())}] for {classes} classes: "
                f"expected values in [0, {classes})"
            )
        return
    rows = labels.double()
    if labels.numel() and (bool((rows < 0).any()) or not torch.allclose(rows.sum(-1), torch.ones_like(rows[:, 0]), atol=1e-6 * classes)):
        raise ValueError(
            f"{OUTPUTS_METHOD} returned labels of shape {tuple(labels.shape)} whose rows are not distributions over the "
            f"{classes} classes (non-negative, summing to 1; e.g. row sums {rows.sum(-1)[:3].tolist()}): multi-label 0/1 "
            "targets and regression targets are not class labels, and these estimators (softmax class scores) do not "
            "apply to such models. Return class indices [B] or per-sample class distributions"
        )


def model_outputs(module: torch.nn.Module, batch: Any, outputs: OutputsFn | None = None) -> tuple[Tensor, Tensor]:
    """``(logits[B, C], labels[B] or [B, C])`` of a batch, from ``outputs(module, batch)`` when
    given, else from ``module.per_sample_outputs(batch)``; the shapes are checked."""
    check_outputs_contract(module, outputs)
    result = outputs(module, batch) if outputs is not None else getattr(module, OUTPUTS_METHOD)(batch)
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, Tensor) for t in result)):
        raise TypeError(f"{OUTPUTS_METHOD} must return a pair of tensors (logits[B, C], labels), got {type(result).__name__}")
    logits, labels = result
    if logits.dim() != 2:
        raise ValueError(f"{OUTPUTS_METHOD} returned logits of shape {tuple(logits.shape)}; expected [B, C]")
    if labels.shape not in (logits.shape[:1], logits.shape):
        raise ValueError(
            f"{OUTPUTS_METHOD} returned labels of shape {tuple(labels.shape)} for logits of shape {tuple(logits.shape)}; "
            "expected class indices [B] or target distributions [B, C]"
        )
    return logits, labels


def class_labels(labels: Tensor) -> Tensor:
    """Class indices ``[B]`` from indices or from target distributions ``[B, C]`` (their argmax)."""
    return labels.argmax(dim=-1) if labels.dim() == 2 else labels


class ForgettingEvents(L.Callback):
    """Counts forgetting events per sample id during ``fit`` (see the module docstring).

    After (or during) training, :meth:`counts` gives ``(ids, events, learned, presentations)``
    for every sample presented so far. The state is part of Lightning checkpoints
    (:meth:`state_dict` / :meth:`load_state_dict`), so a resumed run counts as if uninterrupted.
    :meth:`update` takes one presentation of a batch of ids and can be fed by hand.
    """

    def __init__(self, outputs: OutputsFn | None = None) -> None:
        self.outputs = outputs
        # Indexed by sample id; grown on demand.
        self.previous = torch.zeros(0, dtype=torch.int8)  # -1: not presented yet, 0: wrong, 1: correct
        self.events = torch.zeros(0, dtype=torch.long)
        self.learned = torch.zeros(0, dtype=torch.bool)
        self.presentations = torch.zeros(0, dtype=torch.long)
        self._ids_checked = True  # set False when a fit starts: its first batch's ids are checked
        self._labels_checked = True  # likewise its class labels

    # ------------------------------------------------------------------ counting
    def _grow(self, size: int) -> None:
        have = self.events.numel()
        if size <= have:
            return
        extra = max(size, 2 * have) - have
        self.previous = torch.cat([self.previous, torch.full((extra,), -1, dtype=torch.int8)])
        self.events = torch.cat([self.events, torch.zeros(extra, dtype=torch.long)])
        self.learned = torch.cat([self.learned, torch.zeros(extra, dtype=torch.bool)])
        self.presentations = torch.cat([self.presentations, torch.zeros(extra, dtype=torch.long)])

    def update(self, ids: Tensor, correct: Tensor) -> None:
        """Record one presentation of the samples ``ids`` (``LongTensor[B]``), classified
        correctly where ``correct`` (``BoolTensor[B]``) is true. Repeated ids are taken in order."""
        ids = torch.as_tensor(ids).reshape(-1).to("cpu", torch.long)
        correct = torch.as_tensor(correct).reshape(-1).to("cpu", torch.bool)
        if ids.numel() != correct.numel():
            raise ValueError(f"update got {ids.numel()} ids and {correct.numel()} correctness flags")
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0:
            raise ValueError(f"sample ids must be non-negative, got {int(ids.min())}")
        if ids.unique().numel() != ids.numel():  # one presentation at a time, in order
            for i, c in zip(ids, correct, strict=True):
                self.update(i.reshape(1), c.reshape(1))
            return
        self._grow(int(ids.max()) + 1)
        was_correct = self.previous[ids] == 1
        self.events[ids] += (was_correct & ~correct).long()
        self.learned[ids] |= correct
        self.presentations[ids] += 1
        self.previous[ids] = correct.to(torch.int8)

    def counts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ids, events, learned, presentations)`` of every sample presented so far, by id."""
        ids = (self.presentations > 0).nonzero().reshape(-1)
        return ids, self.events[ids].clone(), self.learned[ids].clone(), self.presentations[ids].clone()

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_single_device(trainer, "ForgettingEvents")
            check_outputs_contract(pl_module, self.outputs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_training_dataset(trainer, pl_module)
        self._ids_checked = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        ids = torch.as_tensor(pl_module.sample_ids(batch)).reshape(-1)  # type: ignore[operator]
        if not self._ids_checked:  # the first batch of a fit: ids, not labels read as ids
            self._ids_checked = True
            self._labels_checked = False
            check_id_type(ids, pl_module, batch)
            check_id_values(ids, dataset_length(trainer), pl_module, batch, repeats=draws_with_replacement(trainer), owner="ForgettingEvents")
        with evaluation_mode(pl_module), torch.no_grad():
            logits, labels = model_outputs(pl_module, batch, self.outputs)
        if not self._labels_checked:
            self._labels_checked = True
            check_class_labels(logits, labels)
        correct = logits.argmax(dim=-1) == class_labels(labels)
        self.update(ids, correct)

    def state_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous.clone(),
            "events": self.events.clone(),
            "learned": self.learned.clone(),
            "presentations": self.presentations.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sizes = {k: state_dict[k].numel() for k in ("previous", "events", "learned", "presentations")}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inconsistent forgetting-event state: sizes {sizes}")
        self.previous = state_dict["previous"].to("cpu", torch.int8).clone()
        self.events = state_dict["events"].to("cpu", torch.long).clone()
        self.learned = state_dict["learned"].to("cpu", torch.bool).clone()
        self.presentations = state_dict["presentations"].to("cpu", torch.long).clone()
