"""Diff-In behind the common estimator interface: the :class:`~lightning_influence.DiffIn`
callback records during ``fit`` (and sweeps, with :mod:`~lightning_influence.estimators.diffin_sweep`);
:meth:`DiffInEstimator.scores` hands back what it computed."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_influence.callbacks.diffin import DiffIn
from lightning_influence.estimators.base import CallbackEstimator


class DiffInEstimator(CallbackEstimator):
    """Diff-In (replay or online). ``options`` are :class:`~lightning_influence.DiffIn`'s arguments
    (``target``, ``mode``, ``window``, ...). Add :meth:`callback` to the Trainer before ``fit``."""

    name: ClassVar[str] = "diffin"
    options_from: ClassVar[type | None] = DiffIn


class SGDInfluence(DiffInEstimator):
    """Trajectory SGD-influence (Hara et al., 2019): the linear influence of a sample on the final
    target loss, traced back through the recorded steps, for their counterfactual run in which the
    sample's term is dropped from each batch it was in and the batch keeps its ``1 / b``. This is
    :class:`~lightning_influence.DiffIn` in replay mode with ``batch_removal="drop"`` (the defaults
    here; every other DiffIn option applies, and so do the optimizers DiffIn models, where the paper
    treats plain SGD): Hessian products from finite differences of gradients, exact propagation.
    Units and sign: the predicted change of the target loss when the sample is dropped so; judge it
    against :func:`~lightning_influence.evaluation.leave_one_out` with ``batch_removal="drop"``."""

    name: ClassVar[str] = "sgd_influence"

    def __init__(self, **options: Any) -> None:
        if options.get("batch_removal", "drop") != "drop":
            raise ValueError(
                f"sgd_influence is DiffIn with batch_removal='drop' (SGD-influence's counterfactual), got "
                f"batch_removal={options['batch_removal']!r}: for the re-averaged removal use the diffin estimator"
            )
        super().__init__(**{"mode": "replay", "batch_removal": "drop", **options})
        self._callback._estimator_name = self.name  # the callback's scores, model.influence and save_path say so too
