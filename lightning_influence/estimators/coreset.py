"""Coreset and cleaning baselines behind the common estimator interface.

These scores are not removal influences: each says in its metadata what it measures
(``"units"``) and what a high value means (``"higher_means"``). They keep the library's
direction where it has one: a **higher score means more worth keeping**, a lower one more
suspicious / less useful:

===============  ==========================================  ========================================
name             score                                       higher means
===============  ==========================================  ========================================
``el2n``         ``||softmax(logits) - onehot(y)||_2``         harder / more informative: keep
``grand``        ``||grad_theta l_i(theta_T)||_2``             harder / more informative: keep
``forgetting``   number of forgetting events                 more often forgotten: keep
``random``       uniform in ``[0, 1)``, seeded by sample id  nothing (the random-selection baseline)
``loss``         ``-l_i(theta_T)`` (minus the final loss)    fits the model: keep; lowest = suspicious
===============  ==========================================  ========================================

For coreset selection keep the highest scores (EL2N, GraNd and forgetting keep the hard
samples, as their papers do). ``loss`` is the cleaning baseline: a mislabelled sample has a high
final loss, hence a low score, like a harmful sample under an influence estimator. Note the
tension: the hardest samples by EL2N / GraNd / forgetting include the mislabelled ones.

Every estimator here scores the samples of ``train_loader`` (by id; a sample yielded several
times is scored once) with the module in evaluation mode; ``target`` is ignored (none of these
scores depends on a target). Forgetting counts events during ``fit``: add
:meth:`Forgetting.callback` to the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_influence.checks import check_dataset_ids
from lightning_influence.callbacks.forgetting import ForgettingEvents, OutputsFn, check_class_labels, check_outputs_contract, model_outputs
from lightning_influence.estimators.base import (
    Estimator,
    Target,
    attributed_space,
    check_unique_ids,
    device_batches,
    non_finite_samples_error,
    posthoc_training,
    progress,
)
from lightning_influence.kernels import evaluation_mode, per_sample_gradients
from lightning_influence.scores import InfluenceScores
from lightning_influence.solvers import check_embeddings
from lightning_influence.validation import check_count, check_seed

__all__ = ["EL2N", "FinalLoss", "Forgetting", "GraNd", "RandomScores", "per_sample_values"]


def _loader_length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def per_sample_values(
    module: L.LightningModule,
    loader: Iterable[Any],
    fn: Callable[[Any], Tensor],
    *,
    description: str = "scoring",
    show_progress: bool = True,
    no_grad: bool = True,
    finite: str | None = None,
    owner: str = "",
) -> tuple[Tensor, Tensor]:
    """``fn(batch) -> Tensor[B, ...]`` over every batch of ``loader`` (moved to the module's
    device), with the module in evaluation mode. Returns ``(ids, values)``: the sample ids
    sorted ascending, each once (a sample yielded again, in a later epoch of the loader, keeps its
    first value), and the values as float64 on the CPU, in id order. A batch that holds an id twice
    (batches without ids, whose labels the default ``sample_ids`` would read) is refused
    (:func:`~lightning_influence.estimators.base.check_unique_ids`). ``finite``: what the values
    measure (e.g. ``"loss gradient"``); samples whose values are not all finite are then refused
    (:func:`~lightning_influence.estimators.base.non_finite_samples_error`, naming ``owner``)."""
    check_dataset_ids(getattr(loader, "loader", loader), module)
    ids_parts: list[Tensor] = []
    value_parts: list[Tensor] = []
    positions: list[Tensor] = []
    grad_context = torch.no_grad() if no_grad else torch.enable_grad()
    with evaluation_mode(module), grad_context:
        batches = progress(device_batches(module, loader), description, show_progress, total=_loader_length(loader))
        for batch in batches:
            ids = module.sample_ids(batch).reshape(-1).to("cpu", torch.long)  # type: ignore[operator]
            check_unique_ids(ids, scope="batch")
            values = fn(batch)
            if values.dim() == 0 or values.shape[0] != ids.numel():
                raise ValueError(f"got {tuple(values.shape)} values for a batch of {ids.numel()} sample ids; expected [B, ...]")
            ids_parts.append(ids)
            value_parts.append(values.detach().to("cpu", torch.float64))
            positions.append(torch.full((ids.numel(),), len(positions)))
    if not ids_parts:
        raise ValueError("the training loader produced no batches: nothing to score")
    ids, values = torch.cat(ids_parts), torch.cat(value_parts)
    if finite is not None:
        ok = torch.isfinite(values.reshape(values.shape[0], -1)).all(1)
        if not bool(ok.all()):
            raise non_finite_samples_error(owner or "scores", ids[~ok], finite, torch.cat(positions)[~ok].tolist())
    order = torch.argsort(ids, stable=True)
    ids, values = ids[order], values[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    return ids[first], values[first]


def _metadata(estimator: Estimator, units: str, higher_means: str, **extra: Any) -> dict[str, Any]:
    return {
        "estimator": estimator.name,
        "target": "none",
        "units": units,
        "higher_means": higher_means,
        "sign_convention": ranking_convention(higher_means),
        "calibrated": False,
        **extra,
    }


def ranking_convention(higher_means: str) -> str:
    """The ``sign_convention`` of scores that rank samples instead of predicting a removal effect."""
    return f"a ranking, not a target-loss change: higher = {higher_means}"


class _ClassScores:
    """Estimators that read per-sample class scores (``outputs`` or the module's
    ``per_sample_outputs``): their :meth:`check_module` refuses a module without them."""

    outputs: OutputsFn | None

    def check_module(self, module: torch.nn.Module, batch: Any = None) -> None:
        check_outputs_contract(module, self.outputs, batch)


class EL2N(_ClassScores, Estimator):
    """EL2N (Paul et al., 2021): ``||softmax(logits_i) - onehot(y_i)||_2`` at the final parameters.

    Needs class scores: the module's ``per_sample_outputs(batch) -> (logits[B, C], labels)``
    (labels: class indices ``[B]`` or target distributions ``[B, C]``), or ``outputs=`` a
    function ``(module, batch) -> (logits, labels)``. Dimensionless, in ``[0, sqrt(2)]``.
    Higher: harder / more informative (keep). ``target`` is ignored. The paper averages over
    several early-training checkpoints or runs: score each and average the ``values``.
    """

    ranks_for_keeping = True
    predicts_removal = False

    name: ClassVar[str] = "el2n"

    def __init__(self, outputs: OutputsFn | None = None, progress: bool = True) -> None:
        if outputs is not None and not callable(outputs):
            raise TypeError(f"outputs must be a function (module, batch) -> (logits, labels), got {type(outputs).__name__}")
        self.outputs = outputs
        self.progress = progress

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        def el2n(batch: Any) -> Tensor:
            logits, labels = model_outputs(module, batch, self.outputs)
            check_class_labels(logits, labels)
            probs = torch.softmax(logits.double(), dim=-1)
            onehot = F.one_hot(labels, logits.shape[-1]).double() if labels.dim() == 1 else labels.double()
            return (probs - onehot).norm(dim=-1)

        ids, values = per_sample_values(
            module, train_loader, el2n, description="EL2N", show_progress=self.progress, finite="class scores (EL2N)", owner=f"estimator {self.name!r}"
        )
        return InfluenceScores(
            ids, values, _metadata(self, "L2 norm of softmax(logits) - onehot(label), dimensionless in [0, sqrt(2)]", "harder / more informative sample: keep")
        )


class GraNd(Estimator):
    """GraNd (Paul et al., 2021): ``||grad_theta l_i(theta_T)||_2``, the per-sample loss-gradient
    norm at the final parameters (all trainable parameters, or those matching the fnmatch
    patterns ``params``), in evaluation mode. ``chunk_size`` bounds how many per-sample gradients
    are vectorised at once. Units: target-loss units per unit parameter. Higher: harder / more
    informative (keep). ``target`` is ignored. (Averaging over re-initialisations, as in the
    paper's early-training variant, is left to the caller: score several modules, average.)
    """

    ranks_for_keeping = True
    predicts_removal = False

    name: ClassVar[str] = "grand"

    def __init__(self, params: Sequence[str] | None = None, chunk_size: int | None = 64, progress: bool = True) -> None:
        check_count("chunk_size", chunk_size, none_ok=True)
        self.params = list(params) if params else None
        self.chunk_size = chunk_size
        self.progress = progress

    def check_module(self, module: torch.nn.Module, batch: Any = None) -> None:
        """Also refuse an attributed embedding with ``sparse=True`` (its gradient is a sparse tensor)."""
        super().check_module(module)
        check_embeddings(module, attributed_space(module, self.params)[0].names, f"estimator {self.name!r}")

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        train_loader = posthoc_training(module, train_loader, f"estimator {self.name!r}", alone=True)  # differentiable losses, before any work
        space, theta, loss_fn = attributed_space(module, self.params)
        check_embeddings(module, space.names, f"estimator {self.name!r}")  # before any gradient

        def norms(batch: Any) -> Tensor:
            return per_sample_gradients(loss_fn, space, theta, batch, chunk_size=self.chunk_size).double().norm(dim=1)

        ids, values = per_sample_values(
            module, train_loader, norms, description="GraNd", show_progress=self.progress, no_grad=False, finite="loss gradient", owner=f"estimator {self.name!r}"
        )
        return InfluenceScores(
            ids,
            values,
            _metadata(self, "L2 norm of the per-sample loss gradient (loss units per unit parameter)", "harder / more informative sample: keep", parameters=space.size),
        )


class Forgetting(_ClassScores, Estimator):
    """Forgetting events (Toneva et al., 2019), counted during ``fit`` by
    :class:`~lightning_influence.callbacks.forgetting.ForgettingEvents` (add :meth:`callback` to
    the Trainer). Score: the number of forgetting events; samples never learned get
    ``never_learned_value`` = the largest number of presentations of any sample, which exceeds
    every possible event count (at most half the presentations), so they rank as the most
    forgettable. Units: events (a count). Higher: more often forgotten (keep); the lowest,
    unforgettable samples are the ones the paper prunes. Scores every sample presented during
    ``fit``; ``train_loader`` and ``target`` are ignored.
    """

    ranks_for_keeping = True
    predicts_removal = False

    name: ClassVar[str] = "forgetting"
    records_training: ClassVar[bool] = True

    def __init__(self, outputs: OutputsFn | None = None) -> None:
        if outputs is not None and not callable(outputs):
            raise TypeError(f"outputs must be a function (module, batch) -> (logits, labels), got {type(outputs).__name__}")
        self.outputs = outputs
        self._callback: ForgettingEvents | None = None

    def callback(self) -> ForgettingEvents:
        if self._callback is None:
            self._callback = ForgettingEvents(self.outputs)
        return self._callback

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        if self._callback is None or not bool((self._callback.presentations > 0).any()):
            raise RuntimeError("forgetting events are counted during fit: add estimator.callback() to the Trainer, run fit, then call scores()")
        ids, events, learned, presentations = self._callback.counts()
        never = int(self._callback.presentations.max())
        values = torch.where(learned, events, torch.full_like(events, never)).double()
        return InfluenceScores(
            ids,
            values,
            _metadata(
                self,
                "forgetting events (count); never-learned samples get never_learned_value",
                "more often forgotten (harder) sample: keep",
                never_learned_value=never,
                never_learned=int((~learned).sum()),
                presentations=int(presentations.sum()),
            ),
        )


class RandomScores(Estimator):
    """The random-selection baseline: a uniform number in ``[0, 1)`` per sample, a function of
    ``seed`` and the sample id only (reproducible, independent of the loader's order and of the
    other ids; :func:`uniform_hash`).
    Dimensionless; higher means nothing. ``target`` is ignored."""

    name: ClassVar[str] = "random"
    predicts_removal: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        check_seed("seed", seed)
        self.seed = seed

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        ids, _ = per_sample_values(module, train_loader, lambda batch: torch.zeros(module.sample_ids(batch).numel()), show_progress=False)  # type: ignore[operator]
        return InfluenceScores(ids, uniform_hash(ids, self.seed), _metadata(self, "uniform random number in [0, 1)", "nothing (random baseline)", seed=self.seed))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on ``uint64`` values (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_hash(ids: Tensor, seed: int) -> Tensor:
    """A uniform float64 in ``[0, 1)`` per id, a function of ``(seed, id)`` alone (SplitMix64 of
    the id keyed by the seed): the same for an id whatever the other ids, their order or their
    size (ids up to 2**63), in O(len(ids)) memory."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
        bits = _splitmix64(ids.cpu().numpy().astype(np.uint64) ^ key)
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class FinalLoss(Estimator):
    """The final-loss baseline: ``-l_i(theta_T)``, minus each sample's loss at the final
    parameters (evaluation mode). Units: the training loss's (e.g. nats). Lowest = highest loss
    = most suspicious (likely mislabelled), the same direction as a harmful influence; the
    baseline a cleaning method must beat. ``target`` is ignored."""

    name: ClassVar[str] = "loss"
    predicts_removal: ClassVar[bool] = False

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        def negative_loss(batch: Any) -> Tensor:
            losses = module.per_sample_loss(batch)  # type: ignore[operator]
            if losses.dim() != 1:
                raise ValueError(f"per_sample_loss returned shape {tuple(losses.shape)}; expected [B]")
            return -losses

        ids, values = per_sample_values(
            module, train_loader, negative_loss, description="final loss", show_progress=self.progress, finite="loss", owner=f"estimator {self.name!r}"
        )
        return InfluenceScores(ids, values, _metadata(self, "minus the final per-sample training loss (loss units)", "lower loss (fits the model); lowest = most suspicious"))
