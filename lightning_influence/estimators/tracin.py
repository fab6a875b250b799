"""TracIn behind the common estimator interface: online (:class:`TracInEstimator`, accumulated at every
optimizer step by the :class:`~lightning_influence.callbacks.tracin.TracIn` callback) and over
recorded parameter checkpoints (:class:`TracInCheckpoints`, the classic TracInCP).

Units and sign (both): the first-order predicted change of the target loss when the sample is
removed from training; positive: the sample helps.

**Checkpoint scaling.** Online TracIn adds ``eta_t / (n b_t) <Lambda grad F(theta_t), grad l_z(theta_t)>``
at each step ``t`` whose batch holds ``z`` (``n b_t`` samples per step). A checkpoint ``c`` taken at
step ``s_c`` stands for the steps ``[s_c, s_{c+1})`` (:meth:`RecordedCheckpoints.segments`); with
epoch-wise reshuffling each sample is in a step's batch with probability ``n b_t / N``, so its
*expected* contribution over the segment is ``sum_{t in segment} eta_t / N`` times the inner product
at ``theta_c``: ``weighting="expected"`` (the classic TracInCP, every sample at every checkpoint; with
a checkpoint every ``k`` steps at a constant rate this is ``eta k / N``, i.e. ``k b / N`` visits of
``eta / b`` each). ``weighting="visits"`` uses the recorded batches instead: ``eta_t / (n b_t)``
for each step of the segment that really held ``z``; with a checkpoint at every step it is exactly
the online TracIn sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import Tensor

from lightning_influence.callbacks.checkpoints import ParameterCheckpoints, RecordedCheckpoints, Sampling, first_order_units
from lightning_influence.callbacks.tracin import TracIn as TracInCallback
from lightning_influence.estimators.base import (
    CallbackEstimator,
    Estimator,
    Target,
    as_target,
    attributed_space,
    device_batches,
    different_passes_message,
    posthoc_training,
    progress,
)
from lightning_influence.kernels import ParameterSpace, PerSampleLossFn, all_finite, directional_derivatives, evaluation_mode
from lightning_influence.scores import InfluenceScores
from lightning_influence.targets import TargetGradient
from lightning_influence.validation import check_seed

__all__ = ["TracInEstimator", "TracInCheckpoints", "CheckpointEstimator"]

Weighting = Literal["expected", "visits"]


class TracInEstimator(CallbackEstimator):
    """Online TracIn. ``options`` are :class:`~lightning_influence.callbacks.tracin.TracIn`'s
    arguments (``target``, ``target_loader``, ``target_samples``, ``target_every``, ``save_path``).
    Add :meth:`callback` to the Trainer before ``fit``; :meth:`scores` returns what it accumulated."""

    name: ClassVar[str] = "tracin"
    options_from: ClassVar[type | None] = TracInCallback


class CheckpointTotals:
    """Per-sample sums of checkpoint terms, in id order (float64 ``[N, Q]``). Every checkpoint must
    score the same samples; a non-finite term is refused, naming the checkpoint's step."""

    def __init__(self, estimator: str) -> None:
        self.estimator = estimator
        self.ids: Tensor | None = None
        self.totals: Tensor | None = None

    def add(self, ids: Tensor, contribution: Tensor, step: int) -> None:
        if not all_finite(contribution):
            raise FloatingPointError(f"non-finite {self.estimator} terms at the checkpoint of step {step}")
        order = torch.argsort(ids)
        if self.totals is None:
            self.totals, self.ids = contribution[order], ids[order]
        elif not torch.equal(ids[order], self.ids):  # the passes are checked as they are read: a last guard
            raise ValueError(different_passes_message(self.estimator, f"different samples at the checkpoint of step {step}"))
        else:
            self.totals += contribution[order]

    def result(self, single: bool) -> tuple[Tensor, Tensor]:
        """``(ids[N], values)``: ``values`` is ``[N]`` for a single target column, else ``[N, Q]``."""
        if self.totals is None or self.ids is None:
            raise ValueError("no checkpoint was scored")
        return self.ids, self.totals[:, 0] if single else self.totals


class CheckpointEstimator(Estimator):
    """Shared machinery of the estimators that work on recorded parameter checkpoints.

    Either record during fit (``every`` / ``count`` / ``sampling`` / ``seed`` / ``directory``: the
    :class:`~lightning_influence.callbacks.checkpoints.ParameterCheckpoints` returned by
    :meth:`callback`), or pass ``checkpoints``: a :class:`RecordedCheckpoints` or the directory one was
    written to (then :meth:`callback` is ``None``).
    """

    records_training: ClassVar[bool] = True
    default_count: ClassVar[int] = 10
    default_sampling: ClassVar[Sampling] = "even"

    def __init__(
        self,
        *,
        every: int | None = None,
        count: int | None = None,
        sampling: Sampling | None = None,
        seed: int = 0,
        directory: str | Path | None = None,
        checkpoints: RecordedCheckpoints | str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.checkpoints = checkpoints
        check_seed("seed", seed)
        self.seed = seed
        self.progress = progress
        self._callback: ParameterCheckpoints | None = None
        if checkpoints is not None:
            if every is not None or count is not None or directory is not None:
                raise ValueError("give either checkpoints=<recorded checkpoints or directory> or recording options (every/count/directory), not both")
            if not isinstance(checkpoints, (RecordedCheckpoints, str, Path)):
                raise TypeError(f"checkpoints must be a RecordedCheckpoints or a directory path, got {type(checkpoints).__name__}")
        else:
            if every is None and count is None:
                count = self.default_count
            self._callback = ParameterCheckpoints(
                every, count, directory=directory, sampling=sampling or self.default_sampling, seed=seed
            )

    def callback(self) -> ParameterCheckpoints | None:
        return self._callback

    def record(self) -> RecordedCheckpoints:
        """The checkpoints to score with (given, loaded from their directory, or recorded in fit)."""
        if isinstance(self.checkpoints, RecordedCheckpoints):
            record = self.checkpoints
        elif self.checkpoints is not None:
            record = RecordedCheckpoints.load(self.checkpoints)
        elif self._callback is None or self._callback.record is None:
            raise RuntimeError(
                f"{type(self).__name__} scores recorded checkpoints: add estimator.callback() to the Trainer and run fit "
                "first, or pass checkpoints=<directory written by ParameterCheckpoints>"
            )
        else:
            record = self._callback.record
        if len(record) == 0:
            raise ValueError(
                "the checkpoint set is empty: no parameter checkpoint was recorded (did fit run any optimizer step?); "
                "record with ParameterCheckpoints(every=k) or count=m"
            )
        return record

    @staticmethod
    def space_for(module: L.LightningModule, record: RecordedCheckpoints) -> tuple[ParameterSpace, PerSampleLossFn, Tensor]:
        """The module's parameter space restricted to the checkpointed parameters, its functional loss,
        and the optimizer group of each parameter tensor (``LongTensor[len(space.names)]``); refuses
        checkpoints that do not fit the module."""
        recorded = record.parameter_names()
        own = dict(module.named_parameters())
        unknown = [n for n in recorded if n not in own]
        if unknown:
            raise ValueError(
                f"the checkpoints hold parameters {unknown[:5]} that {type(module).__name__} does not have: they were "
                f"recorded from another model (its parameters are named like {list(own)[:5]})"
            )
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        missing = [n for n in trainable if n not in set(recorded)]
        if missing:
            raise ValueError(
                f"the checkpoints lack the trainable parameters {missing[:5]} of {type(module).__name__}: they were "
                "recorded from another model or optimizer; record them again for this model"
            )
        space, _, loss_fn = attributed_space(module, list(recorded))
        group = {n: g for g, names in enumerate(record.param_groups) for n in names}
        return space, loss_fn, torch.tensor([group[n] for n in space.names], dtype=torch.long)

    @staticmethod
    def theta_of(space: ParameterSpace, params: dict[str, Tensor], step: int) -> Tensor:
        """The flat parameters of one checkpoint, checked against the module's shapes."""
        for name, shape in zip(space.names, space.shapes, strict=True):
            if name not in params:
                raise ValueError(f"the checkpoint of step {step} has no parameter {name!r}")
            if params[name].shape != shape:
                raise ValueError(
                    f"the checkpoint of step {step} holds {name!r} of shape {tuple(params[name].shape)} but the model's is "
                    f"{tuple(shape)}: the checkpoints were recorded from another model"
                )
        return space.flatten({n: params[n].to(space.device) for n in space.names})

    @staticmethod
    def trained_samples(record: RecordedCheckpoints) -> int:
        """``N``: the number of distinct samples in the recorded steps (else the dataset length)."""
        if record.step_ids:
            ids = torch.cat([i for step in record.step_ids for i in step])
            if ids.numel():
                return int(ids.unique().numel())
        if record.num_samples:
            return int(record.num_samples)
        raise ValueError("the checkpoints carry no step log with sample ids and no dataset length: N is unknown")

    @staticmethod
    def unique_batches(module: L.LightningModule, train_loader: Iterable[Any]) -> Iterator[tuple[Any, Tensor, Tensor]]:
        """``(batch, ids, fresh)``: the training loader's batches on the module's device with their
        sample ids and a mask of the samples not yet yielded (a loader over several epochs scores
        each sample once)."""
        seen: set[int] = set()
        for batch in device_batches(module, train_loader):
            ids = torch.as_tensor(module.sample_ids(batch)).detach().to("cpu", torch.long).reshape(-1)  # type: ignore[operator]
            fresh = torch.tensor([int(i) not in seen for i in ids.tolist()], dtype=torch.bool)
            if not bool(fresh.any()):
                continue
            seen.update(ids.tolist())
            yield batch, ids, fresh

    def target_gradient(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target) -> TargetGradient:
        return target.gradient(module, train_loader)


def _calibration(record: RecordedCheckpoints) -> dict[str, Any]:
    """``calibrated`` (never: :func:`~lightning_influence.callbacks.checkpoints.first_order_units`) and
    ``units`` of first-order scores over ``record`` (``record.calibrated``: whether the run's update was
    plain unclipped SGD; ``None`` for checkpoints recorded without that fact)."""
    plain_sgd = bool(record.calibrated) if record.calibrated is not None else False
    update = record.update or "an unrecorded update"
    return {"calibrated": False, "units": first_order_units(plain_sgd, update)}


class TracInCheckpoints(CheckpointEstimator):
    """TracInCP: ``sum_c w_c(z) <Lambda... grad F(theta_c), grad l_z(theta_c)>`` over recorded checkpoints.

    ``weighting="expected"`` (default, the classic TracInCP): every sample at every checkpoint with
    ``w_{c,g} = sum_{t in segment c} eta_{t,g} / N``. ``weighting="visits"``: ``eta_{t,g} / (n b_t)`` for
    each step of the segment whose batch held the sample. Recording options: see
    :class:`CheckpointEstimator` (default ``count=10`` evenly spaced checkpoints).
    """

    name: ClassVar[str] = "tracin_checkpoints"

    def __init__(self, *, weighting: Weighting = "expected", **options: Any) -> None:
        if weighting not in ("expected", "visits"):
            raise ValueError(f"weighting must be 'expected' or 'visits', got {weighting!r}")
        self.weighting: Weighting = weighting
        super().__init__(**options)

    def _weights(self, record: RecordedCheckpoints, segment: tuple[int, int], groups: int, size: int, n: int) -> Tensor:
        """``[size, G]`` float64 weight of each sample id and parameter group for one checkpoint."""
        start, end = segment
        lrs = record.step_lrs[start:end]
        if self.weighting == "expected":
            return (lrs.sum(dim=0) / n).reshape(1, groups).expand(size, groups)
        if len(record.step_ids) < end:
            raise ValueError("weighting='visits' needs the step log's sample ids for every step; these checkpoints have none")
        weights = torch.zeros(size, groups, dtype=torch.float64)
        for t in range(start, end):
            normalizer = int(record.step_normalizers[t])
            for ids in record.step_ids[t]:
                if ids.numel() and int(ids.max()) >= size:
                    raise ValueError(f"step {t} holds sample id {int(ids.max())} that the training loader does not yield")
                weights.index_add_(0, ids, (lrs[t - start] / (normalizer * ids.numel())).expand(ids.numel(), groups))
        return weights

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        target = as_target(target)
        record = self.record()
        train_loader = posthoc_training(module, train_loader, f"estimator {self.name!r}")  # a pass per checkpoint: the same samples each
        space, loss_fn, group_of = self.space_for(module, record)
        groups = len(record.param_groups)
        n = self.trained_samples(record)
        gradient = self.target_gradient(module, train_loader, target)
        totals = CheckpointTotals("TracInCP")
        passes = 0
        with evaluation_mode(module):
            segments = record.segments()
            for c, checkpoint in enumerate(progress(record.checkpoints, "TracInCP checkpoints", self.progress)):
                theta = self.theta_of(space, checkpoint.parameters(), checkpoint.step)
                grad_f = gradient(loss_fn, space, theta)
                columns = grad_f.reshape(space.size, -1)
                masks = [space.expand((group_of == g).to(torch.float64)).to(theta.device) for g in range(groups)]
                params = space.unflatten(theta)
                batch_ids: list[Tensor] = []
                batch_values: list[Tensor] = []
                for batch, ids, fresh in self.unique_batches(module, train_loader):
                    batch_ids.append(ids[fresh])
                    batch_values.append(self._batch_values(loss_fn, space, params, batch, columns, masks, groups, ids, fresh))
                    passes += len(masks) * columns.shape[1] if groups > 1 else columns.shape[1]
                ids = torch.cat(batch_ids)
                values = torch.cat(batch_values)  # [n_ids, G, Q]
                size = int(ids.max()) + 1
                weights = self._weights(record, segments[c], groups, size, n)[ids]  # [n_ids, G]
                totals.add(ids, (weights.unsqueeze(-1) * values).sum(dim=1), checkpoint.step)  # [n_ids, Q]
        all_ids, values = totals.result(single=target.kind != "query")
        return InfluenceScores(
            all_ids,
            values,
            {
                "estimator": self.name,
                "target": target.kind,
                "target_samples": target.sample_count,
                "column_positions": gradient.sample_positions() if target.kind == "query" else None,
                "weighting": self.weighting,
                "checkpoints": len(record),
                "checkpoint_steps": ",".join(str(c.step) for c in record.checkpoints),
                "steps_recorded": record.total_steps,
                "num_samples": n,
                "forward_mode_passes": passes,
                "update_model": "plain SGD, first order (recorded learning rates)",
                **_calibration(record),
            },
        )

    @staticmethod
    def _batch_values(
        loss_fn: PerSampleLossFn,
        space: ParameterSpace,
        params: dict[str, Tensor],
        batch: Any,
        columns: Tensor,
        masks: list[Tensor],
        groups: int,
        ids: Tensor,
        fresh: Tensor,
    ) -> Tensor:
        """``[fresh, G, Q]``: ``<grad_g l_z, grad_g F_q>`` per parameter group ``g`` and target column ``q``."""
        out = torch.zeros(int(fresh.sum()), groups, columns.shape[1], dtype=torch.float64)
        for q in range(columns.shape[1]):
            for g in range(groups):
                direction = columns[:, q] if groups == 1 else masks[g] * columns[:, q]
                _, s = directional_derivatives(loss_fn, params, batch, space.unflatten(direction.to(space.dtype)))
                if s.shape[0] != ids.numel():
                    raise ValueError(f"per_sample_loss returned {s.shape[0]} values for a batch of {ids.numel()} sample ids")
                out[:, g, q] = s.double().cpu()[fresh]
        return out
