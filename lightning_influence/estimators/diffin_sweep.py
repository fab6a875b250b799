"""Diff-In: influence as the sum of per-step differences, accumulated by a reverse sweep.

Each optimizer step is a map ``(theta_{t+1}, s_{t+1}) = Phi_t(theta_t, s_t, G_t)`` of the
parameters, the optimizer state ``s`` (momentum buffer, Adam moments) and the step gradient
``G_t = sum_k mean_{i in B_tk} grad l_i(theta_t) / n`` over the step's micro-batches
(``n``: Lightning's accumulation normaliser; clipping is part of ``Phi_t``). Removing sample
``z`` from micro-batch ``B_tk`` (size ``b``) changes the gradient by
``dG_t(z) = -(grad l_z - mean_k) / (n (b - 1))``. Linearising the leave-one-out run around the
recorded trajectory gives the exact linearised influence on the target ``F``

    I(z) = sum_t < a^G_t, dG_t(z) >

with adjoints swept from ``lambda^theta_T = grad F(theta_T)``, ``lambda^s_T = 0``:

    (a^theta_t, a^s_t, a^G_t) = Phi_t'^T (lambda^theta_{t+1}, lambda^s_{t+1})     (StepModel.vjp)
    lambda^theta_t = a^theta_t + H_t a^G_t,   lambda^s_t = a^s_t

(``H_t``: Hessian of the step's loss at ``theta_t``, a finite-difference product). Per step:
one forward-mode pass per micro-batch for ``s_i = <grad l_i(theta_t), -a^G_t>``, then
``<a^G_t, dG_t(z)> = (s_z - mean_k s) / (n (b - 1))`` (``s_z / n`` for a micro-batch of one,
which the removal empties), and one Hessian product. With ``per_sample="finite_difference"`` the
``s_i`` are differences of the per-sample losses along ``a^G_t`` instead: the Hessian product
``H_t a^G_t`` evaluates the gradient (and with it the losses) at ``theta_t + eps a^G_t`` anyway,
and the other side is either the losses training computed at ``theta_t`` (``record.losses``: a
forward difference, no pass) or one plain forward pass at ``theta_t - eps a^G_t`` (central). For plain SGD ``a^G = -Lambda_t lambda``
and this is ``u_t = u_{t+1} - H_t Lambda_t u_{t+1}`` of the notes.

Units and sign: target-loss change when the sample is removed (positive helps).

With ``hessian_every = k`` the Hessian terms of a block of k steps are summed and applied once,
at the block's oldest step: ``lambda_t = a^theta + H_t sum_s a^G_s`` (first order inside a
block, exact products between blocks; for plain SGD ``prod_s (I - H_s L_s) ~ I - H_t sum L_s``).

Coupled batch losses (``InfluenceMixin.coupled_batch_loss``, e.g. contrastive InfoNCE with
in-batch negatives): removing ``z`` from ``B_tk`` means re-evaluating the micro-batch's loss on
``B_tk \\ z``, so ``dG_t(z) = (grad mean l(B \\ z) - grad mean l(B)) / n`` and the step's term is
``<a^G_t, dG_t(z)> = r_z / n`` with the removal derivative ``r_z`` of
:func:`~lightning_influence.kernels.removal_derivatives` along ``a^G_t``. For an uncoupled loss
``r_z = (s_z - mean_k s) / (b - 1)``, the formula above; in general it costs ``b`` forward-mode
passes over sub-batches of ``b - 1`` per micro-batch (vectorised with ``vmap``) instead of one.
Everything else (adjoints, Hessian products of the full micro-batch loss, normaliser) is unchanged.

A sweep that starts from ``grad F`` at a later iterate ``theta_e`` (``e < T``) scores the steps
with the influence on ``F(theta_e)``: that is the online mode's truncated propagation window.

Batch norm scored as trained (``batch_norm``, a
:class:`~lightning_influence.estimators.diffin_batch_norm.BatchNormTrace`): the step losses are
evaluated with batch statistics (a coupled loss, removed as above or, with
``batch_norm_removal="linear"``, by differences of the removal losses that the gradient passes
return under the sample weighting: the formula of independent losses), and the running statistics
are carried as part of the state, with an adjoint of their own (derivation in
:mod:`~lightning_influence.estimators.diffin_batch_norm`). Their part of a step (the adjoint's
``J_S^T w`` and the samples' direct effect on them) takes a gradient pass of its own, or, with the
linear removal at a step with a Hessian product of its own, goes into that product's gradient
passes as a term of their objective (:class:`_StatisticsFold`).

Distributed (DDP) runs: every rank sweeps its own copy of the trajectory (identical parameters,
optimizer state and step gradients, since DDP averages the gradients) with its own shard of each
micro-batch. The global micro-batch ``U_k`` is the union of the ranks' shards (``record.global_ids``)
and the step gradient DDP fed the optimizer is the mean over ranks of the local step gradients,
which is the mean over ``U_k`` when the shards have equal sizes (as ``DistributedSampler``
makes them). Removing ``z`` removes every copy of it from ``U_k`` (``m_z`` copies: a sample the
sampler repeated to pad the epoch is trained on twice), so each copy contributes
``(s_z - mean_{U_k} s) / (n (|U_k| - m_z))`` and the copies add up; ``mean_{U_k} s`` and every
Hessian product are reduced across ranks. With one rank and no copies this is the formula above.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_influence.kernels import (
    FiniteDifference,
    ParameterSpace,
    PerSampleLossFn,
    RemoveFn,
    SampleWeighting,
    SampleWeights,
    SampleWeightsError,
    Step,
    all_finite,
    default_rel_step,
    difference_derivatives,
    directional_derivatives,
    evaluation_mode,
    finite_difference_step,
    hessian_vector_product,
    losses_and_gradient,
    removal_derivatives,
    shifted_losses,
)
from lightning_influence.batches import BatchRemoval
from lightning_influence.estimators.diffin_batch_norm import (
    BatchNormTrace,
    OneValuePerChannelError,
    RunningStatisticsTerm,
    sub_batch_statistics,
)
from lightning_influence.distributed import Collective
from lightning_influence.scores import ScoreAccumulator
from lightning_influence.targets import TargetGradient
from lightning_influence.optimizers import StepModel
from lightning_influence.trajectory import RecomputeStep, StepRecord, Trajectory

PerSampleDerivatives = Literal["forward_mode", "finite_difference"]

ADJOINT_CHECK_EVERY = 16
"""Hessian products between two checks (finite, growth) of the whole propagated adjoint."""

ADJOINT_GROWTH_LIMIT = 1e3
"""A propagated adjoint that grows this much over a sweep signals an unstable propagation."""

STEP_DOMINANCE_LIMIT = 50.0
"""A step whose contributions (their norm over its samples) exceed the median step's this many
times dominates its samples' scores: warned about under adaptive optimizers (Adam's first step on
digits' exact zeros: 154); plain SGD's last steps can pass it without a fault (26 at lr 0.5 on digits)."""

DOMINANCE_MIN_STEPS = 16
"""Scored steps a sweep needs before its steps' contributions are compared with their median."""

LINEAR_REMOVAL_MIN_SAMPLES = 8
"""With ``batch_norm_removal="linear"``, micro-batches of fewer samples (a short last batch, say) are
removed exactly (``remove``: their sub-batches), where the linearisation in ``1 / (b - 1)`` is
coarsest and the exact removal costs little. A choice: on batches of 8 the linear removal is already
a little less accurate (README, "Batch norm")."""

RECORDED_CHECKS_PER_SWEEP = 8
"""Steps between a sweep's newest and oldest, one at a random position in each of this many equal
strata, whose recorded gradient the sweep also compares with its own loss's (one gradient pass each):
a loss that differs from training's at some steps only (a weighted mean over batches whose classes
differ) is found without a pass per step."""

CHECKED_GRADIENT_EVERY = 8
"""Training keeps the gradient of every this many-th step whose parameters it stores, where nothing
else needs it (central differences with every step stored), so that the sweeps' checks have
training's gradients to compare with."""

REBUILT_GRADIENT_RTOL = {torch.float64: 1e-7, torch.float32: 1e-3}
"""The recorded-gradient check's relative tolerance at steps whose parameters were rebuilt between
checkpoints (at least; the stored steps' where that is larger), per parameter dtype (1e-2 for
others): the rebuilt parameters' rounding, amplified by the curvature, stays far below it, a
changed loss (a weight or temperature off by a few percent) far above."""

RECOMPUTED_GRADIENT_RTOL = {torch.float64: 1e-6, torch.float32: 2e-2}
"""The same where the sweep evaluates the loss through other operations than training did (batch
norm removed linearly: its statistics written out with sample weights), whose rounding differs
from training's; in float32 it can move a ReLU-like unit across its kink, so only a clear change of
the loss is refused."""

RECORDED_GRADIENT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Largest relative difference between a step's gradient recomputed by a sweep and the one
training computed, per parameter dtype (1e-2 for others): rounding, not a changed loss."""


class LossChangedError(RuntimeError):
    """The loss a sweep evaluates at a recorded step is not the loss training optimised there."""


class DiffInSweep:
    """The reverse accumulation over a window of recorded steps (shared by replay and online)."""

    fold_statistics: bool = True
    """Take the running statistics' part of a step (their adjoint ``J_S^T w`` and the samples' direct
    effect on them) with the step's Hessian product where it can (:meth:`_folds_statistics`, :class:`_StatisticsFold`)
    instead of a gradient pass of its own: the same scores to the products' finite-difference error."""

    def __init__(
        self,
        module: nn.Module,
        loss_fn: PerSampleLossFn,
        space: ParameterSpace,
        target: TargetGradient,
        accumulator: ScoreAccumulator,
        step_model: StepModel,
        *,
        context_space: ParameterSpace | None = None,
        finite_difference: FiniteDifference = "central",
        fd_rel_step: float | None = None,
        reuse_recorded_gradient: bool = False,
        hessian_every: int = 1,
        collective: Collective | None = None,
        remove: RemoveFn | None = None,
        batch_removal: BatchRemoval = "reaverage",
        vectorize_removal: bool = True,
        per_sample: PerSampleDerivatives = "forward_mode",
        chunk_size: int | None = None,
        batch_norm: BatchNormTrace | None = None,
        batch_norm_removal: Literal["linear", "exact"] = "exact",
    ) -> None:
        if hessian_every < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        if per_sample not in ("forward_mode", "finite_difference"):
            raise ValueError(f"per_sample must be 'forward_mode' or 'finite_difference', got {per_sample!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive number of samples, got {chunk_size!r}")
        if chunk_size is not None and remove is not None:
            raise ValueError(
                "chunk_size splits batches into independent chunks, which a coupled batch loss (each sample's loss "
                "depends on its whole batch) does not allow: leave chunk_size=None"
            )
        if per_sample == "finite_difference" and remove is not None:
            raise ValueError(
                "per_sample='finite_difference' is for independent per-sample losses; coupled batch losses take "
                "their removal derivatives by forward mode: use per_sample='forward_mode'"
            )
        self.module = module
        self.loss_fn = loss_fn
        self.space = space
        self.context_space = context_space
        self.varying_defaults: dict[str, Tensor] = {}
        """Values of varying tensors (see :meth:`loss_fn_at`) before they first changed, by name."""
        self.target = target
        self.accumulator = accumulator
        self.step_model = step_model
        self.finite_difference = finite_difference
        self.fd_rel_step = fd_rel_step
        self.reuse_recorded_gradient = reuse_recorded_gradient
        self.verify_recorded = False
        """Recompute the recorded gradient at the newest and the oldest stored step of each sweep (and
        where the propagation fails) and compare (:meth:`_check_recorded_gradient`); set where
        training's loss is the sweep's: no dropout, batch norm or autocast."""
        self.recorded_gradient_checks = 0
        self.max_recorded_gradient_error = 0.0
        self.hessian_every = hessian_every
        self.collective = collective if collective is not None else Collective()
        if remove is not None and self.collective.distributed:
            raise ValueError(
                "coupled batch losses (remove=...) are scored in a single process only: a sample's removal changes "
                "the losses of the whole global batch, which is sharded across the ranks"
            )
        self.remove = remove
        self.batch_removal: BatchRemoval = batch_removal
        """Coupled batch loss: the batch without one sample (``None``: per-sample losses are independent)."""
        self.vectorize_removal = vectorize_removal
        self.per_sample: PerSampleDerivatives = per_sample
        self.chunk_size = chunk_size
        """Samples per pass (forward-mode, gradient, loss): bounds the passes' memory; ``None``: whole micro-batches."""
        """How ``s_i = <grad l_i, a^G>`` is evaluated: forward mode (exact) or central differences of losses."""
        self.hessian_products = 0
        self.forward_mode_passes = 0
        self.loss_evaluations = 0
        """Forward passes without autograd for finite-difference derivatives (beyond the products' passes)."""
        self._theta_norm: float | None = None
        self._first_stored: StepRecord | None = None
        self._pending_checks: list[tuple[int, Tensor, bool]] = []  # (step, [gap, gradient norm], rebuilt): read once per sweep
        self.max_rebuilt_gradient_error = 0.0
        """Largest relative difference at the checks of steps rebuilt between checkpoints."""
        self.rebuilt_exactly = True
        """The steps rebuilt between checkpoints reproduce training's parameters to rounding (the caller
        clears it where the modelled update drifts): their recorded gradients may be checked too."""
        self._last_stored: tuple[PerSampleLossFn, StepRecord] | None = None
        self._adjoint: Tensor | None = None
        self._adjoint_start = 0.0
        self.max_adjoint_growth = 0.0
        """Largest ``||lambda_t|| / ||lambda_end||`` seen at the checks (a stability diagnostic)."""
        self._growth_warned = False
        self._checked_down_to: int | None = None  # the step of the last adjoint check (the sweep runs newest first)
        self._suspect: tuple[int, int] | None = None  # steps (oldest, newest) over which the adjoint first blew up
        self.max_step_ratio = 0.0
        """Largest ratio, over the sweeps, of one step's contributions (their norm) to the median scored
        step's (sweeps of at least :data:`DOMINANCE_MIN_STEPS` steps)."""
        self.dominant_step: int | None = None
        """The optimizer step of :attr:`max_step_ratio`."""
        self._step_norms: list[tuple[int, Tensor]] = []  # (step, squared norm of its contributions), this sweep
        self._dominance_warned = False
        self.target_gradients = 0
        self.work_dtype = torch.promote_types(space.dtype, torch.float32)
        if batch_norm_removal not in ("linear", "exact"):
            raise ValueError(f"batch_norm_removal must be 'linear' or 'exact', got {batch_norm_removal!r}")
        if batch_norm is not None and batch_norm_removal == "exact" and remove is None:
            raise ValueError("batch_norm (batch statistics) makes the batch loss coupled: pass remove= (the batch without a sample)")
        if batch_norm is not None and batch_norm_removal == "linear":
            if remove is not None:
                raise ValueError(
                    "batch_norm_removal='linear' weights samples in the batch-norm layers only, and remove= declares a loss "
                    "that couples its samples itself: use batch_norm_removal='exact'"
                )
            if per_sample != "finite_difference":
                raise ValueError("batch_norm_removal='linear' differences the removal losses: use per_sample='finite_difference'")
        if batch_norm is not None and batch_norm_removal == "exact" and self.collective.distributed:
            raise ValueError("batch_norm_removal='exact' (sub-batches) is scored in a single process only: use 'linear'")
        self.batch_norm = batch_norm
        """Batch norm with batch statistics and its running statistics in the state (``None``: evaluation mode)."""
        self.batch_norm_removal = batch_norm_removal
        """How a sample leaves its batch's statistics: ``"linear"`` (sample weights, the removal losses of
        :func:`~lightning_influence.kernels.removal_losses`), ``"exact"`` (``remove``, sub-batches)."""
        self.small_batch_remove: RemoveFn | None = None
        """With the linear removal: the batch without a sample, for micro-batches of fewer than
        :data:`LINEAR_REMOVAL_MIN_SAMPLES` samples, removed exactly (``None``: linearly too)."""
        self.statistics_folds = 0
        """Steps whose running-statistics part went into their Hessian product (per column)."""
        self._running_adjoint: Tensor | None = None  # mu, [R, Q]: the adjoint of the running statistics
        self._expected_counts: Tensor | None = None  # num_batches_tracked after the newest step not yet swept
        self.statistics_passes = 0
        """Gradient passes of the batch statistics (their VJP) and vmapped sub-batch statistics passes."""
        self._statistics_square: Tensor | None = None  # the sweep's running-statistics terms, squared and summed
        self._sweeping = -1  # the optimizer step the sweep is at

    @property
    def weighting(self) -> SampleWeighting | None:
        """The sample weighting of the step losses (batch norm removed linearly), else ``None``: then the
        per-sample losses are the sweep's values for the removal's differences."""
        if self.batch_norm is None or self.batch_norm_removal != "linear":
            return None
        return self.batch_norm.sample_weighting

    def _step_mode(self) -> Any:
        """The mode the step losses are evaluated in: evaluation mode, or batch statistics for batch norm."""
        if self.batch_norm is not None:
            return self.batch_norm.batch_statistics_mode()
        return evaluation_mode(self.module)

    def target_gradient(self, theta: Tensor) -> Tensor:
        """``grad F(theta)`` in evaluation mode (``[P]`` or ``[P, Q]``). With batch norm scored as
        trained, also ``dF/dr`` at the module's current running statistics: kept in
        ``self._running_adjoint`` (``[R, Q]``), the start of their adjoint."""
        with evaluation_mode(self.module):
            self.target_gradients += 1
            if self.batch_norm is None:
                return self.target(self.loss_fn, self.space, theta)
            trace = self.batch_norm
            if not trace.tracked:  # no running statistics (track_running_stats=False everywhere): nothing to carry
                gradient = self.target(self.loss_fn, self.space, theta)
                columns = gradient.shape[1] if gradient.dim() == 2 else 1
                self._running_adjoint = torch.zeros(0, columns, dtype=torch.float64, device=gradient.device)
                self._expected_counts = None
                return gradient
            stats_space = trace.stats_space(self.space)
            joint = ParameterSpace(
                names=self.space.names + stats_space.names, shapes=self.space.shapes + stats_space.shapes, dtype=self.space.dtype, device=self.space.device
            )
            # Under DDP the caller sweeps with rank zero's buffers on every rank (distributed.rank_zero_buffers)
            running = trace.running(self.space.dtype).to(theta.device)
            gradient = self.target(trace.target_loss_function(self.loss_fn), joint, torch.cat([theta.to(self.space.dtype), running]))
            self._running_adjoint = gradient[self.space.size :].reshape(stats_space.size, -1).to(torch.float64).clone()
            self._expected_counts = trace.counts()
            return gradient[: self.space.size]

    def run(
        self,
        trajectory: Trajectory,
        theta_end: Tensor,
        num_scored: int,
        recompute_step: RecomputeStep | None = None,
    ) -> None:
        """Score the oldest ``num_scored`` records of ``trajectory`` by their influence on
        ``F(theta_end)``; the newer records only propagate the adjoint."""
        if num_scored <= 0 or len(trajectory) == 0:
            return
        u = self.target_gradient(theta_end)
        # One ||theta|| for the sweep's finite-difference steps: it sets their scale only, and changes
        # slowly along a trajectory (a parameter-sized reduction per step saved).
        self._theta_norm = float(theta_end.norm())
        # lambda^theta, [P, Q], in the parameters' dtype (float32 at least): the finite-difference error
        # of the products (~1e-3 relative in float32) dwarfs its rounding. Scores accumulate in float64.
        adjoint = u.reshape(self.space.size, -1).to(self.work_dtype).clone()
        self._adjoint, self._adjoint_start = adjoint, float(adjoint.norm())
        self._step_norms, self._statistics_square = [], None
        self._first_stored, self._last_stored = None, None
        self._checked_down_to, self._suspect = None, None
        self._pending_checks = []
        with self._step_mode():
            try:
                self._sweep_steps(trajectory, num_scored, recompute_step, u, adjoint)
            except LossChangedError:
                raise
            except Exception as err:
                # A changed loss explains a failure better (a non-finite propagation, a batch-norm layer that ran
                # differently, a shape the loss now returns): the checks made so far come first.
                try:
                    self._settle_recorded_checks()
                    if isinstance(err, FloatingPointError):
                        self._recheck_suspects(trajectory, recompute_step)
                except LossChangedError as changed:
                    raise changed from err
                explained = self._explained(err)
                if explained is err:
                    raise
                raise explained from err
            self._settle_recorded_checks()
            self._recheck_suspects(trajectory, recompute_step)
        self._adjoint, self._first_stored, self._last_stored = None, None, None
        self._running_adjoint, self._expected_counts = None, None

    def _explained(self, err: Exception) -> Exception:
        """A sweep's failure as the user should read it: the sample weights' errors of the linear
        batch-norm removal say what to change; others as they are."""
        if isinstance(err, OneValuePerChannelError):  # batch norm removed linearly, found by the sample weights
            return one_value_per_channel(self._sweeping, err.rows, err)
        if isinstance(err, SampleWeightsError):
            return ValueError(
                f"DiffIn(batch_norm_removal='linear') weights each sample's rows of the batch-norm inputs, and at optimizer "
                f"step {self._sweeping} {err}: a batch norm whose rows are not the batch's samples (folded or split "
                "batches) is not modelled so. Use batch_norm_removal='exact' (each batch re-evaluated without each "
                "sample through remove_from_batch)"
            )
        return err

    def _recheck_suspects(self, trajectory: Trajectory, recompute_step: RecomputeStep | None) -> None:
        """Where the propagated gradient blew up (:meth:`_check_adjoint`): recompute the gradient of
        every step since the adjoint check before (at most :data:`ADJOINT_CHECK_EVERY` gradient passes,
        once per sweep, and only then) and compare it with the one training recorded. A step whose
        loss in training differs from its recomputation (a loss that reads ``self.training`` or the
        step count at one step, say) turns every forward-difference product there into ``(g_train -
        g_eval) / eps``: refused, naming the step, rather than warned about as an instability."""
        suspect, self._suspect = self._suspect, None
        if suspect is None or not self.verify_recorded:
            return
        oldest, newest = suspect
        for record in trajectory.newest_first(recompute_step):  # rebuilds the steps between checkpoints again
            if oldest <= record.step <= newest:
                self._check_recorded_gradient(self.loss_fn_at(record), record)

    def _sweep_steps(
        self,
        trajectory: Trajectory,
        num_scored: int,
        recompute_step: RecomputeStep | None,
        u: Tensor,
        adjoint: Tensor,
    ) -> None:
        """The sweep itself (see :meth:`run`): the records newest first, each scored (the oldest
        ``num_scored``) and propagated through."""
        columns = adjoint.shape[1]
        adjoint_state: list[dict[str, Tensor] | None] = [None] * columns
        pending: list[Tensor | None] = [None] * columns  # sum of a^G over the block not yet propagated
        # the same sum as a multiple of the adjoint column, while the block's steps are all in-place SGD steps
        pending_scale = [0.0] * columns
        block_steps = 0
        size = len(trajectory)
        spread = self._spread_checks(size)  # positions of the checks between newest and oldest, newest first
        for back, record in enumerate(trajectory.newest_first(recompute_step)):
            position = size - 1 - back
            self._sweeping = record.step
            if self._checked_down_to is None:
                self._checked_down_to = record.step
            scored = position < num_scored
            loss_fn = self.loss_fn_at(record)
            stored = trajectory.keeps_theta(record.step)  # parameters stored, not rebuilt
            if self.verify_recorded and stored:
                # Recorded gradients are compared with the sweep's loss at the newest and the oldest stored
                # step, at steps spread in between (_spread_checks), and where the propagation fails (a loss
                # that changed during fit; see the method).
                self._last_stored = (loss_fn, record)
                if self._first_stored is None:
                    self._first_stored = record
                    self._check_recorded_gradient(loss_fn, record, deferred=True)
            if spread and position <= spread[0] and record is not self._first_stored and (stored or self.rebuilt_exactly):
                if record.grad is not None and not record.grad_recomputed:  # else the next older step with one
                    self._check_recorded_gradient(loss_fn, record, deferred=True, rebuilt=not stored)
                    while spread and spread[0] >= position:
                        spread.pop(0)
            if position > 0:
                block_steps += 1
            propagate = position > 0 and (block_steps == self.hessian_every or position == 1)
            derivatives: list[list[Tensor]] = []
            scales = self.step_model.adjoint_scales(record.hyper, self.work_dtype, adjoint.device)
            # The running statistics' part of the step, folded into the step's own Hessian product when it has one
            folded = self._folds_statistics(record, propagate and block_steps == 1, scales)
            statistics = self._statistics_weights(record) if folded else None
            folds: list[_StatisticsFold] = []  # folded: one per column
            for q in range(columns):
                fold = None if statistics is None else _StatisticsFold(self.batch_norm, [w[:, q] for w in statistics], record.normalizer, scored)  # type: ignore[arg-type]
                if fold is not None:
                    folds.append(fold)
                if scales is not None and pending[q] is None:
                    terms, pending_scale[q] = self._scaled_step(
                        loss_fn, record, adjoint[:, q], scales, propagate, scored, position == 0, pending_scale[q], fold
                    )
                    if terms is not None:
                        derivatives.append(terms)
                    continue
                if pending_scale[q] != 0.0:  # the block's sum so far, as a vector of its own from here on
                    pending[q] = pending_scale[q] * adjoint[:, q]
                    pending_scale[q] = 0.0
                a_theta, a_state, a_grad = self.step_model.vjp(
                    record.theta, record.state, record.grad, record.hyper, adjoint[:, q], adjoint_state[q]
                )
                shifted: _ShiftedLosses | None = None
                if position > 0:
                    adjoint_state[q] = a_state
                    pending[q] = a_grad if pending[q] is None else pending[q] + a_grad  # type: ignore[operator]
                    if propagate:
                        # The product's gradient passes run along a^G itself when the block is this step alone:
                        # their per-sample losses then serve the finite-difference derivatives below.
                        share = scored and self.per_sample == "finite_difference" and pending[q] is a_grad
                        column = adjoint[:, q]
                        if a_theta.data_ptr() != column.data_ptr():
                            column.copy_(a_theta)
                        # lambda^theta_t = a^theta + H_t (sum of the block's a^G), added in place
                        shifted = self._hessian_product(loss_fn, record, pending[q].to(self.space.dtype), column, share, fold=fold)  # type: ignore[union-attr]
                        pending[q] = None
                    else:
                        adjoint[:, q] = a_theta
                if scored:
                    derivatives.append(self._step_terms(loss_fn, record, a_grad, shifted))
            if folded and scored:
                direct = [fold.direct() for fold in folds]  # per column, each micro-batch's d<w, S>/domega_S
                for k, ids in enumerate(record.ids):
                    change = torch.stack([column[k] for column in direct], dim=1)  # [b, Q]
                    self._add_statistics_terms(ids, change * _linear_removal_scale(ids).to(change.device).unsqueeze(1), squeeze=u.dim() == 1)
            elif self.batch_norm is not None and not folded:
                for q in range(columns):  # the block's pending a^G stops being a multiple of the column
                    if pending_scale[q] != 0.0:
                        pending[q] = pending_scale[q] * adjoint[:, q]
                        pending_scale[q] = 0.0
                self._running_statistics_step(loss_fn, record, adjoint, scored, position > 0, squeeze=u.dim() == 1)
            if scored:
                self._accumulate(record, derivatives, squeeze=u.dim() == 1)
            if position == 0:
                if self._last_stored is not None and self._last_stored[1] is record and record is not self._first_stored:
                    self._check_recorded_gradient(loss_fn, record, deferred=True)
                break
            if propagate:
                block_steps = 0
                # A non-finite adjoint stays non-finite: checked every few products (a parameter-sized
                # reduction), and whenever a step's contributions come out non-finite (_accumulate).
                if self.hessian_products % ADJOINT_CHECK_EVERY == 0:
                    self._check_adjoint(record)
        self._check_adjoint(record)
        self._check_step_norms(record)

    def _running_statistics_step(
        self, loss_fn: PerSampleLossFn, record: StepRecord, adjoint: Tensor, scored: bool, propagate: bool, squeeze: bool
    ) -> None:
        """The running statistics' part of one step (:mod:`~lightning_influence.estimators.diffin_batch_norm`),
        its micro-batches newest first: ``w = m mu`` (``mu`` after the update), each sample's direct
        term ``<w, S(B \\ z) - S(B)>`` when scored, ``lambda += J_S^T w`` (one gradient pass) when the
        adjoint goes on, then ``mu <- (1 - m) mu``. The direct terms come from the sub-batches'
        statistics (``batch_norm_removal="exact"``), or from the same gradient pass, by the sample
        weights: ``-b / (b - 1) d<w, S>/dw_z`` (``"linear"``, see
        :func:`~lightning_influence.kernels.removal_losses`)."""
        trace = self.batch_norm
        assert trace is not None and record.theta is not None
        if not trace.tracked:
            return
        adjoints = self._statistics_weights(record)
        single = scored and any(ids.numel() < 2 for ids in record.ids)
        if self.collective.any(single):  # every rank raises alike (under DDP a rank's shard may be the one)
            raise ValueError(
                f"batch_norm='batch': optimizer step {record.step} trained a batch-norm model on a micro-batch of one "
                "sample (on some rank), whose removal leaves no batch to normalise (and training in batch statistics on "
                "one sample is degenerate): use DataLoader(drop_last=True)"
            )
        if not self.collective.distributed:
            self._statistics_contributions(loss_fn, record, adjoints, adjoint, scored, propagate, squeeze)
            return
        # DDP: the running statistics are rank zero's, moved by its shards' statistics alone (DDP broadcasts rank
        # zero's buffers before each step's first forward, and its module is the one saved), so only rank zero's
        # samples act on them; its J_S^T w reaches every rank's copy of the adjoint by a broadcast.
        pushed = torch.zeros_like(adjoint) if propagate else adjoint
        if self.collective.rank == 0:
            self._statistics_contributions(loss_fn, record, adjoints, pushed, scored, propagate, squeeze)
        if propagate:
            adjoint.add_(self.collective.broadcast(pushed))

    def _statistics_contributions(
        self, loss_fn: PerSampleLossFn, record: StepRecord, adjoints: list[Tensor], adjoint: Tensor, scored: bool, propagate: bool, squeeze: bool
    ) -> None:
        """The body of :meth:`_running_statistics_step` for the micro-batches' statistics weights ``adjoints``:
        the samples' direct terms when ``scored``, and ``J_S^T w`` added to ``adjoint`` when ``propagate``."""
        trace = self.batch_norm
        assert trace is not None and record.theta is not None
        stats_fn = trace.statistics_function(loss_fn)
        leaves = {n: p.detach().requires_grad_(propagate) for n, p in self.space.unflatten(record.theta).items()}
        totals: list[Tensor] = []  # per micro-batch: sum_R w * S(theta), [Q]
        weights: list[tuple[Tensor, Tensor]] = []  # linear: per micro-batch, its sample weights and ids
        for k in reversed(range(len(record.batches))):
            batch, ids, w = record.batches[k], record.ids[k], adjoints[k]
            linear = scored and self.weighting is not None and not self._removed_exactly(record, k)
            with torch.set_grad_enabled(propagate or linear):
                if linear:
                    holder = SampleWeights()
                    with trace.sample_weighting(holder):
                        _, stats = stats_fn(leaves, batch)
                    weights.append((holder.get(ids.numel(), stats, f"the micro-batch's {ids.numel()} sample ids"), ids))
                else:
                    _, stats = stats_fn(leaves, batch)
            self.statistics_passes += 1
            if propagate or linear:
                totals.append((stats.to(torch.float64).unsqueeze(1) * w).sum(dim=0))
            if scored and not linear:
                remove = self.remove if self.remove is not None else self.small_batch_remove
                sub = sub_batch_statistics(stats_fn, leaves, batch, remove, ids.numel(), vectorize=self.vectorize_removal)  # type: ignore[arg-type]
                self.statistics_passes += 1
                self._add_statistics_terms(ids, (sub.detach().to(torch.float64) - stats.detach().to(torch.float64)) @ w, squeeze)
        if not totals:
            return
        total = torch.stack(totals).sum(dim=0)  # [Q]
        if not total.requires_grad:  # no attributed parameter feeds a batch-norm layer (params=...)
            return
        params = list(leaves.values()) if propagate else []
        sample_weights = [x for x, _ in weights]
        scales = [_linear_removal_scale(ids).to(x.device) for x, ids in weights]
        changes: list[list[Tensor]] = [[] for _ in weights]
        for q in range(total.shape[0]):  # lambda += J_S^T w, one backward per column (with the weights' gradients)
            grads = torch.autograd.grad(total[q], params + sample_weights, allow_unused=True, retain_graph=q + 1 < total.shape[0])
            if propagate:
                adjoint[:, q].add_(self.space.flatten(list(grads[: len(params)]), adjoint.dtype))
            for j, (x, g) in enumerate(zip(sample_weights, grads[len(params) :], strict=True)):
                changes[j].append(torch.zeros_like(x, dtype=torch.float64) if g is None else g.to(torch.float64) * scales[j])
        for (_, ids), columns in zip(weights, changes, strict=True):
            self._add_statistics_terms(ids, torch.stack(columns, dim=1), squeeze)

    def _statistics_weights(self, record: StepRecord) -> list[Tensor]:
        """``w_k = m_k mu`` of each micro-batch of the step (``[R, Q]`` each, ``mu`` after the micro-batch's
        update), moving the running statistics' adjoint ``mu`` to before the step: ``mu <- (1 - m_k) mu``,
        newest micro-batch first."""
        trace, mu = self.batch_norm, self._running_adjoint
        assert trace is not None and mu is not None
        factors = self._running_factors(record)  # [K, L]
        out: list[Tensor] = [mu] * len(record.batches)
        for k in reversed(range(len(record.batches))):
            m = trace.expand(factors[k].to(mu.device))
            out[k] = m.unsqueeze(1) * mu
            mu.mul_((1.0 - m).unsqueeze(1))
        return out

    def _folds_statistics(self, record: StepRecord, own_product: bool, scales: tuple[float, float] | None) -> bool:
        """Whether the running statistics' part of this step goes into its Hessian product's gradient passes
        (:class:`_StatisticsFold`) instead of a pass of its own: batch norm removed linearly with running
        statistics, a step with a product of its own (``own_product``: not inside a block of
        ``hessian_every``), whose per-sample terms come from that product's losses, every micro-batch
        removed linearly, without copies of a sample, and a step that moves the parameters."""
        trace = self.batch_norm
        return (
            self.fold_statistics
            and own_product
            and trace is not None
            and bool(trace.tracked)
            and self.weighting is not None
            and self.per_sample == "finite_difference"
            and self.remove is None
            and self.batch_removal == "reaverage"
            and record.global_ids is None
            and not any(self._removed_exactly(record, k) for k in range(len(record.batches)))
            and (scales is None or scales[1] != 0.0)
        )

    def _add_statistics_terms(self, ids: Tensor, change: Tensor, squeeze: bool) -> None:
        """Add the running-statistics terms ``change [b, Q]`` of a micro-batch's samples. Checked for
        finiteness with the steps' norms, but not counted in them: a sample's direct effect on the
        running statistics is large for the last steps' batches by design, not a sign of overshoot.
        (A step whose statistics ride on its product, :class:`_StatisticsFold`, counts the part through
        the normalisation of later layers in its step terms.)"""
        square = change.square().sum()
        self._statistics_square = square if self._statistics_square is None else self._statistics_square + square
        self.accumulator.add(ids, change[:, 0] if squeeze else change)

    def _running_factors(self, record: StepRecord) -> Tensor:
        """``m`` of each micro-batch's update of each tracked layer, after checking that the counters of
        the step (``record.running_counts``) continue those of the newer step: one training forward per
        micro-batch, none outside the recorded steps."""
        trace = self.batch_norm
        assert trace is not None
        if record.running_counts is None or record.running_momenta is None:
            raise ValueError(f"optimizer step {record.step} was recorded without the batch-norm counters batch_norm='batch' needs")
        after = record.running_counts.to("cpu", torch.long)
        expected = self._expected_counts
        if expected is not None and not torch.equal(after, expected.to("cpu", torch.long)):
            raise ValueError(
                f"batch_norm='batch': the batch-norm layers' num_batches_tracked after optimizer step {record.step} is "
                f"{after.tolist()} where the steps after it account for {expected.to('cpu').tolist()}: batch-norm layers ran in "
                "training mode outside the recorded steps' forwards (a step the gradient scaler skipped, a training_step "
                "that returned None after its forward, a second forward per batch, training-mode forwards in a hook), and "
                "their running statistics moved in ways DiffIn does not model. Run exactly one forward of each batch per "
                "training step, or use batch_norm='running'"
            )
        self._expected_counts = after - len(record.batches)
        return trace.factors(after, record.running_momenta, len(record.batches))

    def _scaled_step(
        self,
        loss_fn: PerSampleLossFn,
        record: StepRecord,
        column: Tensor,
        scales: tuple[float, float],
        propagate: bool,
        scored: bool,
        last: bool,
        pending: float,
        fold: _StatisticsFold | None = None,
    ) -> tuple[list[Tensor] | None, float]:
        """One step whose transpose is ``a^theta = k * lambda``, ``a^G = c * lambda`` (stateless SGD,
        :meth:`StepModel.adjoint_scales`), done on the adjoint ``column`` in place without a
        parameter-sized ``a^G``: the product and the per-sample derivatives run along the column
        and are scaled. ``pending``: the sum of ``a^G`` over the block's newer steps not yet
        propagated (``hessian_every > 1``), as a multiple of ``column``. Returns the step's
        per-sample terms when it is scored, and the block's sum as a multiple of the column after
        the step (0 once propagated). ``fold``: the step's running statistics go into the product."""
        keep, factor = scales
        total = pending + factor  # the block's sum of a^G, including this step's, in units of the column
        if not last and keep != 1.0:
            column.mul_(keep)  # a^theta; a^G is now (c / k) * column
            factor /= keep
            total /= keep
        # Every a^G of the block is a multiple of the column: the product's gradient passes step along the
        # direction of this step's a^G too, and their losses serve its finite-difference derivatives.
        share = scored and propagate and self.per_sample == "finite_difference" and self.remove is None
        terms = self._step_terms(loss_fn, record, column, None) if scored and not share else None
        if propagate:
            # short micro-batches removed exactly take their derivatives along the column before the product moves it
            exact = self._short_removals(loss_fn, record, column) if share else None
            # lambda_t = a^theta + H_t (sum of the block's a^G), added in place
            shifted = self._hessian_product(loss_fn, record, column, column, keep_losses=share, alpha=total, fold=fold)
            if share:
                terms = self._step_terms(loss_fn, record, column, shifted, exact)
            total = 0.0
        return (None if terms is None else [factor * t for t in terms]), total

    def _step_terms(
        self,
        loss_fn: PerSampleLossFn,
        record: StepRecord,
        tangent: Tensor,
        shifted: _ShiftedLosses | None,
        exact: dict[int, Tensor] | None = None,
    ) -> list[Tensor]:
        """The step's per-sample terms along ``a^G = tangent`` (times ``n (b - 1)``, see
        :meth:`_accumulate`): ``s_i = <grad l_i, -a^G>``, or for coupled losses the removal
        derivatives ``r_z = <grad mean l(B \\ z) - grad mean l(B), a^G>``; float64 ``[b_k]`` per micro-batch.
        ``exact``: the short micro-batches' removal derivatives, taken earlier along the same tangent
        (:meth:`_short_removals`)."""
        if self.remove is not None:
            return self._removal_derivatives(loss_fn, record, tangent)
        # the pass runs along a^G and the small result is negated
        terms = [-s for s in self._directional_derivatives(loss_fn, record, tangent, shifted)]
        for k, r in (exact if exact is not None else self._short_removals(loss_fn, record, tangent)).items():
            terms[k] = r
        return terms

    def _short_removals(self, loss_fn: PerSampleLossFn, record: StepRecord, tangent: Tensor) -> dict[int, Tensor]:
        """The removal derivatives along ``tangent`` of the micro-batches that the linear removal takes out
        exactly (:meth:`_removed_exactly`), by index; empty for the others."""
        small = [k for k in range(len(record.batches)) if self._removed_exactly(record, k)]
        if not small:
            return {}
        return dict(zip(small, self._removal_derivatives(loss_fn, record, tangent, small), strict=True))

    def _removed_exactly(self, record: StepRecord, k: int) -> bool:
        """Whether micro-batch ``k`` of ``record`` is removed exactly although the batch norm is removed
        linearly (:data:`LINEAR_REMOVAL_MIN_SAMPLES`); its terms are then removal derivatives. Not for a
        step with copies of a sample (a sampler drawing with replacement): removing one position would
        leave the other copies in, so such a step is removed linearly throughout."""
        return (
            self.weighting is not None
            and self.small_batch_remove is not None
            and record.global_ids is None
            and record.ids[k].numel() < LINEAR_REMOVAL_MIN_SAMPLES
        )

    def _check_adjoint(self, record: StepRecord) -> None:
        """Raise if the propagated adjoint is non-finite; warn (once) if it grew by more than
        :data:`ADJOINT_GROWTH_LIMIT` since the sweep started."""
        if self._adjoint is None:
            return
        norm = float(self._adjoint.norm())
        growth = norm / self._adjoint_start if self._adjoint_start > 0 else 0.0
        blown = not math.isfinite(norm) or growth > ADJOINT_GROWTH_LIMIT
        if blown and self._suspect is None and self._checked_down_to is not None:
            self._suspect = (record.step, self._checked_down_to)  # rechecked once the sweep is done (_recheck_suspects)
        self._checked_down_to = record.step
        if blown and self._last_stored is not None:
            self._check_recorded_gradient(*self._last_stored)  # a loss that changed explains it better
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"the propagated target gradient became non-finite by step {record.step}: training diverged "
                "or the finite-difference step is unsuitable (try fd_rel_step or finite_difference='central')"
            )
        self.max_adjoint_growth = max(self.max_adjoint_growth, growth)
        if growth > ADJOINT_GROWTH_LIMIT and not self._growth_warned:
            self._growth_warned = True
            warnings.warn(
                f"DiffIn: the propagated target gradient grew {growth:.3g}-fold between the end of the sweep and step "
                f"{record.step}: the linearised propagation is unstable and the scores are likely meaningless. Usual "
                "causes: finite-difference products across the kinks of ReLU-like activations or max pooling (use "
                "finite_difference='central' with fd_rel_step=5e-3, the default where kinks are found), hessian_every too large for the learning rate "
                "(use hessian_every=1), training at the edge of stability (a smaller learning rate), or recorded steps "
                "that disagree with their recomputation: a loss, hyperparameter or gradient that changed between "
                "training and DiffIn's evaluation (a per_sample_loss that reads self.training or the step count, a "
                "learning rate or gradient changed where DiffIn does not see it). DiffIn rechecks the recorded gradients "
                "of the steps where the growth showed (where training's loss is the sweep's: no dropout, batch norm or "
                "autocast); check the others against retraining (lightning_influence.evaluation) and compare "
                "per_sample_loss in training and evaluation mode. The growth is in scores.metadata['max_adjoint_growth']",
                RuntimeWarning,
                stacklevel=2,
            )

    def _note_step(self, record: StepRecord, contribution: Tensor) -> None:
        """Add a micro-batch's contributions to its step's squared norm per unit learning rate
        (kept on the device until the sweep ends): a step's contributions scale with its learning
        rate, so the high early rates of a decaying schedule do not make their steps look dominant."""
        step = record.step
        lr = self.step_model.step_size(record.hyper)
        squared = contribution.square().sum() / (lr * lr if lr > 0 else 1.0)
        if self._step_norms and self._step_norms[-1][0] == step:
            self._step_norms[-1] = (step, self._step_norms[-1][1] + squared)
        else:
            self._step_norms.append((step, squared))

    def _check_step_norms(self, record: StepRecord) -> None:
        """The sweep's steps' contributions (their norms, one read for the sweep): raise if any is
        non-finite; compare them with their median, record the largest ratio and warn (once) when
        one step dominates its samples' scores."""
        steps, self._step_norms = self._step_norms, []
        statistics, self._statistics_square = self._statistics_square, None
        if self.collective.distributed and self.batch_norm is not None and self.batch_norm.tracked:
            # rank zero alone adds running-statistics terms (see _running_statistics_step): every rank judges them
            local = statistics if statistics is not None else torch.zeros((), dtype=torch.float64, device=self.space.device)
            statistics = self.collective.sum(local.to(torch.float64))
        if not steps and statistics is None:
            return
        norms = torch.stack([n for _, n in steps] + ([statistics] if statistics is not None else [])).sqrt().cpu()
        if statistics is not None:
            if not bool(torch.isfinite(norms[-1])):
                self._check_adjoint(record)
                raise FloatingPointError("non-finite batch-norm running-statistics terms in this sweep")
            norms = norms[:-1]
            if not steps:
                return
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            self._check_adjoint(record)
            step = steps[int((~finite).nonzero()[0])][0]  # the newest: the sweep runs newest first
            raise FloatingPointError(f"non-finite per-sample directional derivatives at step {step}")
        if len(steps) < DOMINANCE_MIN_STEPS:
            return
        median = float(norms.median())
        if not median > 0:
            return
        k = int(norms.argmax())
        ratio = float(norms[k]) / median
        if ratio > self.max_step_ratio:
            self.max_step_ratio, self.dominant_step = ratio, steps[k][0]
        # Warned about under adaptive optimizers, whose first steps' overshoot is the known cause; plain SGD's largest
        # ratio is at its last steps, whose terms are not damped by later products, and it is only recorded.
        # The newest tenth of a sweep is left out: the last steps have large terms by design (few later products damp
        # them), under any optimizer; the first steps' overshoot is the oldest of its sweep.
        older = k >= len(steps) // 10  # steps run newest first
        if ratio > STEP_DOMINANCE_LIMIT and not self._dominance_warned and self.step_model.is_adaptive and older:
            self._dominance_warned = True
            warnings.warn(
                f"DiffIn: the contributions of optimizer step {steps[k][0]} are {ratio:.0f}x the median step's (norm over "
                "the step's samples, per unit learning rate), so that one step decides its samples' scores. The known cause is the first steps of an "
                "adaptive optimizer (Adam/AdamW, RMSprop, Adagrad), whose update is close to the gradient's sign (the second "
                "moment is then the step's own squared gradient): where a parameter's batch gradient nearly cancels, as on inputs with many exact zeros, the "
                "linearised update overshoots the real leave-one-out change many times (README, 'Adam's first steps'). "
                "Check those samples against retraining (lightning_influence.evaluation). The ratio is in "
                "scores.metadata['max_step_ratio']",
                RuntimeWarning,
                stacklevel=2,
            )

    def _spread_checks(self, size: int) -> list[int]:
        """Positions (newest first) of the recorded-gradient checks between a sweep's newest and oldest
        steps: one at a random position in each of :data:`RECORDED_CHECKS_PER_SWEEP` equal strata (a fixed
        stride could miss a loss that differs at every k-th step), from a generator seeded by the sweep's
        size and number, so that a rerun checks the same ones."""
        if not self.verify_recorded or size < 3:
            return []
        inner = size - 2  # positions 1 .. size - 2
        strata = min(RECORDED_CHECKS_PER_SWEEP, inner)
        generator = torch.Generator().manual_seed(size * 1_000_003 + self.target_gradients)  # differs between sweeps
        bounds = [1 + j * inner // strata for j in range(strata + 1)]
        picks = [int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return sorted(picks, reverse=True)

    def _check_recorded_gradient(self, loss_fn: PerSampleLossFn, record: StepRecord, deferred: bool = False, rebuilt: bool = False) -> None:
        """The gradient the sweep's loss gives at ``record``'s parameters must be the one training
        fed the optimizer there. One gradient pass, at the newest and the oldest step of the sweep
        whose parameters are stored (where a loss switched on late, or one that drifted since, differs
        most), at :data:`RECORDED_CHECKS_PER_SWEEP` steps in between (:meth:`_spread_checks`), and where the propagation
        turns unstable or non-finite: a loss that reads something that changed during fit besides the
        parameters and the tensors recorded per step (a Python attribute such as the epoch, a
        regulariser switched on later) is refused, since every product and derivative of the sweep
        would evaluate another function. ``deferred``: the difference stays on the device until
        :meth:`_settle_recorded_checks` reads the sweep's checks at once. ``rebuilt``: the record's
        parameters were rebuilt between checkpoints (a step spread in between; judged to
        :data:`REBUILT_GRADIENT_RTOL`, above their rounding)."""
        if record.theta is None or record.grad is None or record.grad_recomputed:
            return
        _, now = step_losses_and_gradient(
            loss_fn, self.space, record.theta, record.batches, record.normalizer, self.collective, self.chunk_size, weighting=self.weighting
        )
        assert isinstance(now, Tensor)
        recorded = record.grad.to(now.dtype)
        measured = torch.stack([(now - recorded).norm().double(), recorded.norm().double()])  # (gap, scale)
        self._pending_checks.append((record.step, measured, rebuilt))
        if not deferred:
            self._settle_recorded_checks()

    def _settle_recorded_checks(self) -> None:
        """The pending recorded-gradient checks of the sweep (:meth:`_check_recorded_gradient`), read at
        once. Each difference is relative to the step's gradient norm, or to a hundredth of the largest
        norm among them where that is larger: near convergence a gradient's rounding (a kink crossed by
        a rounding difference) is large against its own vanishing norm, not against the run's."""
        pending, self._pending_checks = self._pending_checks, []
        if not pending:
            return
        values = torch.stack([m for _, m, _ in pending]).tolist()
        floor = 1e-2 * max(scale for _, scale in values)
        for (step, _, rebuilt), (gap, scale) in zip(pending, values, strict=True):
            norm = max(scale, floor)
            self._judge_recorded_gradient(step, gap / norm if norm > 0 else gap, rebuilt)

    def _judge_recorded_gradient(self, step: int, error: float, rebuilt: bool = False) -> None:
        self.recorded_gradient_checks += 1
        table = RECOMPUTED_GRADIENT_RTOL if self.weighting is not None else RECORDED_GRADIENT_RTOL
        tolerance = table.get(self.space.dtype, 1e-2)
        if rebuilt:
            tolerance = max(tolerance, REBUILT_GRADIENT_RTOL.get(self.space.dtype, 1e-2))
            self.max_rebuilt_gradient_error = max(self.max_rebuilt_gradient_error, error)
        else:
            self.max_recorded_gradient_error = max(self.max_recorded_gradient_error, error)
        if not error <= tolerance:
            raise LossChangedError(
                f"DiffIn: at optimizer step {step}, the gradient of per_sample_loss recomputed at that step's "
                f"parameters differs from the gradient training computed there (relative difference {error:.3g}): the "
                "loss depends on something that changed during fit besides the parameters and the tensors DiffIn records "
                "per step, e.g. a Python attribute (self.current_epoch, a temperature or loss weight kept as a float), a "
                "regulariser or loss term switched on later, a dataset transform that changed, a loss that reads "
                "self.training (DiffIn recomputes it in evaluation mode), or randomness in training mode that the first "
                "batch did not show (a layer skipped with some probability: DiffIn then took the loss as deterministic; "
                "write it as per-element dropout, or make it deterministic). Every score would evaluate another function. "
                "Keep such values in registered buffers (register_buffer: DiffIn records their values with every step), "
                "and keep the loss fixed during fit and the same in both modes. Or training_step's loss is not the mean of "
                "per_sample_loss(batch) at this step although it was at the first (checked there): a weighted mean such as "
                "F.cross_entropy(weight=...) divides by the batch's sum of weights; return per_sample_loss(batch).mean() "
                "from training_step, which DiffIn then checks at every step"
            )

    def loss_fn_at(self, record: StepRecord) -> PerSampleLossFn:
        """The per-sample loss as at this step: the parameters outside the attributed subset held
        at their recorded values, and the tensors training changed outside the optimizer at the
        values the step trained with (:attr:`StepRecord.varying`; for a step recorded before such a
        tensor first changed, its earlier value from :attr:`varying_defaults`)."""
        held: dict[str, Tensor] = {}
        if record.context is not None and self.context_space is not None:
            held.update(self.context_space.unflatten(record.context))
        if self.varying_defaults or record.varying:
            held.update({**self.varying_defaults, **record.varying})
        if not held:
            return self.loss_fn
        base = self.loss_fn
        return lambda params, batch: base({**held, **params}, batch)

    def _directional_derivatives(
        self, loss_fn: PerSampleLossFn, record: StepRecord, tangent: Tensor, shifted: _ShiftedLosses | None = None
    ) -> list[Tensor]:
        """``s_i = <grad l_i(theta_t), tangent>`` per micro-batch, float64 ``[b_k]`` each: one
        forward-mode pass per micro-batch, or (``per_sample="finite_difference"``) central
        differences of the losses, reusing the ``shifted`` losses of a Hessian product along
        ``tangent`` when there are any."""
        if self.per_sample == "finite_difference":
            return self._difference_derivatives(loss_fn, record, tangent, shifted)
        params = self.space.unflatten(record.theta)
        direction = self.space.unflatten(tangent.to(self.space.dtype))
        out = []
        for batch in record.batches:
            _, s = directional_derivatives(loss_fn, params, batch, direction, self.chunk_size)
            self.forward_mode_passes += 1
            out.append(s.double())
        return out

    def _difference_derivatives(
        self, loss_fn: PerSampleLossFn, record: StepRecord, tangent: Tensor, shifted: _ShiftedLosses | None
    ) -> list[Tensor]:
        assert record.theta is not None
        tangent = tangent.to(self.space.dtype)
        known = record.losses if self.weighting is None else None  # training's losses are not the removal losses
        if shifted is None and self.hessian_every > 1 and self.reuse_recorded_gradient and known is not None and all(k is not None for k in known):
            # A step without a product of its own (hessian_every > 1): training_step's losses at theta_t are the
            # base of a forward difference, one forward pass without autograd (the products' truncation order).
            # (A 0-d step on the device, read by no one on the host; a zero tangent gives zero derivatives.)
            eps = finite_difference_step(record.theta, tangent, "forward", self.fd_rel_step, self._theta_norm, on_device=True)
            plus = [shifted_losses(loss_fn, self.space, record.theta, batch, tangent, eps, self.chunk_size) for batch in record.batches]
            self.loss_evaluations += len(plus)
            shifted = _ShiftedLosses(eps, list(plus), [None] * len(plus), list(known))
        if shifted is None:
            eps = finite_difference_step(record.theta, tangent, "central", self.fd_rel_step, self._theta_norm, on_device=True)
            shifted = _ShiftedLosses(eps, [None] * len(record.batches), [None] * len(record.batches))
        out = []
        for k, batch in enumerate(record.batches):
            plus, minus = shifted.plus[k], shifted.minus[k]
            # The losses at theta_t (training_step's, or the product's base pass): with the product's side, a
            # forward difference.
            base = shifted.base[k] if plus is not None and minus is None else None
            self.loss_evaluations += (plus is None) + (minus is None and base is None)
            out.append(
                difference_derivatives(
                    loss_fn, self.space, record.theta, batch, tangent, shifted.eps, plus=plus, minus=minus, base=base,
                    chunk_size=self.chunk_size, weighting=self.weighting,
                )
            )
        return out

    def _removal_derivatives(
        self, loss_fn: PerSampleLossFn, record: StepRecord, tangent: Tensor, only: list[int] | None = None
    ) -> list[Tensor]:
        """Coupled losses: ``r_z = <grad mean l(B_k \\ z) - grad mean l(B_k), tangent>`` per micro-batch
        (those in ``only``; default all), float64 ``[b_k]`` each."""
        remove = self.remove if self.remove is not None else self.small_batch_remove
        assert remove is not None
        params = self.space.unflatten(record.theta)
        direction = self.space.unflatten(tangent.to(self.space.dtype))
        out = []
        for k in range(len(record.batches)) if only is None else only:
            batch, ids = record.batches[k], record.ids[k]
            size = ids.numel()
            try:
                r = removal_derivatives(loss_fn, params, batch, direction, remove, size, vectorize=self.vectorize_removal)
            except ValueError as err:
                if self.batch_norm is None or "value per channel" not in str(err):
                    raise
                raise one_value_per_channel(record.step, size, err) from err
            self.forward_mode_passes += 1 + (size if size > 1 else 0)
            out.append(r.double())
        return out

    def _accumulate(self, record: StepRecord, derivatives: list[list[Tensor]], squeeze: bool) -> None:
        """Add ``<a^G_t, dG_t(z)> = (s_z - mean_k s) / (n (b_k - 1))`` (``s_z / n`` if ``b_k = 1``);
        ``s_z / (n b_k)`` with ``batch_removal="drop"``; coupled losses: ``r_z / n``."""
        if record.global_ids is not None and self.remove is not None:
            raise ValueError("coupled batch losses are scored in a single process only")
        if record.global_ids is not None:
            self._accumulate_global(record, derivatives, squeeze)
            return
        for k, ids in enumerate(record.ids):
            s = torch.stack([column[k] for column in derivatives], dim=1)  # [b, Q]
            b = s.shape[0]
            if b != ids.numel():
                raise ValueError(
                    f"per_sample_loss returned {b} values for a batch with {ids.numel()} sample ids at step {record.step}"
                )
            if self.remove is not None or self._removed_exactly(record, k):
                contribution = s / record.normalizer
            elif self.batch_removal == "drop":
                contribution = s / (b * record.normalizer)
            else:
                contribution = (s if b == 1 else (s - s.mean(dim=0, keepdim=True)) / (b - 1)) / record.normalizer
            # Finiteness is read once per sweep, from the steps' norms (_check_step_norms): no wait here.
            self._note_step(record, contribution)
            self.accumulator.add(ids, contribution[:, 0] if squeeze else contribution)

    def _accumulate_global(self, record: StepRecord, derivatives: list[list[Tensor]], squeeze: bool) -> None:
        """The distributed form: ``(s_z - mean_{U_k} s) / (n (|U_k| - m_z))`` for each local copy of
        ``z`` (``s_z / (n m_z)`` when the copies of ``z`` are all of ``U_k``), with the sums of ``s``
        over the global micro-batches ``U_k`` reduced across ranks (one collective per step)."""
        assert record.global_ids is not None
        local = [torch.stack([column[k] for column in derivatives], dim=1) for k in range(len(record.ids))]  # [b, Q]
        for k, (s, ids) in enumerate(zip(local, record.ids, strict=True)):
            if s.shape[0] != ids.numel():
                raise ValueError(
                    f"per_sample_loss returned {s.shape[0]} values for a batch with {ids.numel()} sample ids at step {record.step}"
                )
        sums = self.collective.sum(torch.stack([s.sum(dim=0) for s in local]))  # [K, Q], same on every rank
        if not all_finite(sums):  # a non-finite value on any rank shows in the global sums: every rank raises
            self._check_adjoint(record)
            raise FloatingPointError(f"non-finite per-sample directional derivatives at step {record.step}")
        for k, (s, ids) in enumerate(zip(local, record.ids, strict=True)):
            union = record.global_ids[k]
            size = union.numel()
            values, counts = union.unique(return_counts=True)
            copies = counts[torch.searchsorted(values, ids.cpu())].to(s.dtype).unsqueeze(1).to(s.device)  # m_z [b, 1]
            mean = (sums[k] / size).to(s.device)
            rest = size - copies
            if self.batch_removal == "drop":  # DDP averages the ranks' batch means: z's term weighs 1 / (W b_local)
                contribution = s / (self.collective.world_size * s.shape[0] * record.normalizer)
            else:
                contribution = torch.where(rest > 0, (s - mean) / rest.clamp(min=1), s / copies) / record.normalizer
            self._note_step(record, contribution)
            self.accumulator.add(ids, contribution[:, 0] if squeeze else contribution)

    def _hessian_product(
        self,
        loss_fn: PerSampleLossFn,
        record: StepRecord,
        vector: Tensor,
        add_to: Tensor,
        keep_losses: bool = False,
        alpha: float = 1.0,
        fold: _StatisticsFold | None = None,
    ) -> _ShiftedLosses | None:
        """Add ``alpha * H_t @ vector`` (the step's loss, by finite differences of step gradients)
        into ``add_to``, stepping along ``sign(alpha) * vector``; with ``keep_losses`` return the
        per-sample losses its gradient passes computed at ``theta_t + eps * vector`` (and
        ``theta_t - eps * vector``), ``eps`` of the sign of ``alpha``. ``fold``: the passes also
        differentiate the step's running-statistics terms, which adds ``J_S^T w`` into ``add_to`` and
        leaves their direct effect in ``fold`` (:class:`_StatisticsFold`)."""
        assert record.theta is not None
        base = record.grad if (self.reuse_recorded_gradient and self.finite_difference == "forward") else None
        self.hessian_products += 1
        # The step stays on the device (a 0-d tensor): a sweep reads no value per product.
        eps = finite_difference_step(record.theta, vector, self.finite_difference, self.fd_rel_step, self._theta_norm, on_device=True)
        # A zero vector still carries the statistics' terms: a step of the scale of a unit vector (the product
        # itself is then the rounding of the gradients' difference, with a recorded base gradient).
        if fold is not None:
            assert isinstance(eps, Tensor)
            rel = self.fd_rel_step if self.fd_rel_step is not None else default_rel_step(record.theta.dtype, self.finite_difference)
            eps = torch.where(eps > 0, eps, torch.full_like(eps, rel * (1.0 + (self._theta_norm or 0.0))))
            self.statistics_folds += 1
        eps = eps if alpha >= 0 else -eps
        weighting = self.weighting
        # each gradient pass's offset along the vector, in order: theta + eps v, then theta - eps v or theta itself
        offsets = [eps, -eps if self.finite_difference == "central" else None]
        evaluated: list[list[Tensor]] = []  # per gradient pass: theta + eps v, then theta or theta - eps v
        count = len(record.batches)
        minus: list[Tensor | None] = [None] * count
        if keep_losses and self.finite_difference == "forward" and base is not None:
            # The loss differences' other side, where training_step's losses at theta_t are missing: a plain
            # forward pass at theta_t - eps v, taken now since add_to may be vector itself.
            known = record.losses if record.losses is not None and self.weighting is None else (None,) * count
            sides = fold.weightings(-eps, alpha) if fold is not None else [weighting] * count
            for k, batch in enumerate(record.batches):
                if known[k] is None:
                    minus[k] = shifted_losses(loss_fn, self.space, record.theta, batch, vector, -eps, self.chunk_size, sides[k])
                    self.loss_evaluations += 1

        def gradient(theta: Tensor) -> Tensor | list[Tensor]:
            offset = offsets[len(evaluated)]
            by_batch = fold.weightings(offset, alpha) if fold is not None and offset is not None else weighting
            losses, grad = step_losses_and_gradient(
                loss_fn, self.space, theta, record.batches, record.normalizer, self.collective, self.chunk_size, flat=False,
                weighting=by_batch,
            )
            evaluated.append(losses)
            return grad

        hessian_vector_product(
            gradient, record.theta, vector, scheme=self.finite_difference, base_gradient=base, eps=eps, add_to=add_to, alpha=alpha
        )
        if not keep_losses:
            return None
        if self.finite_difference == "central":
            return _ShiftedLosses(eps, list(evaluated[0]), list(evaluated[1]))
        # forward: the second gradient pass (without a recorded base gradient) ran at theta_t itself
        at_theta: list[Tensor | None] = (
            list(evaluated[1]) if base is None else list(record.losses if record.losses is not None and self.weighting is None else (None,) * count)
        )
        return _ShiftedLosses(eps, list(evaluated[0]), minus, at_theta)


class _StatisticsFold:
    """One column's running-statistics terms of a step (``w_k``, ``[R]`` per micro-batch), taken with the
    step's Hessian product instead of a gradient pass of their own.

    Each gradient pass at ``theta + e v`` (``e``: the product's signed step, ``-e`` or none on the
    other side) adds ``c P_k`` to micro-batch ``k``'s objective, ``P_k = <w_k, S(theta; B_k)>`` and
    ``c = n e / alpha`` (``n``: the step's normaliser, ``alpha``: the product's factor), so that
    the product's difference of gradients adds ``sum_k J_S^T w_k`` (central: at ``theta``; forward:
    at ``theta + e v``). A sample's direct effect on ``P`` has two parts. Through its own rows of each
    layer's statistics: :meth:`direct`, the passes' mean of :class:`RunningStatisticsTerm`'s closed
    form. Through the normalisation of later layers' inputs, ``dP/domega``: with the removal losses
    of the same passes, whose difference adds ``b n dP/domega_z / alpha`` to the step's derivative of
    sample ``z``, which the step's term turns into ``-b / (b - 1) dP/domega_z`` when ``alpha`` is the
    step's own factor (a product of the step alone). The normalisation's weighted mean and variance do
    not change when every weight is scaled alike, so ``dP/domega`` sums to zero over the batch and the
    step term's mean leaves it whole. With :meth:`direct` times ``-b / (b - 1)`` this is the separate
    pass's ``-b / (b - 1) d<w, S>/domega_z``."""

    def __init__(self, trace: BatchNormTrace, weights: list[Tensor], normalizer: int, scored: bool = True) -> None:
        # scored: the step's samples are scored, so direct() is wanted (else only the adjoint's part)
        self.trace, self.weights, self.normalizer, self.scored = trace, weights, normalizer, scored
        self.passes: list[list[RunningStatisticsTerm]] = []

    def weightings(self, offset: Tensor | float, alpha: float) -> list[SampleWeighting]:
        """The sample weightings of one gradient pass at ``theta + offset v``, one per micro-batch."""
        coefficient = offset * (self.normalizer / alpha)
        terms = [RunningStatisticsTerm(self.trace, w, coefficient, direct=self.scored) for w in self.weights]
        self.passes.append(terms)
        return [functools.partial(self.trace.sample_weighting, statistics=term) for term in terms]

    def direct(self) -> list[Tensor]:
        """Each micro-batch's samples' own share of ``dP_k/domega``, float64 ``[b_k]``: the mean over the passes."""
        return [torch.stack([terms[k].direct() for terms in self.passes]).mean(dim=0) for k in range(len(self.weights))]


def _linear_removal_scale(ids: Tensor) -> Tensor:
    """``-b / (b - m_z)`` for each sample of a micro-batch of ``b`` (``m_z``: the copies of its id there,
    which a removal all takes out): the linear removal's extrapolation of a statistic from its weight
    derivative, float64 ``[b]`` (each copy adds its share)."""
    _, inverse, counts = ids.reshape(-1).unique(return_inverse=True, return_counts=True)
    b = float(ids.numel())
    copies = counts[inverse].to(torch.float64)
    return -b / (b - copies).clamp(min=1.0)


def one_value_per_channel(step: int, size: int, err: Exception) -> ValueError:
    """The error for a micro-batch that leaves batch norm one value per channel once a sample is removed."""
    return ValueError(
        f"batch_norm='batch' (which 'auto' chooses for batch-norm models): optimizer step {step} trained on a micro-batch "
        f"of {size} samples, and without one of them a batch norm layer has one value per channel to normalise ({err}). "
        "Drop short batches (DataLoader(drop_last=True)), or pass batch_norm='running'"
    )


class _ShiftedLosses:
    """Per-sample losses of each micro-batch at ``theta + eps v``, ``theta - eps v`` and ``theta``
    (``None``: not evaluated)."""

    def __init__(
        self, eps: Step, plus: list[Tensor | None], minus: list[Tensor | None], base: list[Tensor | None] | None = None
    ) -> None:
        self.eps, self.plus, self.minus = eps, plus, minus
        self.base = base if base is not None else [None] * len(plus)


def step_losses_and_gradient(
    loss_fn: PerSampleLossFn,
    space: ParameterSpace,
    theta: Tensor,
    batches: tuple[Any, ...],
    normalizer: int,
    collective: Collective | None = None,
    chunk_size: int | None = None,
    flat: bool = True,
    weighting: SampleWeighting | list[SampleWeighting] | None = None,
) -> tuple[list[Tensor], Tensor | list[Tensor]]:
    """The gradient an optimizer step was fed, ``sum_k grad mean_k / normalizer`` over its micro-batches
    and averaged over the ranks of ``collective`` as DDP does (a collective call in distributed runs),
    with each micro-batch's (local) per-sample losses at ``theta``: ``(losses, gradient)``; passes
    over at most ``chunk_size`` samples each. ``flat=False``: outside distributed runs, the
    gradient as one tensor per parameter (see :func:`~lightning_influence.kernels.losses_and_gradient`);
    ``weighting``: the losses are the micro-batches' removal losses (a list: one weighting per micro-batch)."""
    distributed = collective is not None and collective.distributed
    pieces = not flat and not distributed
    weightings = weighting if isinstance(weighting, list) else [weighting] * len(batches)
    losses, total = losses_and_gradient(loss_fn, space, theta, batches[0], chunk_size, flat=not pieces, weighting=weightings[0])
    every = [losses]
    for batch, by_batch in zip(batches[1:], weightings[1:], strict=True):
        losses, grad = losses_and_gradient(loss_fn, space, theta, batch, chunk_size, flat=not pieces, weighting=by_batch)
        every.append(losses)
        if isinstance(total, Tensor):
            total.add_(grad)  # type: ignore[arg-type]
        else:
            torch._foreach_add_(total, grad)  # type: ignore[arg-type]
    if normalizer != 1:
        if isinstance(total, Tensor):
            total.div_(normalizer)
        else:
            torch._foreach_div_(total, normalizer)
    if isinstance(total, Tensor) and collective is not None:
        total = collective.mean(total)
    return every, total
