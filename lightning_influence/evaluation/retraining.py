"""Ground truth: trajectory-specific leave-out retraining for plain SGD.

The reference every estimator is judged against (see the sign convention in
:mod:`lightning_influence.scores`): retrain from the same initial parameters with the same
sequence of batches and learning rates, but with some samples taken out of every batch that
contained them. Such a batch then averages its loss over the remaining samples, the learning
rate is unchanged, and a batch left empty does not move the parameters.

Many removal sets are retrained at once, in lockstep: the parameters of K runs are stacked
along a leading dimension and each step is one ``torch.func.vmap`` of ``torch.func.grad`` of
the sample-weighted batch loss, with per-run sample weights ``w[K, b]`` (0 for a removed
sample). Only plain SGD is modelled: ``theta <- theta - lr_group * grad`` with one learning
rate per optimizer parameter group and step, no momentum, no weight decay.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.kernels import (
    PerSampleLossFn,
    evaluation_mode,
    has_mode_dependent_layers,
    module_mode,
    per_sample_loss_function,
)

__all__ = ["SGDStep", "leave_one_out", "optimizer_lrs", "retrain", "sgd_param_groups", "target_loss"]


@dataclass(frozen=True)
class SGDStep:
    """One plain-SGD step: the exact ``batch`` that ``training_step`` saw, and the learning
    rate ``lrs[g]`` that optimizer parameter group ``g`` used at that step."""

    batch: Any
    lrs: tuple[float, ...]


def sgd_param_groups(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names (as in ``module.named_parameters()``) of the parameters of each parameter
    group of ``optimizer``, in group order.

    Raises ``ValueError`` unless ``optimizer`` is plain SGD (``torch.optim.SGD`` with no
    momentum, no weight decay, not maximising), the only optimizer :func:`retrain` reproduces,
    or if a group holds a parameter that is not one of ``module``'s.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"retraining reproduces plain torch.optim.SGD only, got {type(optimizer).__name__}")
    names = {id(p): n for n, p in module.named_parameters()}
    groups: list[list[str]] = []
    for g, group in enumerate(optimizer.param_groups):
        for option in ("momentum", "weight_decay"):
            if float(group.get(option, 0.0)) != 0.0:
                raise ValueError(
                    f"parameter group {g} uses {option}={group[option]}: retraining reproduces plain SGD only "
                    "(momentum=0, weight_decay=0)"
                )
        if group.get("maximize", False):
            raise ValueError(f"parameter group {g} uses maximize=True: retraining reproduces plain SGD (descent) only")
        try:
            groups.append([names[id(p)] for p in group["params"]])
        except KeyError:
            raise ValueError(f"parameter group {g} holds a tensor that is not a parameter of the module") from None
    return groups


def optimizer_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
    """The current learning rate of each parameter group of ``optimizer`` (for :class:`SGDStep`)."""
    return tuple(float(group["lr"]) for group in optimizer.param_groups)


def _trained_names(module: nn.Module, initial_params: Mapping[str, Tensor], param_groups: Sequence[Sequence[str]]) -> list[str]:
    known = dict(module.named_parameters())
    trained: list[str] = []
    seen: set[str] = set()
    for g, group in enumerate(param_groups):
        for name in group:
            if name in seen:
                raise ValueError(f"parameter {name!r} appears in more than one parameter group (again in group {g})")
            if name not in known:
                raise ValueError(f"parameter group {g} names {name!r}, which is not a parameter of the module")
            if name not in initial_params:
                raise ValueError(f"initial_params has no entry for the trained parameter {name!r}")
            if tuple(initial_params[name].shape) != tuple(known[name].shape):
                raise ValueError(
                    f"initial_params[{name!r}] has shape {tuple(initial_params[name].shape)}, the module's parameter "
                    f"has shape {tuple(known[name].shape)}"
                )
            seen.add(name)
            trained.append(name)
    if not trained:
        raise ValueError("param_groups names no parameter: nothing to retrain")
    return trained


def _ids_list(module: nn.Module, batch: Any, step: int) -> list[int]:
    if not hasattr(module, "sample_ids"):
        raise TypeError(f"{type(module).__name__} has no sample_ids(batch): mix in lightning_influence.InfluenceMixin")
    ids = torch.as_tensor(module.sample_ids(batch))
    if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"sample_ids of step {step} must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    return [int(i) for i in ids.tolist()]


def retrain(
    module: nn.Module,
    initial_params: Mapping[str, Tensor],
    steps: Sequence[SGDStep],
    param_groups: Sequence[Sequence[str]],
    removals: Sequence[Collection[int]],
    *,
    chunk_size: int = 128,
) -> dict[str, Tensor]:
    """Final parameters of plain-SGD runs that leave the samples of each removal set out.

    For each removal set ``removals[k]`` (a collection of sample ids, as ``module.sample_ids``
    reports them), every step of ``steps`` is re-run from ``initial_params`` with those samples
    taken out of the batch: the step's loss is the mean per-sample loss
    (``module.per_sample_loss``) over the remaining samples, the learning rates are unchanged,
    and a step whose batch is left empty does not move the parameters. An empty removal set
    reproduces the recorded run.

    ``param_groups[g]`` names the parameters trained with learning rate ``steps[t].lrs[g]``;
    parameters named in no group keep the module's current values (only the trained ones are
    read from ``initial_params``). The module is run in training mode, which must not differ
    from evaluation mode: a module with dropout or batch/instance norm raises ``ValueError``.

    Returns ``{name: Tensor[K, *shape]}`` for the trained parameters, ``K = len(removals)``,
    in the dtype and on the device of ``initial_params``. The K runs are vectorised with
    ``torch.func.vmap``, ``chunk_size`` runs at a time (memory grows linearly with it).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if has_mode_dependent_layers(module):
        raise ValueError(
            f"{type(module).__name__} has dropout or batch/instance-norm layers: retraining must be deterministic and "
            "reproduce the training forward pass exactly, which such layers prevent"
        )
    trained = _trained_names(module, initial_params, param_groups)
    n_groups = len(param_groups)
    group_of = {name: g for g, group in enumerate(param_groups) for name in group}
    for t, step in enumerate(steps):
        if len(step.lrs) != n_groups:
            raise ValueError(f"step {t} has {len(step.lrs)} learning rates for {n_groups} parameter groups")
        if not all(math.isfinite(float(lr)) for lr in step.lrs):
            raise ValueError(f"step {t} has a non-finite learning rate: {step.lrs}")

    removal_sets = [frozenset(int(i) for i in r) for r in removals]
    step_ids = [_ids_list(module, step.batch, t) for t, step in enumerate(steps)]
    seen_ids = {i for ids in step_ids for i in ids}
    unseen = sorted({i for r in removal_sets for i in r} - seen_ids)
    if unseen:
        shown = ", ".join(map(str, unseen[:10])) + (", ..." if len(unseen) > 10 else "")
        warnings.warn(
            f"{len(unseen)} removed sample id(s) occur in no batch of the trajectory ({shown}); removing them changes "
            "nothing. Check that the ids match module.sample_ids(batch).",
            stacklevel=2,
        )

    first = initial_params[trained[0]]
    dtype, device = first.dtype, first.device
    loss_fn = per_sample_loss_function(module)
    chunks: list[dict[str, Tensor]] = []
    with module_mode(module, training=True), torch.no_grad():
        for start in range(0, len(removal_sets), chunk_size):
            chunk = removal_sets[start : start + chunk_size]
            chunks.append(
                _retrain_chunk(loss_fn, initial_params, trained, group_of, steps, step_ids, chunk, dtype, device)
            )
    if not chunks:
        return {n: initial_params[n].detach().new_empty((0, *initial_params[n].shape)) for n in trained}
    return {n: torch.cat([c[n] for c in chunks]) for n in trained}


def _retrain_chunk(
    loss_fn: PerSampleLossFn,
    initial_params: Mapping[str, Tensor],
    trained: list[str],
    group_of: dict[str, int],
    steps: Sequence[SGDStep],
    step_ids: list[list[int]],
    chunk: list[frozenset[int]],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    k = len(chunk)
    theta = {n: initial_params[n].detach().to(device).unsqueeze(0).repeat(k, *([1] * initial_params[n].ndim)) for n in trained}
    # inverted index: sample id -> runs of this chunk that remove it
    runs_removing: dict[int, list[int]] = {}
    for run, removed in enumerate(chunk):
        for i in removed:
            runs_removing.setdefault(i, []).append(run)

    for t, (step, ids) in enumerate(zip(steps, step_ids, strict=True)):
        weights = torch.ones(k, len(ids), dtype=dtype, device=device)
        for pos, i in enumerate(ids):
            runs = runs_removing.get(i)
            if runs is not None:
                weights[runs, pos] = 0.0
        batch = step.batch

        def weighted_loss(params: dict[str, Tensor], w: Tensor, batch: Any = batch, t: int = t) -> Tensor:
            losses = loss_fn(params, batch)
            if losses.shape != w.shape:
                raise ValueError(
                    f"per_sample_loss returned shape {tuple(losses.shape)} at step {t}, but sample_ids reports "
                    f"{w.shape[0]} samples: it must return one loss per sample"
                )
            total = w.sum()
            # an empty batch: loss 0 (gradient 0), the step does not move the parameters
            return (w * losses).sum() / torch.where(total > 0, total, torch.ones_like(total))

        grads = torch.func.vmap(torch.func.grad(weighted_loss), in_dims=(0, 0))(theta, weights)
        for n in trained:
            lr = float(step.lrs[group_of[n]])
            theta[n] = theta[n] - lr * grads[n].to(dtype)
    return theta


def _stacked(module: nn.Module, params: Mapping[str, Tensor]) -> bool:
    known = dict(module.named_parameters())
    unknown = [n for n in params if n not in known]
    if unknown:
        raise ValueError(f"params names {unknown[:5]}, which are not parameters of the module")
    if not params:
        raise ValueError("params is empty")
    kinds = set()
    for n, p in params.items():
        if tuple(p.shape) == tuple(known[n].shape):
            kinds.add(False)
        elif tuple(p.shape[1:]) == tuple(known[n].shape):
            kinds.add(True)
        else:
            raise ValueError(f"params[{n!r}] has shape {tuple(p.shape)}; the parameter has shape {tuple(known[n].shape)}")
    if len(kinds) != 1:
        raise ValueError("params mixes stacked [K, ...] and unstacked tensors")
    stacked = kinds.pop()
    if stacked and len({p.shape[0] for p in params.values()}) != 1:
        raise ValueError("stacked params disagree on the leading dimension K")
    return stacked


def target_loss(
    module: nn.Module, params: Mapping[str, Tensor], target_batches: Iterable[Any], *, chunk_size: int = 128
) -> Tensor:
    """The target ``F(theta)``: mean per-sample loss (``module.per_sample_loss``) over all
    samples of all ``target_batches`` (each sample weighs the same, whatever its batch size),
    with the module in evaluation mode and the parameters in ``params`` swapped in (the
    others keep the module's values).

    ``params`` is either stacked, ``{name: Tensor[K, *shape]}`` (as :func:`retrain` returns),
    giving a float64 ``Tensor[K]`` (vmapped over K, ``chunk_size`` runs at a time), or
    unstacked, ``{name: Tensor[*shape]}``, giving a float64 0-d tensor. Units: the loss's.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    stacked = _stacked(module, params)
    loss_fn = per_sample_loss_function(module)
    batches = list(target_batches)
    params = {n: p.detach() for n, p in params.items()}
    k = next(iter(params.values())).shape[0] if stacked else 1
    totals = torch.zeros(k, dtype=torch.float64)
    count = 0
    with evaluation_mode(module), torch.no_grad():
        for batch in batches:
            if stacked:
                parts = []
                for start in range(0, k, chunk_size):
                    chunk = {n: p[start : start + chunk_size] for n, p in params.items()}
                    parts.append(torch.func.vmap(lambda p, b=batch: loss_fn(p, b))(chunk))
                losses = torch.cat(parts)
            else:
                losses = loss_fn(params, batch).unsqueeze(0)
            if losses.ndim != 2:
                raise ValueError(f"per_sample_loss must return a 1-D Tensor[B], got {losses.ndim - 1} dimensions")
            totals += losses.double().sum(dim=1).cpu()
            count += losses.shape[1]
    if count == 0:
        raise ValueError("target_batches hold no samples: the target loss is undefined")
    result = totals / count
    return result if stacked else result[0]


def leave_one_out(
    module: nn.Module,
    initial_params: Mapping[str, Tensor],
    steps: Sequence[SGDStep],
    param_groups: Sequence[Sequence[str]],
    sample_ids: Sequence[int] | Tensor,
    target_batches: Iterable[Any],
    *,
    chunk_size: int = 128,
) -> Tensor:
    """Exact trajectory-specific leave-one-out influence of each sample in ``sample_ids``.

    ``I(z) = F(theta_T^{-z}) - F(theta_T)`` with ``F`` = :func:`target_loss` on
    ``target_batches`` (iterated once and kept in memory), ``theta_T^{-z}`` = :func:`retrain`
    with ``z`` removed from every batch, and ``theta_T`` the baseline run (nothing removed),
    retrained by the same engine. Units: the target loss's. Sign: positive means removing
    ``z`` raises the target loss (``z`` helps); negative means ``z`` hurts.

    Returns a float64 ``Tensor[len(sample_ids)]`` on the CPU. Cost: ``len(sample_ids) + 1``
    retraining runs, vectorised ``chunk_size`` at a time.
    """
    ids = [int(i) for i in (sample_ids.reshape(-1).tolist() if isinstance(sample_ids, Tensor) else sample_ids)]
    batches = list(target_batches)
    removals: list[tuple[int, ...]] = [(), *((i,) for i in ids)]
    losses: list[Tensor] = []
    for start in range(0, len(removals), chunk_size):
        final = retrain(module, initial_params, steps, param_groups, removals[start : start + chunk_size], chunk_size=chunk_size)
        losses.append(target_loss(module, final, batches, chunk_size=chunk_size))
    f = torch.cat(losses)
    return f[1:] - f[0]
