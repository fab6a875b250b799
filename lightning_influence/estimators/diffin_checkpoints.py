"""The published Diff-In checkpoint estimator (paper reproduction), over recorded checkpoints.

At ``m`` sampled checkpoints ``theta_t`` (default 5), with a fixed random training batch ``B`` drawn
once per checkpoint (``seed``), the published estimator is

    I(z, V) ~ sum_t a_t < grad L_V(theta_t), H_B grad l_z + H_z grad L_B >,   a_t = -t eta_t^2 / (N m)

(``t``: optimizer steps taken before the checkpoint; ``eta_t``: the learning rate at that step;
``N``: training samples; ``H_B`` / ``H_z``: Hessians of the batch-mean loss and of ``z``'s loss),
with forward finite-difference Hessian-vector products: a step of norm ``eps = 1e-3`` along the
normalised direction, ``H w ~ ||w|| (grad(theta + eps w/||w||) - grad(theta)) / eps``.

How each product is evaluated (no per-sample gradient is materialised):

- ``<v, H_z grad L_B>`` (``v = grad L_V``) exactly as published, along the normalised batch
  gradient ``u``: ``||grad L_B|| (<grad l_z(theta + eps u), v> - <grad l_z(theta), v>) / eps``, two
  forward-mode per-sample directional derivatives along ``v``, at ``theta`` and ``theta + eps u``.
- ``<v, H_B grad l_z>`` through the symmetry of ``H_B``: ``<grad l_z, H_B v>`` with one forward
  difference ``H_B v`` along the normalised ``v`` (same scheme and ``eps``), shared by every sample,
  and one directional derivative along it. The published code differences along each sample's
  normalised gradient instead; both are the same second derivative, differing only by the
  ``O(eps)`` finite-difference error (one batch gradient per checkpoint instead of one per sample).

Sign: the published formula is returned *as published*, without a sign flip. Its sign is the
library's (the predicted change of ``L_V`` when ``z`` is removed; positive helps): removing ``z``
moves the parameters by ``delta_t ~ +(t eta / N) grad l_z`` after ``t`` steps, and the removal run's
extra curvature term at step ``t``, ``-eta <H_B grad L_V, delta_t>``, is
``-(t eta^2 / N) <grad L_V, H_B grad l_z>``: the published ``a_t`` term (with the sampled sum
averaged over the ``m`` checkpoints). The estimator has no first-order (TracIn) term: it is the
paper's curvature correction alone; how it tracks retraining is measured, not assumed
(see the README).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from lightning_influence.callbacks.checkpoints import ParameterCheckpoint, RecordedCheckpoints, Sampling
from lightning_influence.estimators.base import Target, as_target, device_batches, posthoc_training, progress
from lightning_influence.estimators.tracin import CheckpointEstimator, CheckpointTotals
from lightning_influence.kernels import ParameterSpace, PerSampleLossFn, batch_gradient, directional_derivatives, evaluation_mode
from lightning_influence.scores import InfluenceScores
from lightning_influence.validation import check_count

__all__ = ["DiffInCheckpoints", "PUBLISHED_EPS"]

PUBLISHED_EPS = 1e-3
"""Norm of the published finite-difference step along the normalised direction."""


class DiffInCheckpoints(CheckpointEstimator):
    """The published Diff-In checkpoint estimator (see the module docstring for the formula and sign).

    Args:
        count: ``m``, the number of checkpoints (default 5). When recording, ``count`` steps are
            sampled (``sampling="random"`` by default, ``seed``); given more recorded checkpoints,
            ``count`` of them are drawn at random (``seed``); given fewer, all are used and ``m`` is their number.
        eps: the finite-difference step norm (published: ``1e-3``).
        seed: also draws the fixed training batch ``B`` of each checkpoint (a batch of the training loader).
        Other options: see :class:`~lightning_influence.estimators.tracin.CheckpointEstimator`.
    """

    name: ClassVar[str] = "diffin_checkpoints"
    default_count: ClassVar[int] = 5
    default_sampling: ClassVar[Sampling] = "random"

    def __init__(self, *, count: int | None = None, eps: float = PUBLISHED_EPS, **options: Any) -> None:
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
            raise ValueError(f"eps must be a positive number (the finite-difference step norm), got {eps!r}")
        self.eps = float(eps)
        self.count = count if count is not None else self.default_count
        check_count("count", self.count, meaning="m, the number of checkpoints")
        if options.get("checkpoints") is None and options.get("every") is None:
            options["count"] = self.count
        super().__init__(**options)

    def chosen(self, record: RecordedCheckpoints) -> list[ParameterCheckpoint]:
        """The ``m`` checkpoints used: all of them, or ``count`` drawn at random (``seed``)."""
        if len(record) <= self.count:
            return list(record.checkpoints)
        g = torch.Generator().manual_seed(self.seed)
        picks = sorted(torch.randperm(len(record), generator=g)[: self.count].tolist())
        return [record.checkpoints[i] for i in picks]

    def _fixed_batch(self, module: L.LightningModule, train_loader: Iterable[Any], index: int) -> Any:
        """The training loader's batch number ``r`` (``r`` drawn once per checkpoint with ``seed``)."""
        try:
            total = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            total = sum(1 for _ in train_loader)
        if total == 0:
            raise ValueError("the training loader yields no batches: DiffInCheckpoints needs a training batch B per checkpoint")
        g = torch.Generator().manual_seed(self.seed + 7919 * (index + 1))
        wanted = int(torch.randint(total, (1,), generator=g))
        for position, batch in enumerate(device_batches(module, train_loader)):
            if position == wanted:
                return batch
        raise ValueError(f"the training loader yielded fewer than the {total} batches its len() announced")

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        target = as_target(target)
        record = self.record()
        train_loader = posthoc_training(module, train_loader, f"estimator {self.name!r}")  # a pass per checkpoint: the same samples each
        space, loss_fn, _ = self.space_for(module, record)
        chosen = self.chosen(record)
        m = len(chosen)
        n = self.trained_samples(record)
        gradient = self.target_gradient(module, train_loader, target)
        totals = CheckpointTotals("Diff-In")
        steps_used = []
        with evaluation_mode(module):
            for index, checkpoint in enumerate(progress(chosen, "Diff-In checkpoints", self.progress)):
                lrs = set(checkpoint.lrs)
                if len(lrs) != 1:
                    raise ValueError(
                        f"the published Diff-In estimator has one learning rate eta_t per checkpoint, but the checkpoint of "
                        f"step {checkpoint.step} has different rates per parameter group {checkpoint.lrs}"
                    )
                eta = lrs.pop()
                coefficient = -checkpoint.step * eta**2 / (n * m)
                steps_used.append(checkpoint.step)
                theta = self.theta_of(space, checkpoint.parameters(), checkpoint.step)
                columns = gradient(loss_fn, space, theta).reshape(space.size, -1)
                batch = self._fixed_batch(module, train_loader, index)
                ids, values = self._checkpoint_terms(module, train_loader, loss_fn, space, theta, columns, batch)
                totals.add(ids, coefficient * values, checkpoint.step)
        all_ids, values = totals.result(single=target.kind != "query")
        return InfluenceScores(
            all_ids,
            values,
            {
                "estimator": self.name,
                "target": target.kind,
                "target_samples": target.sample_count,
                "column_positions": gradient.sample_positions() if target.kind == "query" else None,
                "checkpoints": m,
                "checkpoint_steps": ",".join(map(str, steps_used)),
                "num_samples": n,
                "eps": self.eps,
                "finite_difference": "forward, step of norm eps along the normalised direction",
                "sign": "as published; equal to the library convention (predicted change of the target loss when the sample is removed)",
            },
        )

    def _checkpoint_terms(
        self,
        module: L.LightningModule,
        train_loader: Iterable[Any],
        loss_fn: PerSampleLossFn,
        space: ParameterSpace,
        theta: Tensor,
        columns: Tensor,
        batch: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(ids, [n_ids, Q])``: ``<v_q, H_B grad l_z + H_z grad L_B>`` for every training sample."""
        eps = self.eps
        g_batch = batch_gradient(loss_fn, space, theta, batch)
        g_norm = float(g_batch.norm())
        shifted_batch = space.unflatten(theta + (eps / g_norm) * g_batch) if g_norm > 0 else None
        params = space.unflatten(theta)
        per_column = []
        for q in range(columns.shape[1]):
            v = columns[:, q].to(space.dtype)
            v_norm = float(v.norm())
            if v_norm > 0:
                hv = (batch_gradient(loss_fn, space, theta + (eps / v_norm) * v, batch) - g_batch) * (v_norm / eps)
            else:
                hv = torch.zeros_like(v)
            per_column.append((space.unflatten(v), space.unflatten(hv)))
        id_parts, value_parts = [], []
        for train_batch, ids, fresh in self.unique_batches(module, train_loader):
            rows = []
            for v, hv in per_column:
                _, first = directional_derivatives(loss_fn, params, train_batch, hv)  # <grad l_z, H_B v>
                if shifted_batch is not None:
                    _, at = directional_derivatives(loss_fn, params, train_batch, v)
                    _, shifted = directional_derivatives(loss_fn, shifted_batch, train_batch, v)
                    second = (shifted.double() - at.double()) * (g_norm / eps)  # <v, H_z grad L_B>
                else:
                    second = torch.zeros_like(first, dtype=torch.float64)
                rows.append(first.double() + second)
            values = torch.stack(rows, dim=1).cpu()
            if values.shape[0] != ids.numel():
                raise ValueError(f"per_sample_loss returned {values.shape[0]} values for a batch of {ids.numel()} sample ids")
            id_parts.append(ids[fresh])
            value_parts.append(values[fresh])
        return torch.cat(id_parts), torch.cat(value_parts)
