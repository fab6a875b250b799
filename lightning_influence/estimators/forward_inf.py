"""Forward-INF (mirrored influence): fit the target, watch the training losses move.

Instead of asking how the target loss changes when a training sample is removed, ask the
mirrored question: train a copy of the final model on the target for a few steps and measure
how every training sample's loss moves,

    raw_i = l_i(theta') - l_i(theta_T),     theta' = theta_T after `steps` optimizer steps on F,

one forward pass over the training set per target column (the base losses ``l_i(theta_T)``
are computed once and reused for every column). Cost per column: ``steps`` backward passes
over the target samples and N forward passes. ``raw_i`` subtracts losses of two passes over
the training loader, so the loader must serve the same inputs on every pass: one with a random
augmentation (whose noise would swamp the shift) is refused (see
:class:`~lightning_influence.estimators.base.TrainingPasses`).

**Sign and units (calibration).** With ``direction="descent"`` and plain SGD at learning rate
``lr`` for ``k`` steps, ``theta' - theta_T = -k lr grad F + O(lr^2)``, so

    raw_i = -k lr <grad l_i, grad F> + O(lr^2).

A training sample whose loss drops when we fit the target is aligned with it: it helps. The
first-order removal influence of sample ``i`` accumulated over training with the final
gradients (TracIn at the final checkpoint) is ``(sum_t lr_t / n) <grad F, grad l_i>`` (sample
``i`` carries weight ``1/b`` in the ``n/b`` of every ``n``-sample epoch's steps it is in), so
the score is

    score_i = -raw_i * learning_rate_sum / (n k lr)        (descent; ascent: +raw_i * ...)

which tends to ``(learning_rate_sum / n) <grad F, grad l_i>`` as ``lr -> 0``: the TracIn-at-
the-end estimate in target-loss units with the library's sign (positive helps). Without
``learning_rate_sum`` (the default, 1) it is ``(1/n) <grad F, grad l_i>``: the target-loss
change per unit of summed training learning rate. Larger ``lr`` / more steps add the model's
nonlinearity (the point of the method): to second order, ``k`` SGD steps move the parameters by
``-(I - (I - lr H_F)^k) H_F^{-1} grad F`` (``H_F``: the target's Hessian), a truncated Neumann
series that damps the target's stiff directions; this is what lifts the agreement with
leave-one-out retraining from about 0.38 (one step) to about 0.68 (100 steps at lr 0.1) on the
digits MLP (Spearman, see the README), with the summed step ``k lr`` as the knob that must be
tuned (too far and it drops again). Adam or other optimizers have no such calibration
(their step is not proportional to the gradient) and the metadata says so. With
``signed=False`` the absolute value is returned (the public code's choice): a magnitude, and
the sign convention no longer applies.

**Module untouched.** The fit runs on cloned parameter tensors through
``torch.func.functional_call``: the user's module keeps its parameters, buffers (batch-norm
running statistics) and train/eval flags. The fit runs in evaluation mode by default (dropout
off, running statistics used), so that it differentiates the same function that is
evaluated; ``train_mode=True`` fits in training mode on cloned buffers (batch-norm statistics
of the copy move, then are discarded). Losses are always evaluated in evaluation mode with
the final model's buffers.

**Targets.** ``"val"``: one column, the fit descends the mean loss over the loader.
``"query"``: one column per query sample (``N x Q``), each fitted alone from ``theta_T``.
``"train"``: the library's train target, the mean training loss (one column); the fit
descends it. (Self-influence, each sample fitted alone and scored on itself, is what
:class:`~lightning_influence.estimators.outlier_gradient.OutlierGradient` computes in closed
form to first order.) ``columns="each"`` / ``"group"`` overrides the default (``"each"`` for
query, ``"group"`` otherwise). ``Target.sample_count`` selects a fixed random subset of the
target samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from lightning_influence.estimators.base import Estimator, Target, as_target, attributed_space, posthoc_training, progress
from lightning_influence.estimators.coreset import per_sample_values
from lightning_influence.estimators.influence_functions import target_subset
from lightning_influence.batches import batch_size, select_samples
from lightning_influence.kernels import PerSampleLossFn, module_mode
from lightning_influence.scores import InfluenceScores

__all__ = ["ForwardInf"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DIRECTIONS = ("descent", "ascent")
COLUMNS = ("auto", "each", "group")


class ForwardInf(Estimator):
    """Forward-INF scores (see the module docstring for sign, units and calibration).

    ``direction``: ``"descent"`` (the target is added: fit it) or ``"ascent"`` (unlearn it).
    ``steps``: optimizer steps on the target (>= 1). ``lr``: their learning rate.
    ``optimizer``: ``"sgd"``, ``"adam"`` or a ``torch.optim.Optimizer`` subclass, built with
    ``optimizer_options``. ``signed``: keep the sign (default) or return magnitudes.
    ``columns``: ``"auto"``, ``"each"`` (one column per target sample) or ``"group"``.
    ``learning_rate_sum``: the sum of the training learning rates (steps x lr for a constant
    rate), to express scores in target-loss units; default 1. ``params``: fnmatch patterns of
    the parameters that the fit moves (default: all trainable). ``train_mode``: fit in training
    mode (default: evaluation mode).
    """

    name: ClassVar[str] = "forward_inf"

    def __init__(
        self,
        direction: str = "descent",
        steps: int = 1,
        lr: float = 1e-3,
        optimizer: str | type[torch.optim.Optimizer] = "sgd",
        optimizer_options: Mapping[str, Any] | None = None,
        signed: bool = True,
        columns: str = "auto",
        learning_rate_sum: float | None = None,
        params: Sequence[str] | None = None,
        train_mode: bool = False,
        progress: bool = True,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'descent' (fit the target) or 'ascent' (unlearn it), got {direction!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (optimizer steps on the target), got {steps!r}")
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if columns not in COLUMNS:
            raise ValueError(f"columns must be one of {COLUMNS}, got {columns!r}")
        if learning_rate_sum is not None and (not math.isfinite(learning_rate_sum) or learning_rate_sum <= 0):
            raise ValueError(f"learning_rate_sum must be a positive number (sum of the training learning rates) or None, got {learning_rate_sum!r}")
        if isinstance(optimizer, str):
            if optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a torch.optim.Optimizer subclass, got {optimizer!r}")
            optimizer_class = OPTIMIZERS[optimizer]
        elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            optimizer_class = optimizer
        else:
            raise TypeError(f"optimizer must be 'sgd', 'adam' or a torch.optim.Optimizer subclass, got {optimizer!r}")
        self.direction = direction
        self.steps = steps
        self.lr = float(lr)
        self.optimizer = optimizer if isinstance(optimizer, str) else optimizer.__name__
        self.optimizer_options = dict(optimizer_options or {})
        self.signed = bool(signed)
        self.columns = columns
        self.learning_rate_sum = learning_rate_sum
        self.params = list(params) if params else None
        self.train_mode = bool(train_mode)
        self.progress = progress
        self._optimizer_class = optimizer_class
        try:  # bad options fail here, not after the base pass
            optimizer_class([torch.zeros(1, requires_grad=True)], lr=self.lr, **self.optimizer_options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build {optimizer_class.__name__} with lr={self.lr} and options {self.optimizer_options}: {err}") from err

    # ------------------------------------------------------------------ pieces
    def _fit(self, loss_fn: PerSampleLossFn, start: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batches: Callable[[], Iterable[Any]]) -> dict[str, Tensor]:
        """Parameters after ``steps`` optimizer steps on the mean loss over ``batches()``,
        from cloned ``start`` values (buffers cloned too: the module is never written)."""
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in start.items()}
        fit_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        optimizer = self._optimizer_class(list(leaves.values()), lr=self.lr, **self.optimizer_options)
        sign = 1.0 if self.direction == "descent" else -1.0
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                count = 0
                for batch in batches():
                    losses = loss_fn({**leaves, **fit_buffers}, batch)
                    if losses.dim() != 1:
                        raise ValueError(f"per_sample_loss returned shape {tuple(losses.shape)} on a target batch; expected [B]")
                    (sign * losses.sum()).backward()
                    count += losses.numel()
                if count == 0:
                    raise ValueError("the target produced no samples: nothing to fit")
                for p in leaves.values():
                    if p.grad is not None:
                        p.grad.div_(count)
                optimizer.step()
        return {n: p.detach() for n, p in leaves.items()}

    def _units(self) -> tuple[str, str]:
        scale = "learning_rate_sum" if self.learning_rate_sum is not None else "1"
        if self.optimizer == "sgd" and not self.optimizer_options:
            units = (
                f"first order in lr: ({scale} / n) <grad F, grad l_i> (TracIn at the final checkpoint); "
                + ("target-loss change when the sample is removed" if self.learning_rate_sum is not None else "target-loss change per unit of summed training learning rate")
            )
        else:
            units = f"training-loss shift -(l_i(theta') - l_i(theta)) x {scale} / (n steps lr) with {self.optimizer}: not calibrated to a gradient dot product (only plain sgd is)"
        if not self.signed:
            return "absolute value of " + units, "larger influence of either sign (magnitude: the sign convention does not apply)"
        return units, "helps the target (its loss moves with the target's)"

    # ------------------------------------------------------------------ scores
    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        target = as_target(target)
        columns = self.columns if self.columns != "auto" else ("each" if target.kind == "query" else "group")
        train_loader = posthoc_training(module, train_loader, f"estimator {self.name!r}")  # a pass per column: the same samples each
        space, theta, loss_fn = attributed_space(module, self.params)
        start = space.unflatten(theta)
        buffers = dict(module.named_buffers())
        selector = target.gradient(module, train_loader)  # its sample_count subset and batches
        selector._resolve_subset()

        def target_batches() -> Iterator[Any]:
            position = 0
            for batch in selector.batches():
                size = batch_size(batch)
                keep = selector._keep(batch, position, size, theta.device)
                position += size
                if keep is not None:
                    if keep.numel() == 0:
                        continue
                    batch = select_samples(batch, keep)
                yield batch

        def losses_at(params: Mapping[str, Tensor], description: str, show: bool) -> tuple[Tensor, Tensor]:
            return per_sample_values(module, train_loader, lambda b: loss_fn(params, b), description=description, show_progress=show)

        ids, base = losses_at(start, "Forward-INF base losses", self.progress)
        with module_mode(module, self.train_mode):
            if columns == "group":
                groups: list[Callable[[], Iterable[Any]]] = [target_batches]
            else:
                singles = [select_samples(b, torch.tensor([i])) for b in target_batches() for i in range(batch_size(b))]
                groups = [lambda s=s: [s] for s in singles]
            if not groups:
                raise ValueError(f"the {target.kind} target produced no samples")
            shifts = []
            for fit_batches in progress(groups, f"Forward-INF ({len(groups)} target columns)", self.progress and len(groups) > 1):
                fitted = self._fit(loss_fn, start, buffers, fit_batches)
                _, moved = losses_at(fitted, "Forward-INF shifted losses", self.progress and len(groups) == 1)  # evaluation mode
                shifts.append(moved - base)  # the same samples and inputs as the base pass (checked by the passes)
        raw = torch.stack(shifts, dim=1)
        n = ids.numel()
        scale = (self.learning_rate_sum or 1.0) / (n * self.steps * self.lr)
        direction_sign = -1.0 if self.direction == "descent" else 1.0
        values = direction_sign * raw * scale if self.signed else raw.abs() * scale
        if columns == "group":
            values = values[:, 0]
        units, higher = self._units()
        metadata = {
            "estimator": self.name,
            "target": target.kind,
            **target_subset(target),
            "columns": columns,
            "column_positions": selector.sample_positions() if columns == "each" else None,
            "direction": self.direction,
            "steps": self.steps,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "signed": self.signed,
            "train_mode": self.train_mode,
            "learning_rate_sum": self.learning_rate_sum,
            "scale": scale,
            "units": units,
            "higher_means": higher,
            # target-loss units only for signed plain-SGD scores scaled by the training run's learning rates
            "calibrated": self.signed and self.optimizer == "sgd" and not self.optimizer_options and self.learning_rate_sum is not None,
            "parameters": space.size,
        }
        return InfluenceScores(ids, values, metadata)
