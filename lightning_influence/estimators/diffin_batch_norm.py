"""Diff-In on batch-norm models scored as trained (``DiffIn(batch_norm="batch")``).

Training normalises each micro-batch ``B`` with its own statistics, so the step's loss is a
*coupled* batch loss ``L(theta; B) = mean_{i in B} l_i(theta; B)``, and each train-mode forward
of a batch-norm layer updates its running statistics (running mean and unbiased running
variance, stacked per layer into ``r``):

    r_{t+1} = (1 - m_t) r_t + m_t S(theta_t; B_t)

(``S``: the batch mean and unbiased variance of the layer's input over every dimension but the
channel one; ``m_t``: the layer's ``momentum``, or ``1 / num_batches_tracked`` after the forward's
increment when ``momentum=None``). The running statistics never feed training's forward, only the
target, which is evaluated in evaluation mode at the end: ``F(theta_T, r_T)``. The trajectory's
state is ``(theta, optimizer state, r)``; linearising the leave-one-out run around it, as for the
parameters (see :mod:`~lightning_influence.estimators.diffin_sweep`), gives the adjoint
``mu_t`` of ``r`` next to ``lambda_t`` of ``theta``:

    mu_T      = dF/dr (theta_T, r_T)                           (evaluation mode)
    mu_t      = (1 - m_t) mu_{t+1}
    lambda_t  = [the parameter sweep's a^theta + H_t a^G]  +  J_S(theta_t; B_t)^T (m_t mu_{t+1})

and the removal of ``z`` from ``B_t`` adds, besides the coupled loss's removal term
``<a^G_t, grad L(B \\ z) - grad L(B)> / n`` (the sweep's coupled machinery, with the Hessian
products of ``L`` evaluated with batch statistics), the direct change of the step's statistics

    m_t < mu_{t+1}, S(theta_t; B_t \\ z) - S(theta_t; B_t) >.

How ``B \\ z`` is evaluated (``batch_norm_removal``): ``"exact"`` runs the batch without each sample
(``remove``: ``b`` forward-mode passes over sub-batches per micro-batch, the coupled-loss machinery);
``"linear"`` weights each sample's rows in every batch-norm layer (:meth:`BatchNormTrace.sample_weighting`,
:func:`weighted_moments`) and linearises the removal in the weights: the step's terms become
differences of the *removal losses* ``v_i = L + b dL/dw_i``
(:func:`~lightning_influence.kernels.removal_losses`), whose weight gradients come with the gradient
passes the sweep runs anyway, and ``S(B \\ z) - S(B) = -b / (b - 1) dS/dw_z`` (exact for the mean
and the unbiased variance by construction). Its error is the network's curvature in the batch
statistics over a shift of ``1 / (b - 1)`` of them.

With several micro-batches per step (gradient accumulation) each micro-batch's forward is one
update of ``r`` at the same ``theta_t``, in order. Every forward here runs with the batch-norm
layers in training mode but without running statistics (``track_running_stats`` off for the
call: the batch statistics are used and no buffer is written); dropout stays off.

Under DDP (without ``SyncBatchNorm``) each rank normalises its own shard of the global micro-batch,
so each rank's step losses and removal losses are the ones above over its shard (the sweep's
global re-averaging then weighs the global batch as training's averaged gradient did), and the
running statistics of the model that is saved and evaluated are rank zero's: DDP broadcasts rank
zero's buffers before each step's first forward (and without ``broadcast_buffers`` rank zero still
keeps its own chain), so ``S`` above is rank zero's shard's statistics. Only rank zero computes
the running statistics' terms; its ``J_S^T w`` is broadcast into every rank's adjoint, and the sweep
runs with rank zero's buffers on every rank (:func:`~lightning_influence.distributed.rank_zero_buffers`),
so the target reads rank zero's running statistics.

Units and sign as everywhere: target-loss change when the sample is removed (positive helps).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_influence.batch_norm import batch_statistics, fixed_statistics, removal_gap, sync_batch_norm_layers
from lightning_influence.kernels import (
    ParameterSpace,
    PerSampleLossFn,
    RemoveFn,
    SampleWeights,
    SampleWeightsError,
    evaluation_mode,
    weighted_batch_loss,
)

BatchNormMode = Literal["auto", "running", "batch"]
"""``"running"``: batch norm evaluated in evaluation mode with the running statistics (a
deterministic network along the recorded trajectory); ``"batch"``: as trained, see the module;
``"auto"``: ``"batch"`` where the model has batch norm and the run allows it
(:func:`resolve_batch_norm_mode`), else ``"running"``."""

BATCH_NORM_MODES: tuple[str, ...] = ("auto", "running", "batch")

BatchNormRemoval = Literal["auto", "linear", "exact"]
"""How ``batch_norm="batch"`` takes a sample out of its batch's statistics. ``"linear"``: sample
weights in the batch-norm layers, differentiated with the step's gradient passes
(:func:`~lightning_influence.kernels.removal_losses`; first order in ``1 / (b - 1)``, about the
cost of scoring the model without batch norm); ``"exact"``: the batch re-evaluated without each
sample (``remove_from_batch``; ``b`` forward-mode passes over sub-batches per scored micro-batch);
``"auto"``: ``"linear"`` unless the module's loss couples its samples itself (contrastive) or
``per_sample="forward_mode"`` is asked for."""

BATCH_NORM_REMOVALS: tuple[str, ...] = ("auto", "linear", "exact")


def weighted_moments(x: Tensor, weights: Tensor | None, running: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel mean, biased variance (normalisation's) and unbiased variance (the running
    statistics') of a batch-norm input ``x [N, C, *]`` over every dimension but the channel one:
    training's batch statistics. With ``weights [N]`` (all one: the same values) each sample's rows
    are weighted, shaped for :func:`~lightning_influence.kernels.removal_losses`: the removal of
    ``z`` is ``w = 1 - t e_z`` at ``t = 1``, along which weighted means are affine in
    ``s = t / (N - t)``, and the removal's linear extrapolation is ``-N / (N - 1) dS/dw_z``.

    - The mean and the biased variance are weighted means, unchanged when every weight is scaled
      alike (so the removal losses average to the batch loss). The mean's extrapolation is exact;
      the variance misses ``-s^2 (xbar_z - mean)^2`` (``xbar_z``: sample ``z``'s mean over the
      other dimensions), a second-order term like the network's own curvature.
    - The running variance (only read by the target, through the running statistics) is made
      exact for the removal of one row (with ``m`` copies of a sample removed together, as a sampler
      drawing with replacement makes them, first order: e.g. 3% off for 2 copies in 16): ``sum_i (w_i - 1) (xbar_i - mean)^2 / (N (N - 1))`` adds the missing term to first
      order, the factor ``n / (n - 1)`` (``n`` values per channel) moves linearly in ``sum w`` to
      its value without one sample, and the product of the two changes is added by a term that
      vanishes at unit weights: its extrapolation is the sub-batch's unbiased variance.

    ``running=False``: without the running variance (``None``), for the normalisation alone."""
    dims = [0, *range(2, x.dim())]
    if weights is None:
        return x.mean(dims), x.var(dims, unbiased=False), (x.var(dims, unbiased=True) if running else None)
    rows, per = x.shape[0], (x[0, 0].numel() if x.dim() > 1 else 1)
    w = weights.to(x.dtype)
    shape = [-1] + [1] * (x.dim() - 1)
    total = w.sum()
    mean = (w.view(shape) * x).sum(dims) / (total * per)
    centred = x - mean.view([1, -1] + [1] * (x.dim() - 2))
    var = (w.view(shape) * centred.square()).sum(dims) / (total * per)
    if not running:
        return mean, var, None
    sample_means = centred.mean(dim=list(range(2, x.dim()))) if x.dim() > 2 else centred  # [N, C]
    exact = var + ((w - 1.0).unsqueeze(1) * sample_means.square()).sum(0) / (rows * (rows - 1))
    full, without = rows * per / (rows * per - 1.0), (rows - 1) * per / ((rows - 1) * per - 1.0)
    factor = full + (rows - total) * (without - full) * (rows - 1) / rows
    # (var + dvar)(factor + dfactor) holds dvar * dfactor too: the last term, zero at unit weights, adds it
    return mean, var, exact * factor + (without - full) * (exact - x.var(dims, unbiased=False))


class OneValuePerChannelError(ValueError):
    """A micro-batch so small that batch norm, without one of its samples, would normalise one value
    per channel (``rows``: the samples it holds)."""

    def __init__(self, message: str, rows: int) -> None:
        super().__init__(message)
        self.rows = rows


def check_batch_norm_mode(value: Any) -> None:
    if value not in BATCH_NORM_MODES:
        raise ValueError(
            f"batch_norm must be 'auto' (the default: 'batch' for a model with batch norm where the run allows it), "
            f"'running' (evaluation mode, running statistics) or 'batch' (batch statistics and running statistics as "
            f"training computed them), got {value!r}"
        )


def has_batch_norm(module: nn.Module) -> bool:
    """``module`` holds a batch-norm layer (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def resolve_batch_norm_mode(module: nn.Module, obstacles: Mapping[str, bool]) -> tuple[Literal["running", "batch"], list[str]]:
    """``batch_norm="auto"``: ``"batch"`` for a module with batch norm unless something prevents it
    (its unmodelled normalisation layers, or one of the caller's named ``obstacles`` that is true),
    else ``"running"``; with the reasons that prevented it (empty when none did, or when the
    module has no batch norm at all)."""
    if not has_batch_norm(module):
        return "running", []
    reasons = [f"{layer} is not modelled" for layer in unmodelled_normalisation(module)]
    reasons += [name for name, present in obstacles.items() if present]
    return ("running", reasons) if reasons else ("batch", [])


def unmodelled_normalisation(module: nn.Module) -> list[str]:
    """Layers whose training-mode behaviour ``batch_norm="batch"`` does not model: synchronised batch
    norm (statistics over every rank's shard), instance norm with running statistics, and batch-norm
    subclasses with a forward of their own (the sweep writes batch norm out as ``nn.BatchNorm``
    computes it: the target's evaluation-mode layers, the running statistics' updates, the linear
    removal's weighted statistics)."""
    out = [f"{name} (SyncBatchNorm)" for name in sync_batch_norm_layers(module)]
    for name, sub in module.named_modules():
        label = name or type(sub).__name__
        if isinstance(sub, nn.modules.instancenorm._InstanceNorm) and sub.track_running_stats:
            out.append(f"{label} ({type(sub).__name__}(track_running_stats=True))")
        elif isinstance(sub, _BatchNorm) and not isinstance(sub, nn.SyncBatchNorm) and type(sub).forward is not _BatchNorm.forward:
            out.append(f"{label} ({type(sub).__name__}, a batch-norm subclass with a forward of its own)")
    return out


class BatchNormTrace:
    """The batch-norm layers of ``module`` and the running statistics they carry, flat.

    ``layers``: every ``_BatchNorm`` submodule (all run with batch statistics in :meth:`batch_statistics_mode`);
    ``tracked``: those with running statistics, whose ``running_mean`` and ``running_var`` make up
    the flat vector ``r`` (``stats_space``: names ``<layer>.running_mean``, ``<layer>.running_var``).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.layers: list[tuple[str, _BatchNorm]] = [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm)]
        if not self.layers:
            raise ValueError(
                f"batch_norm='batch' scores batch-norm layers as trained, and {type(module).__name__} has none "
                "(nn.BatchNorm1d/2d/3d): leave batch_norm at its default"
            )
        unmodelled = unmodelled_normalisation(module)
        if unmodelled:
            raise ValueError(
                f"batch_norm='batch' models nn.BatchNorm1d/2d/3d (under DDP: each rank's own shard statistics); {', '.join(unmodelled)} is not modelled "
                "(SyncBatchNorm normalises over every rank's shard; an instance norm's running statistics would need "
                "their own adjoint; a subclass's own forward is not what the sweep writes out). Use nn.BatchNorm* (without "
                "sync_batchnorm), or batch_norm='running' (evaluation mode, the module's own layers)"
            )
        self.tracked = [(n, m) for n, m in self.layers if m.track_running_stats and m.running_mean is not None]
        names: list[str] = []
        shapes: list[torch.Size] = []
        for name, layer in self.tracked:
            assert layer.running_mean is not None and layer.running_var is not None
            names += [f"{name}.running_mean", f"{name}.running_var"]
            shapes += [layer.running_mean.shape, layer.running_var.shape]
        self.channels = [int(layer.num_features) for _, layer in self.tracked]
        self._weights: SampleWeights | None = None  # set inside sample_weighting
        self._names = tuple(names)
        self._shapes = tuple(shapes)

    # ------------------------------------------------------------------ running statistics
    def stats_space(self, like: ParameterSpace) -> ParameterSpace:
        return ParameterSpace(names=self._names, shapes=self._shapes, dtype=like.dtype, device=like.device)

    @property
    def size(self) -> int:
        return 2 * sum(self.channels)

    def running(self, dtype: torch.dtype) -> Tensor:
        """The current running statistics, flat ``[R]`` (layer by layer: mean, then variance)."""
        parts = []
        for _, layer in self.tracked:
            assert layer.running_mean is not None and layer.running_var is not None
            parts += [layer.running_mean.detach().reshape(-1), layer.running_var.detach().reshape(-1)]
        if not parts:
            return torch.zeros(0, dtype=dtype)
        return torch.cat(parts).to(dtype)

    def counts(self) -> Tensor | None:
        """``num_batches_tracked`` of the tracked layers, ``[L]`` int64 (a copy, on the module's device)."""
        if not self.tracked:
            return None
        return torch.stack([layer.num_batches_tracked.detach().reshape(()) for _, layer in self.tracked]).clone()  # type: ignore[union-attr]

    def check_training(self, step: int, sizes: list[int]) -> None:
        """Every batch-norm layer must have run in training mode (batch statistics) at this step, on
        micro-batches (of ``sizes`` samples) of at least two samples: the removal of a micro-batch's only
        sample would leave no batch to normalise. Checked as the step is recorded, before more training."""
        if min(sizes, default=2) < 2:
            raise ValueError(
                f"DiffIn(batch_norm='batch', which 'auto' chooses for batch-norm models): optimizer step {step} trained on a "
                "micro-batch of one sample, whose removal leaves no batch to normalise with batch statistics. Drop the "
                "short last batch (DataLoader(drop_last=True)), or pass batch_norm='running' (evaluation mode, an "
                "approximation of batch norm trained with batch statistics)"
            )
        frozen = [name for name, layer in self.layers if not layer.training]
        if frozen:
            everything = len(frozen) == len(self.layers)
            raise ValueError(
                f"DiffIn(batch_norm='batch', which 'auto' chooses for batch-norm models): batch norm layer(s) {frozen} were in "
                f"evaluation mode during training at optimizer step {step} (frozen batch norm, e.g. .eval() in a hook): they "
                "normalised with their running statistics, and batch_norm='batch' models layers trained with batch statistics. "
                + (
                    "Pass batch_norm='running', which models batch norm frozen throughout exactly"
                    if everything and step == 0
                    else "Freeze all of them from the first step on (then batch_norm='running', which 'auto' chooses then, models "
                    "the run exactly) or none; batch_norm='running' scores this run approximately"
                )
            )

    def momenta(self) -> tuple[float | None, ...]:
        return tuple(None if layer.momentum is None else float(layer.momentum) for _, layer in self.tracked)

    def factors(self, counts_after: Tensor, momenta: tuple[float | None, ...], micro_batches: int) -> Tensor:
        """``m`` of each micro-batch's update of each tracked layer, float64 ``[K, L]``, for a step
        whose ``micro_batches`` forwards left the counters at ``counts_after``."""
        after = counts_after.to("cpu", torch.float64)
        rows = []
        for k in range(micro_batches):
            count = after - (micro_batches - 1 - k)  # num_batches_tracked after this forward's increment
            rows.append(torch.tensor([1.0 / float(c) if mom is None else mom for c, mom in zip(count.tolist(), momenta, strict=True)], dtype=torch.float64))
        return torch.stack(rows) if rows else torch.zeros(0, len(momenta), dtype=torch.float64)

    def expand(self, per_layer: Tensor) -> Tensor:
        """One value per tracked layer to the flat layout of ``r``."""
        sizes = torch.tensor([2 * c for c in self.channels], device=per_layer.device)
        return per_layer.repeat_interleave(sizes)

    # ------------------------------------------------------------------ sample weights
    @contextlib.contextmanager
    def sample_weighting(
        self,
        weights: SampleWeights,
        outputs: list[tuple[str, Tensor]] | None = None,
        statistics: RunningStatisticsTerm | None = None,
    ) -> Iterator[None]:
        """Every batch-norm layer normalises with statistics in which each sample's rows count with
        its weight (``weights``, requested with the number of rows the layer receives): at unit
        weights training's batch statistics, differentiable by the weights
        (:data:`~lightning_influence.kernels.SampleWeighting`). Its running statistics, captured by
        :meth:`statistics_function`, are weighted alike. Run inside :meth:`batch_statistics_mode`.
        ``outputs``: each layer's (name, weighted output) is appended there. ``statistics``: the
        tracked layers' running statistics go into that term of the pass's objective
        (:class:`RunningStatisticsTerm`)."""
        names = {id(layer): name for name, layer in self.layers}
        index = {id(layer): k for k, (_, layer) in enumerate(self.tracked)}
        if statistics is not None:
            weights.auxiliary.append(statistics)

        def weighted(layer: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            if statistics is not None and id(layer) in index:
                statistics.capture(index[id(layer)], x)
            w = self._sample_weights(weights, layer, x, names[id(layer)])
            mean, var, _ = weighted_moments(x, w, running=False)
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + layer.eps)  # type: ignore[operator]
            if layer.weight is not None:
                y = y * layer.weight.view(shape) + layer.bias.view(shape)  # type: ignore[union-attr]
            if outputs is not None:
                outputs.append((names[id(layer)], y))
            return y

        previous, self._weights = self._weights, weights
        try:
            with self._hooks(post=weighted, layers=self.layers):
                yield
        finally:
            self._weights = previous

    @staticmethod
    def _sample_weights(weights: SampleWeights, layer: nn.Module, x: Tensor, name: str) -> Tensor:
        if x.dim() < 2:
            raise SampleWeightsError(f"batch norm layer {name!r} received an input of shape {tuple(x.shape)}; expected [N, C, ...]")
        if (x.shape[0] - 1) * (x[0, 0].numel()) < 2:
            raise OneValuePerChannelError(
                f"batch norm layer {name!r} normalises {x.shape[0]} rows of shape {tuple(x.shape[1:])}: without one "
                "sample it would have one value per channel",
                rows=int(x.shape[0]),
            )
        return weights.get(x.shape[0], x, f"batch norm layer {name!r}")

    def check_sample_weighting(
        self, loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, remove: RemoveFn | None, owner: str
    ) -> str | None:
        """What the linear removal assumes, on one batch, before training: raises ``ValueError`` (naming
        ``owner``, e.g. ``"DiffIn(batch_norm_removal='linear')"``, and the way out) where

        - the weighted layers at unit weights do not give the module's own training-mode losses (a
          forward hook that changes a batch norm's output);
        - a layer's rows are not the batch's samples (another number of rows; or, where ``remove``
          takes out one sample alone, a weight of 0 on a sample does not give ``remove``'s losses at
          the first, middle, last and one more position: rows sorted or permuted before the norm);
        - a layer's output does not reach the loss through autograd (``no_grad``, detached, unused),
          so that the weights' gradients would miss its coupling.

        Returns ``None`` if ``remove`` takes out exactly one sample (checked in evaluation mode, where
        each sample's loss is its own), else why not: then it cannot serve the short micro-batches."""
        exact = "Use batch_norm_removal='exact' (each batch re-evaluated without each sample through remove_from_batch)"
        with torch.no_grad(), self.batch_statistics_mode():
            native = loss_fn(params, batch)
        if not isinstance(native, Tensor) or native.dim() != 1:
            return "the per-sample losses are not one value per sample"  # the losses' own checks say more
        size = native.shape[0]
        outputs: list[tuple[str, Tensor]] = []
        try:
            with torch.enable_grad(), self.batch_statistics_mode():
                weighted, weights, total = weighted_batch_loss(loss_fn, params, batch, functools.partial(self.sample_weighting, outputs=outputs))
                reached: set[str] = set()
                for layer, y in outputs:
                    if y.requires_grad:
                        y.register_hook(lambda grad, layer=layer: reached.add(layer))
                if total.requires_grad:
                    torch.autograd.grad(total, [weights])
        except OneValuePerChannelError as err:
            raise ValueError(
                f"{owner}: on the first batch ({size} samples) {err}. Train on larger batches, or pass batch_norm='running'"
            ) from err
        except SampleWeightsError as err:
            raise ValueError(
                f"{owner} weights each sample's rows of the batch-norm inputs, and on the first batch ({size} samples) "
                f"{err}. A model that folds other dimensions into the batch one (e.g. a "
                f"sequence reshaped to [batch * length, channels]) or normalises parts of the batch apart is not modelled "
                f"so. {exact}"
            ) from None
        gap = float((weighted.detach().double() - native.double()).abs().max())
        tolerance = 1e3 * torch.finfo(native.dtype).eps * (1.0 + float(native.abs().max()))
        if gap > tolerance:
            raise ValueError(
                f"{owner}: the batch-norm layers, recomputed as nn.BatchNorm computes them in training mode so that samples "
                f"can be weighted, give other losses on the first batch (by up to {gap:.3g}): a layer whose output is "
                f"changed elsewhere (a forward hook on it) is not modelled. {exact}"
            )
        cut = sorted({layer for layer, _ in outputs} - reached)
        if cut:
            raise ValueError(
                f"{owner} reads how removing a sample changes the other samples' losses from autograd, and the output of "
                f"batch norm layer(s) {cut} does not reach the loss through autograd (computed under torch.no_grad(), "
                f"detached, or unused): the scores would miss that coupling. {exact}, or remove an unused layer"
            )
        return self._check_sample_order(loss_fn, params, batch, remove, owner, size, tolerance, exact)

    def _check_sample_order(
        self, loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, remove: RemoveFn | None,
        owner: str, size: int, tolerance: float, exact: str,
    ) -> str | None:
        """See :meth:`check_sample_weighting`: ``remove`` checked in evaluation mode, then the weights'
        row order against it, at a few positions."""
        if remove is None:
            return "the module has no remove_from_batch"
        if size < 3:
            return None
        interior = int(torch.randint(1, size - 1, (1,), generator=torch.Generator().manual_seed(size)))
        positions = sorted({0, size // 2, size - 1, interior})
        reduced: dict[int, Any] = {}
        with torch.no_grad(), evaluation_mode(self.module), fixed_statistics(self.module):  # each sample's loss its own
            full = loss_fn(params, batch)
            for index in positions:
                try:
                    reduced[index] = remove(batch, index)
                    alone = loss_fn(params, reduced[index])
                except Exception as err:  # noqa: BLE001 - the module's own removal failing on its own batch: say so
                    return f"remove_from_batch(batch, {index}) failed ({type(err).__name__}: {err})"
                if alone.shape != (size - 1,) or removal_gap(full, alone, index)[0] > removal_gap(full, alone, index)[1]:
                    return f"remove_from_batch(batch, {index}) takes out more than sample {index} (or other rows)"
        with torch.no_grad(), self.batch_statistics_mode():
            for index in positions:
                sub = loss_fn(params, reduced[index])
                zeroed = torch.ones(size, dtype=sub.dtype, device=sub.device)
                zeroed[index] = 0.0
                with self.sample_weighting(SampleWeights(zeroed)):
                    kept = loss_fn(params, batch)
                gap = float((sub.double() - torch.cat([kept[:index], kept[index + 1 :]]).double()).abs().max())
                if gap > tolerance:
                    raise ValueError(
                        f"{owner} weights row i of every batch-norm input as sample i of the batch, and on the first batch "
                        f"a weight of 0 on sample {index} does not give the losses of remove_from_batch(batch, {index}) (by "
                        f"up to {gap:.3g}), although in evaluation mode it takes out that sample alone: the rows reach the "
                        f"batch norm in another order than the samples (sorted or permuted before it). {exact}"
                    )
        return None

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def batch_statistics_mode(self) -> Iterator[None]:
        """Evaluation mode (dropout off) except the batch-norm layers, which normalise with the batch's
        own statistics and write no buffer (``track_running_stats`` off for the duration); every flag
        is restored after (:func:`lightning_influence.batch_norm.batch_statistics`)."""
        with evaluation_mode(self.module), batch_statistics(self.module):
            yield

    @contextlib.contextmanager
    def _hooks(self, pre: Any = None, post: Any = None, layers: list[tuple[str, _BatchNorm]] | None = None) -> Iterator[None]:
        handles = []
        try:
            for _, layer in self.tracked if layers is None else layers:
                if pre is not None:
                    handles.append(layer.register_forward_pre_hook(pre))
                if post is not None:
                    handles.append(layer.register_forward_hook(post))
            yield
        finally:
            for h in handles:
                h.remove()

    def capture_statistics(self, k: int, x: Tensor, weights: SampleWeights | None, seen: dict[int, Tensor]) -> None:
        """Tracked layer ``k``'s batch statistics (mean, unbiased variance) of its input ``x`` into
        ``seen``, with each sample's rows weighted by ``weights`` if given (:func:`weighted_moments`)."""
        name, layer = self.tracked[k]
        if k in seen:
            raise ValueError(
                f"batch norm layer {name!r} ran twice in one per_sample_loss call: batch_norm='batch' "
                "(which 'auto' chooses for batch-norm models) models one update of its running statistics per "
                "forward. Call each batch-norm layer once per forward (one layer per use), or use "
                "batch_norm='running' (evaluation mode, an approximation)"
            )
        if weights is None:
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], unbiased=True)
            seen[k] = torch.cat([mean, var])
            return
        mean, _, unbiased = weighted_moments(x, self._sample_weights(weights, layer, x, name))
        assert unbiased is not None
        seen[k] = torch.cat([mean, unbiased])

    def stacked_statistics(self, seen: dict[int, Tensor], like: Tensor) -> Tensor:
        """The captured statistics in the layout of ``r`` (``[R]``); raises if a tracked layer did not run."""
        missing = [self.tracked[k][0] for k in range(len(self.tracked)) if k not in seen]
        if missing:
            raise ValueError(
                f"batch norm layer(s) {missing} did not run in per_sample_loss: batch_norm='batch' (which 'auto' chooses for "
                "batch-norm models) carries every batch norm layer's running statistics through the steps, and an unused "
                "layer's never move. Remove the unused layer from the module, or pass batch_norm='running'"
            )
        return torch.cat([seen[k] for k in range(len(self.tracked))]) if seen else like.new_zeros(0)

    def statistics_function(self, loss_fn: PerSampleLossFn) -> Any:
        """``(params, batch) -> (losses [B], S [R])``: the per-sample losses with batch statistics and
        the batch statistics of every tracked layer's input (run inside :meth:`batch_statistics_mode`;
        inside :meth:`sample_weighting` the statistics are weighted by its weights)."""
        index = {id(layer): k for k, (_, layer) in enumerate(self.tracked)}

        def fn(params: Mapping[str, Tensor], batch: Any) -> tuple[Tensor, Tensor]:
            seen: dict[int, Tensor] = {}

            def capture(layer: nn.Module, inputs: tuple[Any, ...]) -> None:
                self.capture_statistics(index[id(layer)], inputs[0], self._weights, seen)

            with self._hooks(pre=capture):
                losses = loss_fn(params, batch)
            return losses, self.stacked_statistics(seen, losses)

        return fn

    def target_loss_function(self, loss_fn: PerSampleLossFn) -> PerSampleLossFn:
        """``loss_fn`` over parameters and running statistics together (the names of :meth:`stats_space`),
        differentiable in both: each tracked layer in evaluation mode is written out as
        ``(x - mean) / sqrt(var + eps) * weight + bias`` with the given statistics."""
        names = set(self._names)
        prefix = {id(layer): name for name, layer in self.tracked}

        def fn(params: Mapping[str, Tensor], batch: Any) -> Tensor:
            stats = {n: p for n, p in params.items() if n in names}
            rest = {n: p for n, p in params.items() if n not in names}

            def explicit(layer: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
                if layer.training:
                    return output
                name = prefix[id(layer)]
                x = inputs[0]
                shape = [1, -1] + [1] * (x.dim() - 2)
                y = (x - stats[f"{name}.running_mean"].view(shape)) * torch.rsqrt(stats[f"{name}.running_var"].view(shape) + layer.eps)  # type: ignore[operator]
                if layer.weight is not None:
                    y = y * layer.weight.view(shape) + layer.bias.view(shape)  # type: ignore[union-attr]
                return y

            with self._hooks(post=explicit):
                return loss_fn(rest, batch)

        return fn


class RunningStatisticsTerm:
    """The running statistics' part of one micro-batch of a step, folded into a gradient pass of its
    loss (a :class:`~lightning_influence.kernels.AuxiliaryObjective` of :meth:`BatchNormTrace.sample_weighting`):
    the term ``coefficient * P`` with ``P = <w, S>``, ``w = m mu`` (``[R]``, the running statistics'
    adjoint times the micro-batch's momenta) and ``S`` the tracked layers' batch statistics (mean,
    unbiased variance) of their inputs. The pass's parameter gradient then carries
    ``coefficient * J_S^T w``, and its gradient by the sample weights of the normalisation
    ``coefficient * dP/domega`` through the normalised inputs of later layers; :meth:`direct` gives
    the rest of each sample's direct effect on ``P``, its own rows' share of each layer's weighted
    statistics (:func:`statistics_weight_gradient`, in closed form at the pass's inputs)."""

    def __init__(self, trace: BatchNormTrace, w: Tensor, coefficient: Tensor | float, direct: bool = True) -> None:
        # direct: compute the samples' own-row share (direct(); not needed for unscored steps)
        self.trace, self.w, self.coefficient, self.wants_direct = trace, w, coefficient, direct
        self.seen: dict[int, Tensor] = {}
        self._direct: Tensor | None = None

    def capture(self, k: int, x: Tensor) -> None:
        """Tracked layer ``k``'s input ``x`` in the pass: its statistics, and its samples' share of ``P``."""
        self.trace.capture_statistics(k, x, None, self.seen)
        if not self.wants_direct:
            return
        start = 2 * sum(self.trace.channels[:k])
        channels = self.trace.channels[k]
        w = self.w[start : start + 2 * channels]
        share = statistics_weight_gradient(x.detach(), w[:channels], w[channels:])
        self._direct = share if self._direct is None else self._direct + share

    def objective(self) -> Tensor | None:
        """``coefficient * <w, S>`` over the statistics the pass captured (raises if a tracked layer did not run)."""
        if not self.seen:
            self.trace.stacked_statistics(self.seen, self.w)  # raises: no tracked layer ran
            return None
        stats = self.trace.stacked_statistics(self.seen, next(iter(self.seen.values())))
        coefficient = self.coefficient.to(stats.dtype) if isinstance(self.coefficient, Tensor) else self.coefficient
        return (stats * self.w.to(stats.dtype)).sum() * coefficient

    def direct(self) -> Tensor:
        """Each sample's own rows' share of ``dP/domega``, float64 ``[b]``."""
        assert self._direct is not None
        return self._direct


def statistics_weight_gradient(x: Tensor, w_mean: Tensor, w_var: Tensor) -> Tensor:
    """``d/domega_z <w_mean, mean> + <w_var, unbiased variance>`` of :func:`weighted_moments` at unit
    weights, through the sample's own rows (``x`` held fixed), for every sample ``z`` of a batch-norm
    input ``x [N, C, *]``: float64 ``[N]``, in closed form. With ``xbar_z`` the sample's mean over the
    other dimensions, ``d_z`` its mean squared deviation from the batch mean ``m``, ``v`` the biased
    variance and ``s_z = xbar_z - m``: ``dm/domega_z = s_z / N``, and the running variance's
    ``without * ((d_z - v) / N + s_z^2 / (N (N - 1))) - v (without - full) (N - 1) / N`` (``full``,
    ``without``: the unbiased factors ``n / (n - 1)`` with all ``N`` samples and with ``N - 1``).
    Computed in ``x``'s dtype (float32 at least): its rounding stays far below a float32 product's
    finite-difference error."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    rows, per = x.shape[0], (x[0, 0].numel() if x.dim() > 1 else 1)
    spatial = list(range(2, x.dim()))
    mean = x.mean(dim=[0, *spatial])
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - mean.view(shape)
    s = centred.mean(dim=spatial) if spatial else centred  # [N, C]
    d = centred.square().mean(dim=spatial) if spatial else centred.square()  # [N, C]
    v = d.mean(dim=0)  # [C], the biased variance
    full, without = rows * per / (rows * per - 1.0), (rows - 1) * per / ((rows - 1) * per - 1.0)
    by_mean = s / rows
    by_var = without * ((d - v) / rows + s.square() / (rows * (rows - 1))) - v * (without - full) * (rows - 1) / rows
    return (by_mean @ w_mean.to(x.dtype) + by_var @ w_var.to(x.dtype)).to(torch.float64)


def sub_batch_statistics(
    stats_fn: Any, params: Mapping[str, Tensor], batch: Any, remove: RemoveFn, size: int, *, vectorize: bool = True
) -> Tensor:
    """``S(theta; B \\ z)`` for every ``z`` of a batch of ``size``: ``[b, R]`` (one ``vmap`` over the
    removal index, or one forward per sample where the model cannot be vmapped)."""
    with torch.no_grad():
        if vectorize:
            try:
                device = next(iter(params.values())).device
                index = torch.arange(size, device=device)
                return torch.func.vmap(lambda i: stats_fn(params, remove(batch, i))[1])(index)
            except (RuntimeError, NotImplementedError, TypeError, IndexError):
                pass
        return torch.stack([stats_fn(params, remove(batch, z))[1] for z in range(size)])
