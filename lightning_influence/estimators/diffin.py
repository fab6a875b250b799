"""Diff-In: influence as the sum of per-step differences, accumulated by a reverse sweep.

For plain SGD with per-parameter step sizes ``Lambda_t`` (diagonal: each parameter's group
learning rate), removing sample ``z`` from batch ``B_t`` (size ``b``) changes the update by
``d_t(z) = -Lambda_t (g_t - grad l_z(theta_t)) / (b - 1)``. Linearising the deviation of the
leave-one-out run gives the exact linearised influence on the target ``F``

    I(z) = sum_t < u_{t+1}, d_t(z) >,   u_T = grad F(theta_T),
    u_t = u_{t+1} - H_t Lambda_t u_{t+1}     (H_t: Hessian of batch t's mean loss at theta_t)

so a reverse sweep over the recorded steps needs, per step, one forward-mode pass for the
per-sample terms ``s_i = <grad l_i(theta_t), Lambda_t u_{t+1}>`` (then
``<u_{t+1}, d_t(z)> = (s_z - mean_i s_i) / (b - 1)``) and one finite-difference Hessian product.
A batch of one sample is dropped entirely by the removal, so its term is ``s_z``.

Units and sign: target-loss change when the sample is removed (positive helps).

With ``hessian_every = k`` the adjoint crosses blocks of k steps with one product each, at one
step's batch and the block's summed step sizes: ``prod_s (I - H_s L_s) ~ I - H_t sum_s L_s``
(first order inside a block, exact products between blocks).

A sweep that starts from ``grad F`` at a later iterate ``theta_e`` (``e < T``) scores the steps
with the influence on ``F(theta_e)``: that is the online mode's truncated propagation window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.kernels import (
    FiniteDifference,
    ParameterSpace,
    PerSampleLossFn,
    all_finite,
    directional_derivatives,
    evaluation_mode,
    hessian_vector_product,
)
from lightning_influence.targets import TargetGradient
from lightning_influence.trajectory import StepRecord, Trajectory


class ScoreAccumulator:
    """Per-sample float64 sums indexed by sample id, growing as larger ids appear.

    Cross-rank reduction (for distributed runs): sum of ``totals``, logical or of ``seen``.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.totals = torch.zeros(capacity, dtype=torch.float64)  # [N] or, for query targets, [N, Q]
        self.seen = torch.zeros(capacity, dtype=torch.bool)

    def _grow(self, size: int, columns: tuple[int, ...] = ()) -> None:
        if columns and self.totals.shape[1:] != columns:
            if self.totals.dim() > 1 or self.totals.abs().sum() > 0:
                raise ValueError(f"score columns changed from {tuple(self.totals.shape[1:])} to {columns}")
            self.totals = torch.zeros((self.totals.shape[0], *columns), dtype=torch.float64)
        if size <= self.seen.numel():
            return
        size = max(size, 2 * self.seen.numel())
        extra = size - self.seen.numel()
        pad = torch.zeros((extra, *self.totals.shape[1:]), dtype=torch.float64)
        self.totals = torch.cat([self.totals, pad])
        self.seen = torch.cat([self.seen, torch.zeros(extra, dtype=torch.bool)])

    def mark_seen(self, ids: Tensor) -> None:
        ids = ids.cpu()
        self._grow(int(ids.max()) + 1)
        self.seen[ids] = True

    def add(self, ids: Tensor, values: Tensor) -> None:
        ids = ids.cpu()
        self._grow(int(ids.max()) + 1, tuple(values.shape[1:]))
        self.totals.index_add_(0, ids, values.detach().to("cpu", torch.float64))

    def result(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` of every sample seen in training."""
        ids = self.seen.nonzero().reshape(-1)
        return ids, self.totals[ids].clone()

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals, self.seen = state["totals"].clone(), state["seen"].clone()


class DiffInSweep:
    """The reverse accumulation over a window of recorded steps (shared by replay and online)."""

    def __init__(
        self,
        module: nn.Module,
        loss_fn: PerSampleLossFn,
        space: ParameterSpace,
        target: TargetGradient,
        accumulator: ScoreAccumulator,
        *,
        finite_difference: FiniteDifference = "central",
        fd_rel_step: float | None = None,
        reuse_recorded_gradient: bool = False,
        hessian_every: int = 1,
    ) -> None:
        if hessian_every < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        self.module = module
        self.loss_fn = loss_fn
        self.space = space
        self.target = target
        self.accumulator = accumulator
        self.finite_difference = finite_difference
        self.fd_rel_step = fd_rel_step
        self.reuse_recorded_gradient = reuse_recorded_gradient
        self.hessian_every = hessian_every
        self.hessian_products = 0
        self.forward_mode_passes = 0
        self.target_gradients = 0
        self._scale_cache: tuple[Tensor, Tensor] | None = None
        self.work_dtype = torch.promote_types(space.dtype, torch.float32)

    def target_gradient(self, theta: Tensor) -> Tensor:
        with evaluation_mode(self.module):
            self.target_gradients += 1
            return self.target(self.loss_fn, self.space, theta)

    def run(
        self,
        trajectory: Trajectory,
        theta_end: Tensor,
        num_scored: int,
        recompute_step: Callable[[StepRecord], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Score the oldest ``num_scored`` records of ``trajectory`` by their influence on
        ``F(theta_end)``; the newer records only propagate the adjoint."""
        if num_scored <= 0 or len(trajectory) == 0:
            return
        u = self.target_gradient(theta_end)
        # u_{t+1}, [P, Q], in the parameters' dtype (float32 at least): the finite-difference error of
        # the products (~1e-3 relative in float32) dwarfs its rounding. Scores accumulate in float64.
        adjoint = u.reshape(self.space.size, -1).to(self.work_dtype).clone()
        size = len(trajectory)
        block_scale: Tensor | None = None  # sum of the step sizes of the block not yet propagated
        block_steps = 0
        with evaluation_mode(self.module):
            for back, record in enumerate(trajectory.newest_first(recompute_step)):
                position = size - 1 - back
                scored = position < num_scored
                scale = self._step_scale(record.step_sizes)
                if position > 0:
                    if block_scale is None:
                        block_scale = scale  # shared with the cache: never modified in place
                    elif block_steps == 1:
                        block_scale = block_scale + scale
                    else:
                        block_scale.add_(scale)
                    block_steps += 1
                # Propagate through this step now, or (hessian_every > 1) once per block of steps
                # with one product at this step's batch: prod_s (I - H_s L_s) ~ I - H_t sum_s L_s.
                propagate = position > 0 and (block_steps == self.hessian_every or position == 1)
                derivatives = []
                for q in range(adjoint.shape[1]):
                    if scored or (propagate and block_steps == 1):
                        # Lambda_t u_{t+1}: the tangent of the forward-mode pass and of the product.
                        tangent = (scale * adjoint[:, q]).to(self.space.dtype)
                    if scored:
                        derivatives.append(self._directional_derivatives(record, tangent))
                    if propagate:
                        if block_steps > 1:
                            tangent = (block_scale * adjoint[:, q]).to(self.space.dtype)  # type: ignore[operator]
                        adjoint[:, q].sub_(self._hessian_product(record, tangent))
                if scored:
                    self._accumulate(record, torch.stack(derivatives, dim=1), squeeze=u.dim() == 1)
                if position == 0:
                    break
                if propagate:
                    block_scale, block_steps = None, 0
                    if not all_finite(adjoint):
                        raise FloatingPointError(
                            f"the propagated target gradient became non-finite at step {record.step}: training diverged "
                            "or the finite-difference step is unsuitable (try fd_rel_step or finite_difference='central')"
                        )

    def _step_scale(self, step_sizes: Tensor) -> Tensor:
        """Flat per-coordinate step size ``diag(Lambda_t)`` in the sweep's working dtype (cached: the
        learning rates rarely change from one step to the next)."""
        cached = self._scale_cache
        if cached is None or not torch.equal(cached[0], step_sizes):
            cached = (step_sizes.clone(), self.space.expand(step_sizes.to(self.work_dtype)))
            self._scale_cache = cached
        return cached[1]

    def _directional_derivatives(self, record: StepRecord, tangent: Tensor) -> Tensor:
        """``s_i = <grad l_i(theta_t), tangent>`` for the batch, float64 ``[b]``."""
        _, s = directional_derivatives(
            self.loss_fn, self.space.unflatten(record.theta), record.batch, self.space.unflatten(tangent)
        )
        self.forward_mode_passes += 1
        return s.double()

    def _accumulate(self, record: StepRecord, s: Tensor, squeeze: bool) -> None:
        """Add ``<u_{t+1}, d_t(z)> = (s_z - mean_i s_i) / (b - 1)`` (``s_z`` for a batch of one)."""
        b = s.shape[0]
        if b != record.ids.numel():
            raise ValueError(f"per_sample_loss returned {b} values for a batch with {record.ids.numel()} sample ids at step {record.step}")
        contribution = s if b == 1 else (s - s.mean(dim=0, keepdim=True)) / (b - 1)
        if not all_finite(contribution):
            raise FloatingPointError(f"non-finite per-sample directional derivatives at step {record.step}")
        self.accumulator.add(record.ids, contribution[:, 0] if squeeze else contribution)

    def _hessian_product(self, record: StepRecord, tangent: Tensor) -> Tensor:
        """``H_t @ tangent`` by finite differences of batch gradients (the parameters' dtype)."""
        base = record.grad if (self.reuse_recorded_gradient and self.finite_difference == "forward") else None
        self.hessian_products += 1
        return hessian_vector_product(
            self.loss_fn,
            self.space,
            record.theta,
            tangent,
            record.batch,
            scheme=self.finite_difference,
            base_gradient=base,
            rel_step=self.fd_rel_step,
        )
