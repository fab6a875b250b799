"""Ground truth: trajectory-specific leave-out retraining of what a Lightning run really did.

The reference every estimator is judged against (see the sign convention in
:mod:`lightning_influence.scores`): retrain from the same initial parameters with the same
sequence of optimizer steps -- the same micro-batches, learning rates, optimizer, gradient
clipping and gradient-accumulation normaliser -- but with some samples taken out of every
micro-batch that contained them. Influence ``I(z) = F(theta_T^{-z}) - F(theta_T)``
(:func:`leave_one_out`) is in the units of the target loss ``F`` (:func:`target_loss`);
positive means removing ``z`` raises the target loss (``z`` helps), negative that it hurts.

What one step models (Lightning's automatic optimization, one optimizer): the step's
gradient is ``sum_k mean_loss_k / normalizer`` over its micro-batches ``k`` (Lightning divides
each micro-batch's loss by ``trainer.accumulate_grad_batches``, also for a shorter last
accumulation at the end of an epoch), where ``mean_loss_k`` is the mean per-sample loss
(``module.per_sample_loss``) over the micro-batch's *remaining* samples; a micro-batch left
empty contributes zero (the step still runs: with momentum, weight decay or adaptive moments
the parameters still move). The gradient is then clipped like ``torch.nn.utils.clip_grad_norm_``
(the norm over all trained parameters of the run) or ``clip_grad_value_``, and handed to a
*real* ``torch.optim`` optimizer of the recorded class and hyperparameters, with each
group's learning rate set to the recorded one. The optimizer is not re-implemented: this is
an independent reference for code that reasons about updates (momentum, Adam moments, ...).
Not modelled: mixed-precision arithmetic (retrain in float64; steps that the GradScaler
skipped are simply not recorded), stochastic layers (refused), forwards that write module state
other than normalisation statistics, such as spectral normalisation's power iteration (each run
would need its own; refused), ``nn.SyncBatchNorm`` (statistics over several processes; refused), parts of
the model that read parameters outside ``torch.func.functional_call`` such as activation
checkpointing (refused, after a gradient check on the first step), custom clipping
(``configure_gradient_clipping``) or other changes made to the gradients in hooks, and
hyperparameters other than the learning rate changing during training (:class:`~lightning_influence.evaluation.StepRecorder` refuses them).

Coupled batch losses (a module with ``coupled_batch_loss = True``, e.g. contrastive InfoNCE with
in-batch negatives, where each sample's loss depends on the others of its batch): removing samples
from a micro-batch means evaluating ``per_sample_loss`` on the *sub-batch* without them
(``module.remove_from_batch``, applied once per removed sample), so they are also gone from the
other samples' losses; masking their terms out of the full batch's losses would be wrong. Runs
whose sub-batches differ cannot share one vectorised evaluation: at each micro-batch the runs are
grouped by the positions they remove there (for leave-one-out: the runs removing nothing share one
``vmap``; each run removing a sample of this micro-batch is its own group).

Batch norm (``nn.BatchNorm1d/2d/3d``, also with ``affine=False``, ``momentum=None`` or
``track_running_stats=False``) and instance norm with running statistics are replayed as training ran
them: each micro-batch is normalised with its own batch statistics, so a run without ``z`` evaluates
the sub-batch without ``z`` (such models are retrained as coupled, whatever ``coupled_batch_loss``
says), and every run keeps its own running statistics (``running_mean``, ``running_var``,
``num_batches_tracked``, stacked ``[K, *shape]`` and passed to ``functional_call``, whose
training-mode forward updates them in place from that run's sub-batches and parameters), which the
eval-mode target loss of that run then normalises with. ``momentum=None`` (the cumulative average, whose
factor ``1 / num_batches_tracked`` torch reads as a Python number, which ``vmap`` refuses) is vectorised
too: the factor is computed outside ``vmap``, for each group of runs with equal counts (runs differ only
after one of them emptied a micro-batch). A removal that leaves a micro-batch with one
sample, which batch norm cannot normalise, is refused naming the step and the samples. The sub-batches
come from ``module.remove_from_batch``, checked first (for a model coupled by its batch statistics
alone) to take out just the sample: in evaluation mode each sample's loss is its own, so the losses of
``remove_from_batch(batch, i)`` must be the full batch's without position ``i`` (the default drops row
``i`` of every tensor with ``B`` rows, also of a class-weight vector that happens to have ``B``
entries: refused, naming that tensor). A layer that training ran in evaluation mode at a step (a
frozen backbone's batch norm: :attr:`TrainingStep.eval_layers`) is replayed so at that step: running
statistics used, not updated.

Many removal sets are retrained at once, in lockstep: the parameters of K runs are stacked
along a leading dimension ``[K, *shape]``, per-run gradients are one ``torch.func.vmap`` of
``torch.func.grad`` of the sample-weighted micro-batch loss (per-run weights ``w[K, b]``, 0 for
a removed sample), and ONE optimizer instance steps the stacked tensors. That is exactly K
independent runs only for optimizers whose update is elementwise per coordinate (the state
and the update of a coordinate depend on that coordinate's history and on the step count
alone): :data:`RETRAINABLE_OPTIMIZERS`. Anything else (LBFGS, optimizers with per-tensor norms
or factored statistics such as Adafactor, subclasses that may change the update) is refused.

Where ``vmap`` (or ``torch.func`` at all) cannot evaluate the model -- an operation without a
batching rule such as ``nn.GRU``, or ``pack_padded_sequence`` into an RNN -- the gradients are
computed one run at a time by plain autograd over ``functional_call`` (the same values, slower); an
error that the run-by-run evaluation raises too is the model's own and is raised with its own message.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.batch_norm import (
    NORMALISATION_LAYERS,
    batch_statistics_layers,
    fixed_statistics,
    removal_gap,
    running_statistics,
    sync_batch_norm_layers,
)
from lightning_influence.batches import BatchRemoval, check_batch_removal, map_tensors, tensors
from lightning_influence.evaluation._checks import _shown, as_ids
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.optimizers import torch_optimizer
from lightning_influence.kernels import (
    PerSampleLossFn,
    RemoveFn,
    check_functional_gradient,
    evaluation_mode,
    is_mode_dependent,
    spectral_norm_layers,
    module_mode,
    per_sample_loss_function,
)

__all__ = [
    "RETRAINABLE_OPTIMIZERS",
    "OptimizerSpec",
    "TrainingStep",
    "hyperparameter_changes",
    "leave_one_out",
    "optimizer_lrs",
    "retrain",
    "target_loss",
]

RETRAINABLE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)
"""Optimizers (exact classes, not subclasses) whose single-tensor update is elementwise per
coordinate, so that one instance over parameters stacked ``[K, *shape]`` is K independent runs."""

# Implementation switches, not part of the update rule: the retraining copies force them off
# (the single-tensor code path, exact on stacked tensors, no graph through the step).
_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")
_CLIP_ALGORITHMS = ("norm", "value")


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a Lightning ``LightningOptimizer`` (or ``optimizer`` itself)."""
    return torch_optimizer(optimizer, "the retraining")


def _check_supported(optimizer_class: type) -> None:
    if optimizer_class not in RETRAINABLE_OPTIMIZERS:
        names = ", ".join(c.__name__ for c in RETRAINABLE_OPTIMIZERS)
        raise ValueError(
            f"retraining cannot reproduce {getattr(optimizer_class, '__qualname__', optimizer_class)!s}: it runs one real "
            f"optimizer on parameters stacked over runs, which is exact only for optimizers whose update is elementwise per "
            f"coordinate, and supports exactly torch.optim.{{{names}}} (not subclasses)"
        )


def _plain(value: Any) -> Any:
    """0-d tensors as Python numbers (also inside tuples/lists), so that hyperparameters compare and copy plainly."""
    if isinstance(value, Tensor) and value.ndim == 0:
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def optimizer_lrs(optimizer: Any) -> tuple[float, ...]:
    """The current learning rate of each parameter group of ``optimizer`` (a torch optimizer or
    a ``LightningOptimizer``), for :attr:`TrainingStep.lrs`."""
    return tuple(float(group["lr"]) for group in _unwrap(optimizer).param_groups)


@dataclass(frozen=True)
class TrainingStep:
    """One optimizer step as Lightning ran it.

    ``batches``: the micro-batches of the step, exactly as ``training_step`` saw them (one
    unless gradients are accumulated). ``lrs[g]``: the learning rate of optimizer parameter
    group ``g`` at this step. ``normalizer``: what each micro-batch's mean loss was divided by
    (Lightning: ``trainer.accumulate_grad_batches``, also for a shorter last accumulation of an
    epoch); the step's gradient is ``sum_k grad mean_loss_k / normalizer``.
    """

    batches: tuple[Any, ...]
    lrs: tuple[float, ...]
    normalizer: int = 1
    varying: Mapping[str, Tensor] = field(default_factory=dict)
    """Values this step trained with of the module's tensors that training changed outside the
    optimizer (buffers or untrained parameters, by full name, e.g. an annealed temperature): the
    retraining evaluates the step with them instead of the module's current values."""
    eval_layers: frozenset[str] = frozenset()
    """Names (as in ``module.named_modules()``) of the batch-statistics layers (batch norm, instance norm
    with running statistics) that were in evaluation mode at this step, such as a frozen backbone's:
    the retraining runs the step with them in evaluation mode too, normalising with each run's running
    statistics and leaving them unchanged, as torch does."""

    def __post_init__(self) -> None:
        if not isinstance(self.batches, (tuple, list)):
            raise TypeError(
                f"TrainingStep.batches must be a tuple of micro-batches, got {type(self.batches).__name__} "
                "(wrap a single batch: batches=(batch,))"
            )
        if not self.batches:
            raise ValueError("a TrainingStep needs at least one micro-batch")
        object.__setattr__(self, "batches", tuple(self.batches))
        object.__setattr__(self, "lrs", tuple(float(lr) for lr in self.lrs))
        if isinstance(self.normalizer, bool) or int(self.normalizer) != self.normalizer or self.normalizer < 1:
            raise ValueError(f"TrainingStep.normalizer must be an integer >= 1, got {self.normalizer!r}")
        object.__setattr__(self, "normalizer", int(self.normalizer))
        if not isinstance(self.varying, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in self.varying.items()):
            raise TypeError("TrainingStep.varying must map full names of module tensors (str) to Tensors")
        if isinstance(self.eval_layers, str) or not all(isinstance(n, str) for n in self.eval_layers):
            raise TypeError("TrainingStep.eval_layers must be a collection of submodule names (str)")
        if not isinstance(self.eval_layers, frozenset):
            object.__setattr__(self, "eval_layers", frozenset(self.eval_layers))


@dataclass(frozen=True)
class OptimizerSpec:
    """The update rule of a run: the optimizer class and its parameter groups, and the
    gradient clipping applied before each step.

    ``param_groups[g]``: the names (as in ``module.named_parameters()``) of group ``g``'s
    parameters; ``hyperparameters[g]``: that group's options (the optimizer's ``defaults``
    keys, without ``'params'``). Its ``'lr'`` is the learning rate when the spec was taken and
    is replaced at every step by :attr:`TrainingStep.lrs`; ``foreach``/``fused``/``capturable``
    /``differentiable`` are forced off in the retraining copies. ``clip_val``: ``None`` (no
    clipping) or the positive threshold of ``clip_algorithm``, ``'norm'`` (the 2-norm of the
    whole gradient, as ``torch.nn.utils.clip_grad_norm_``) or ``'value'`` (each coordinate
    clamped to ``[-clip_val, clip_val]``).
    """

    optimizer_class: type[torch.optim.Optimizer]
    param_groups: tuple[tuple[str, ...], ...]
    hyperparameters: tuple[dict[str, Any], ...]
    clip_val: float | None = None
    clip_algorithm: str = "norm"
    trained: tuple[str, ...] | None = None
    """The names of the parameters the run trained (in a group and requiring a gradient when training
    started): the retraining trains exactly these, whatever ``requires_grad`` says later (a model frozen
    after fit, ``LightningModule.freeze()``). ``None`` (a hand-built spec): the group members that
    require a gradient when :func:`retrain` is called."""

    def __post_init__(self) -> None:
        _check_supported(self.optimizer_class)
        groups = tuple(tuple(str(n) for n in group) for group in self.param_groups)
        hypers = tuple({k: _plain(v) for k, v in dict(h).items()} for h in self.hyperparameters)
        if not groups:
            raise ValueError("an OptimizerSpec needs at least one parameter group")
        if len(hypers) != len(groups):
            raise ValueError(f"{len(groups)} parameter groups but {len(hypers)} hyperparameter dicts")
        known = set(self.optimizer_class([torch.zeros(1)]).defaults)
        seen: set[str] = set()
        for g, (names, hyper) in enumerate(zip(groups, hypers, strict=True)):
            unknown = sorted(set(hyper) - known)
            if unknown:
                raise ValueError(f"parameter group {g} has options {unknown} that {self.optimizer_class.__name__} does not take")
            for name in names:
                if name in seen:
                    raise ValueError(f"parameter {name!r} appears in more than one parameter group (again in group {g})")
                seen.add(name)
        clip_val = None if self.clip_val is None else float(self.clip_val)
        if clip_val is not None and not (math.isfinite(clip_val) and clip_val > 0):
            raise ValueError(f"clip_val must be None or a finite positive number, got {self.clip_val!r}")
        algorithm = str(getattr(self.clip_algorithm, "value", self.clip_algorithm)).lower()
        if algorithm not in _CLIP_ALGORITHMS:
            raise ValueError(f"clip_algorithm must be 'norm' or 'value', got {self.clip_algorithm!r}")
        if self.trained is not None:
            trained = tuple(str(n) for n in self.trained)
            outside = [n for n in trained if n not in seen]
            if outside:
                raise ValueError(f"OptimizerSpec.trained names {outside[:4]}, which are in no parameter group")
            object.__setattr__(self, "trained", trained)
        object.__setattr__(self, "param_groups", groups)
        object.__setattr__(self, "hyperparameters", hypers)
        object.__setattr__(self, "clip_val", clip_val)
        object.__setattr__(self, "clip_algorithm", algorithm)

    @classmethod
    def from_optimizer(
        cls,
        module: nn.Module,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = "norm",
    ) -> OptimizerSpec:
        """The spec of ``optimizer`` (a torch optimizer or Lightning's ``LightningOptimizer``
        wrapper) over ``module``'s parameters, with Lightning's clipping settings
        (``trainer.gradient_clip_val`` / ``trainer.gradient_clip_algorithm``: a value ``None``
        or ``<= 0`` means no clipping, an algorithm ``None`` means ``'norm'``, as in Lightning).

        :attr:`trained` records the group members that require a gradient now (take the spec when
        training starts: :class:`~lightning_influence.evaluation.StepRecorder` does, at the first batch).

        Raises ``ValueError`` for an optimizer that :func:`retrain` cannot reproduce (see
        :data:`RETRAINABLE_OPTIMIZERS`), or a group holding a tensor that is not one of
        ``module``'s parameters.
        """
        optimizer = _unwrap(optimizer)
        _check_supported(type(optimizer))
        names = {id(p): n for n, p in module.named_parameters()}
        groups: list[tuple[str, ...]] = []
        hypers: list[dict[str, Any]] = []
        for g, group in enumerate(optimizer.param_groups):
            try:
                groups.append(tuple(names[id(p)] for p in group["params"]))
            except KeyError:
                raise ValueError(f"parameter group {g} holds a tensor that is not a parameter of the module") from None
            hypers.append(_group_hyperparameters(optimizer, group))
        clip = None if gradient_clip_val is None or float(gradient_clip_val) <= 0 else float(gradient_clip_val)
        algorithm = "norm" if gradient_clip_algorithm is None else gradient_clip_algorithm
        trained = tuple(names[id(p)] for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
        return cls(type(optimizer), tuple(groups), tuple(hypers), clip, algorithm, trained)


def _group_hyperparameters(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> dict[str, Any]:
    # only the optimizer's own options: schedulers add keys such as 'initial_lr' or 'max_lr'
    options = {k: _plain(group[k]) for k in optimizer.defaults if k != "params" and k in group}
    if isinstance(optimizer, torch.optim.Adagrad):
        # torch fills every parameter's accumulator from the constructor's value, whatever a group says
        options["initial_accumulator_value"] = _plain(optimizer.defaults["initial_accumulator_value"])
    return options


def _fresh_optimizer(spec: OptimizerSpec, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``spec``'s optimizer over ``param_groups`` in the state a fresh one starts in: Adagrad's
    accumulators filled with each group's ``initial_accumulator_value`` (its constructor reads
    only its own argument, 0 when the options come in the groups)."""
    optimizer = spec.optimizer_class(param_groups)
    if isinstance(optimizer, torch.optim.Adagrad):
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state[p]["sum"].fill_(float(group.get("initial_accumulator_value", 0.0)))
    return optimizer


def hyperparameter_changes(spec: OptimizerSpec, optimizer: Any) -> list[str]:
    """How ``optimizer``'s current options differ from ``spec`` in anything but the learning
    rate and the implementation switches (e.g. a scheduler that cycles momentum or betas, which
    :class:`TrainingStep` does not record); empty when only learning rates changed."""
    optimizer = _unwrap(optimizer)
    if len(optimizer.param_groups) != len(spec.param_groups):
        return [f"{len(optimizer.param_groups)} parameter groups instead of {len(spec.param_groups)}"]
    changes = []
    for g, (group, recorded) in enumerate(zip(optimizer.param_groups, spec.hyperparameters, strict=True)):
        current = _group_hyperparameters(optimizer, group)
        for key in sorted(set(current) | set(recorded)):
            if key == "lr" or key in _IMPLEMENTATION_FLAGS:
                continue
            if current.get(key) != recorded.get(key):
                changes.append(f"group {g} {key}: {recorded.get(key)!r} -> {current.get(key)!r}")
    return changes


def _trained_groups(module: nn.Module, initial_params: Mapping[str, Tensor], spec: OptimizerSpec) -> list[list[str]]:
    """Per group, the names of the parameters that are trained: those ``spec.trained`` records, or
    (a spec without that record) the group members requiring a gradient now (a frozen parameter gets
    no gradient, so the optimizer skips it)."""
    known = dict(module.named_parameters())
    recorded = None if spec.trained is None else set(spec.trained)
    groups: list[list[str]] = []
    for g, group in enumerate(spec.param_groups):
        trained = []
        for name in group:
            if name not in known:
                raise ValueError(f"parameter group {g} names {name!r}, which is not a parameter of the module")
            if not (known[name].requires_grad if recorded is None else name in recorded):
                continue
            if name not in initial_params:
                raise ValueError(f"initial_params has no entry for the trained parameter {name!r}")
            if tuple(initial_params[name].shape) != tuple(known[name].shape):
                raise ValueError(
                    f"initial_params[{name!r}] has shape {tuple(initial_params[name].shape)}, the module's parameter "
                    f"has shape {tuple(known[name].shape)}"
                )
            trained.append(name)
        groups.append(trained)
    if not any(groups):
        raise ValueError(
            "the optimizer's parameter groups hold no parameter that "
            + ("requires a gradient" if recorded is None else "OptimizerSpec.trained records as trained")
            + ": nothing to retrain"
        )
    return groups


def _ids_list(module: nn.Module, batch: Any, step: int, micro: int) -> list[int]:
    if not hasattr(module, "sample_ids"):
        raise TypeError(f"{type(module).__name__} has no sample_ids(batch): mix in lightning_influence.InfluenceMixin")
    ids = torch.as_tensor(module.sample_ids(batch))
    if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"sample_ids of step {step} (micro-batch {micro}) must be a 1-D integer tensor, got {ids.dtype} of shape "
            f"{tuple(ids.shape)}"
        )
    return [int(i) for i in ids.tolist()]


def _recorded_step_ids(module: nn.Module, steps: Sequence[TrainingStep]) -> list[list[list[int]]]:
    """The sample ids of every micro-batch of every recorded step (``[step][micro-batch][sample]``)."""
    for t, step in enumerate(steps):
        if not isinstance(step, TrainingStep):
            raise TypeError(f"step {t} is a {type(step).__name__}, not a TrainingStep")
    return [[_ids_list(module, b, t, m) for m, b in enumerate(step.batches)] for t, step in enumerate(steps)]


def _unrecorded(ids: Iterable[int], step_ids: list[list[list[int]]]) -> list[int]:
    """The ``ids`` that no recorded step holds, sorted."""
    seen = {i for step in step_ids for micro in step for i in micro}
    return sorted(set(ids) - seen)


def _unrecorded_message(unseen: list[int], step_ids: list[list[list[int]]]) -> str:
    """What is wrong with ``unseen`` ids, with the ids the recorded steps do hold."""
    seen = sorted({i for step in step_ids for micro in step for i in micro})
    shown = ", ".join(map(str, unseen[:10])) + (", ..." if len(unseen) > 10 else "")
    if not seen:
        held = "the recorded steps hold no sample at all (was anything recorded?)"
    elif len(seen) == seen[-1] - seen[0] + 1:
        held = f"the {len(step_ids)} recorded steps hold the sample ids {seen[0]}..{seen[-1]}"
    else:
        held = f"the {len(step_ids)} recorded steps hold {len(seen)} distinct sample ids between {seen[0]} and {seen[-1]}"
    return (
        f"{len(unseen)} removed sample id(s) occur in no recorded step ({shown}): {held}. Check that the ids are the "
        "ones module.sample_ids(batch) reports (positions in the training set, as IndexedDataset gives: 0-based, "
        "of this training set rather than a larger one) and that the StepRecorder watched the whole fit"
    )


def recorded_ids(module: nn.Module, steps: Sequence[TrainingStep]) -> Tensor:
    """The distinct sample ids of the recorded ``steps``, ascending: the samples whose removal
    retraining along these steps can measure."""
    return torch.tensor(sorted({i for step in _recorded_step_ids(module, steps) for micro in step for i in micro}), dtype=torch.long)


def check_recorded_ids(module: nn.Module, steps: Sequence[TrainingStep], ids: Iterable[int]) -> None:
    """Refuse removed sample ``ids`` that no recorded step holds (``ValueError`` naming them and the ids
    the steps hold): removing a sample that was never trained on changes nothing, so such an id is
    almost always a wrong one (an offset, another numbering), whose ground truth would read 0. The
    check of :func:`leave_one_out` and :func:`~lightning_influence.evaluation.subset_retraining`;
    :func:`retrain` itself only warns."""
    step_ids = _recorded_step_ids(module, steps)
    unseen = _unrecorded(ids, step_ids)
    if unseen:
        raise ValueError(_unrecorded_message(unseen, step_ids))


def _check_functional_gradient(
    module: nn.Module,
    loss_fn: PerSampleLossFn,
    initial_params: Mapping[str, Tensor],
    trained: list[str],
    step: TrainingStep,
    running: Mapping[str, Tensor] | None = None,
) -> None:
    """Refuse a module that the functional evaluation of the retraining does not reproduce.

    On the first micro-batch of ``step``: the training forward must not write module buffers
    (power iterations, custom running statistics) other than ``running`` (the normalisation layers'
    running statistics, which the retraining keeps per run; given here at their initial values), and the gradient as the retraining computes it
    (``torch.func.grad`` over ``functional_call``, vmapped; plain autograd over ``functional_call``, run
    by run, where torch.func cannot evaluate the model) must equal plain autograd on the module
    holding the same values (:func:`~lightning_influence.kernels.check_functional_gradient`, at a
    point shifted from the initial parameters). Catches what reads parameters outside the
    functional call (activation checkpointing, a module keeping its own reference to a weight).
    Runs in the caller's train mode; leaves the module's parameters and buffers as they were.
    """
    batch = step.batches[0]
    # the module's buffers and the step's held values, as copies: a plain functional forward (no transform,
    # which would refuse the write itself) shows whether the training forward writes them
    running = dict(running or {})
    state = {n: b.detach().clone() for n, b in module.named_buffers() if n not in running}
    state.update({n: v.detach().clone() for n, v in step.varying.items()})
    versions = {n: v._version for n, v in state.items()}
    probe = {n: initial_params[n].detach() for n in trained}
    with warnings.catch_warnings():  # a probe: e.g. reentrant checkpointing warns that nothing requires grad here
        warnings.simplefilter("ignore")
        loss_fn({**state, **{n: v.clone() for n, v in running.items()}, **probe}, batch)
    written = [n for n, v in state.items() if v._version != versions[n]]
    if written:
        shown = _shown(written, 4)
        raise ValueError(
            f"{type(module).__name__}'s training forward writes module buffers ({shown}): each run's values would "
            "depend on its own trajectory, while the retraining evaluates every run with the same (recorded) values, "
            "and its torch.func evaluation cannot write module tensors at all. Make the forward stateless (compute "
            "such values from the parameters at every call, write nothing), or keep that layer out of the "
            "ground-truth run"
        )

    cumulative = _CumulativeAverage(module)

    def functional(point: dict[str, Tensor]) -> dict[str, Tensor]:
        def mean_loss(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            cumulative.start()
            return loss_fn({**state, **buffers, **params}, batch).mean()

        stacked = {n: v.unsqueeze(0) for n, v in point.items()}
        buffers = {n: v.unsqueeze(0).clone() for n, v in running.items()}  # copies: the forward writes them
        ((_, counts),) = cumulative.split([0], buffers)
        with cumulative.replaying(counts):
            grads = _Vectorize().grad(mean_loss, stacked, buffers, writes=buffers.values())
        return {n: v[0] for n, v in grads.items()}

    # the trained parameters require a gradient for plain autograd's side, also on a model frozen after fit
    parameters = dict(module.named_parameters())
    flags = {n: parameters[n].requires_grad for n in trained}
    try:
        for n in trained:
            parameters[n].requires_grad_(True)
        check_functional_gradient(module, functional, probe, batch, held=step.varying, owner="the retraining", random_advice=RANDOM_ADVICE)
    finally:
        for n, flag in flags.items():
            parameters[n].requires_grad_(flag)


RANDOM_FIX = (
    "The ground truth replays the training forward, and evaluates the target loss, with every draw fixed: for the "
    "ground-truth run set dropout to p=0 and leave random terms out (DiffIn itself scores models with dropout)"
)
RANDOM_ADVICE = (
    "in training mode, gave gradients {spread} apart (relative): the training forward draws random numbers (dropout "
    "in any form, added noise, a sampled latent), so no run could be replayed. " + RANDOM_FIX
)


def check_replayable(module: nn.Module) -> None:
    """Refuse a module whose training forward the retraining cannot replay run by run: layers that
    draw random numbers in training (dropout with ``p > 0``, also inside attention and multi-layer
    RNNs), ``nn.SyncBatchNorm`` (statistics over every process's batch) and spectral normalisation
    (its power iteration writes buffers at every forward), each named, with the fix. Batch norm and
    instance norm are replayed (batch statistics of each run's own sub-batches, running statistics
    per run: :func:`retrain`)."""
    layers = [
        name or type(module).__name__
        for name, m in module.named_modules()
        if is_mode_dependent(m) and not isinstance(m, NORMALISATION_LAYERS)
    ]
    if layers:
        shown = _shown(layers, 4)
        raise ValueError(
            f"{type(module).__name__} has layers that draw random numbers in training ({shown}: dropout with p > 0): "
            "the retraining replays the training forward of every run and needs it deterministic. For the "
            "ground-truth run set dropout to p=0 (DiffIn itself scores models with dropout)"
        )
    synced = sync_batch_norm_layers(module)
    if synced:
        raise ValueError(
            f"{type(module).__name__} has nn.SyncBatchNorm layers ({_shown(synced, 4)}): they normalise with statistics "
            "over the batches of every process, which the retraining (one process, the recorded batches) does not "
            "model. Record and retrain the ground-truth run on one device with plain batch norm: build the model "
            "without nn.SyncBatchNorm.convert_sync_batchnorm (or Trainer(sync_batchnorm=False)), devices=1"
        )
    spectral = spectral_norm_layers(module)
    if spectral:
        raise ValueError(
            f"{type(module).__name__} has spectral normalisation ({', '.join(spectral[:4])}; "
            "torch.nn.utils.spectral_norm or parametrizations.spectral_norm): in training mode every forward advances "
            "its power iteration, writing the u/v buffers, so each run's normalisation follows that run's own weights, "
            "which the retraining (one shared set of buffers, the recorded run's) cannot reproduce. For the "
            "ground-truth run normalise statelessly, e.g. by the exact norm W / torch.linalg.matrix_norm(W, ord=2), or "
            "leave spectral normalisation out"
        )


def retrain(
    module: nn.Module,
    initial_params: Mapping[str, Tensor],
    steps: Sequence[TrainingStep],
    optimizer: OptimizerSpec,
    removals: Sequence[Collection[int]],
    *,
    chunk_size: int = 128,
    coupled: bool | None = None,
    batch_removal: BatchRemoval = "reaverage",
) -> dict[str, Tensor]:
    """Final parameters of the recorded run re-run without the samples of each removal set.

    For each removal set ``removals[k]`` (a collection of integer sample ids, as
    ``module.sample_ids`` reports them; a floating-point id raises ``ValueError``, a repeated one
    counts once), every step of ``steps`` is re-run from ``initial_params`` with those samples
    taken out of every micro-batch: a micro-batch's loss is the mean per-sample loss
    (``module.per_sample_loss``) over its remaining samples (zero if none remain), the step's
    gradient is the sum over its micro-batches divided by the step's ``normalizer``, clipped
    per run as ``optimizer`` says, and a fresh real optimizer of ``optimizer.optimizer_class``
    (one per chunk of runs, its state evolving over the steps) applies it with the step's
    learning rates. The learning rates and the step count are unchanged, so with momentum,
    weight decay or adaptive moments a step whose samples were all removed still moves the
    parameters. An empty removal set reproduces the recorded run.

    Trained: the parameters ``optimizer.trained`` records (:class:`~lightning_influence.evaluation.StepRecorder`:
    those that required a gradient when training started, whatever the module's flags say now, so
    freezing the model after fit changes nothing), or for a spec without that record the ones named in
    ``optimizer.param_groups`` that require a gradient; all others keep the module's current values (only the trained ones are read from
    ``initial_params``), except those a step holds at recorded values (``TrainingStep.varying``).
    Those count as given: the retraining does not recompute them (e.g. an EMA teacher of the
    trained weights keeps the recorded run's values). The module is run in training mode, which must be
    deterministic: a module with dropout (``p > 0``) or ``nn.SyncBatchNorm`` raises ``ValueError``, and so does one
    whose training forward writes buffers other than the normalisation layers' running statistics (spectral
    normalisation's power iteration, custom running statistics). Batch norm (and instance norm with running
    statistics) is replayed: see ``coupled`` below, and the running statistics in the result. Before
    retraining, the gradient of the first micro-batch's loss as the retraining computes it (``torch.func``, the
    parameters passed in) is checked against plain autograd on the module holding the same values: a model that
    reads parameters outside the functional call (activation checkpointing, a cached reference to a weight) raises
    ``ValueError`` instead of being retrained wrongly.

    Returns ``{name: Tensor[K, *shape]}`` for the trained parameters, ``K = len(removals)``,
    in the dtype and on the device of ``initial_params``, and for a module with batch norm (or instance
    norm with ``track_running_stats=True``) also each run's final running statistics under their buffer
    names (:func:`~lightning_influence.batch_norm.running_statistics`), whose initial values
    ``initial_params`` must hold too (:class:`~lightning_influence.evaluation.StepRecorder` records
    them): :func:`target_loss` of the result evaluates each run with its own. The K runs are vectorised with
    ``torch.func.vmap``, ``chunk_size`` runs at a time (memory grows linearly with it:
    parameters, gradients and optimizer state per run).

    ``coupled`` (default: ``module.coupled_batch_loss``, and ``True`` for a module with batch norm or
    instance norm with running statistics, for which ``False`` raises ``ValueError``): the micro-batch
    loss of a run is the mean of ``per_sample_loss`` evaluated on the sub-batch without its removed samples
    (``module.remove_from_batch``, also for batch norm models: override it when a batch holds tensors
    that are not per sample), not the full batch's losses with those terms dropped; runs are
    then vectorised per group of runs removing the same positions of a micro-batch. For a model coupled
    by its batch statistics alone, ``remove_from_batch`` is checked first on the first micro-batches:
    in evaluation mode, where each sample's loss is its own, the losses of ``remove_from_batch(batch, i)``
    must be the full batch's without position ``i``; otherwise ``ValueError`` names what differs. Each
    step runs the layers its :attr:`TrainingStep.eval_layers` names in evaluation mode.

    ``batch_removal="drop"``: a micro-batch's loss is the sum of its remaining samples' losses
    divided by its full size ``b`` (the removed terms dropped, the ``1 / b`` kept: the
    counterfactual of SGD-influence, Hara et al., 2019) instead of their mean; not for coupled losses
    nor batch norm.
    """
    check_batch_removal(batch_removal)
    if not isinstance(optimizer, OptimizerSpec):
        raise TypeError(
            f"optimizer must be an OptimizerSpec (OptimizerSpec.from_optimizer(module, optimizer)), got {type(optimizer).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_replayable(module)
    groups = _trained_groups(module, initial_params, optimizer)
    trained = [n for group in groups for n in group]
    n_groups = len(groups)
    for t, step in enumerate(steps):
        if not isinstance(step, TrainingStep):
            raise TypeError(f"step {t} is a {type(step).__name__}, not a TrainingStep")
        if len(step.lrs) != n_groups:
            raise ValueError(f"step {t} has {len(step.lrs)} learning rates for {n_groups} parameter groups")
        if not all(math.isfinite(lr) for lr in step.lrs):
            raise ValueError(f"step {t} has a non-finite learning rate: {step.lrs}")

    if isinstance(removals, (str, bytes)) or not isinstance(removals, Iterable):
        raise ValueError(
            f"removals must be a sequence of removal sets (each a collection of sample ids, () for none), got "
            f"{type(removals).__name__}"
        )
    removal_sets = [frozenset(as_ids(f"removal set {k}", r).tolist()) for k, r in enumerate(removals)]
    step_ids = _recorded_step_ids(module, steps)
    unseen = _unrecorded({i for r in removal_sets for i in r}, step_ids)
    if unseen:
        warnings.warn(f"{_unrecorded_message(unseen, step_ids)}; removing them changes nothing", stacklevel=2)

    normalised = batch_statistics_layers(module)
    if normalised and (coupled is False or batch_removal == "drop"):
        raise ValueError(
            f"{type(module).__name__} has batch-statistics layers ({_shown(normalised, 4)}: batch norm, or instance norm "
            "with running statistics): in training mode a sample's removal changes the statistics the rest of its batch "
            "is normalised with (or records), so a run without it evaluates the sub-batch without it. "
            + ("coupled=False would mask its loss out of the full batch instead; leave coupled at its default"
               if coupled is False else
               "batch_removal='drop' (the removed terms dropped, the 1/b kept) is defined for losses that are a sum of "
               "per-sample terms only; use batch_removal='reaverage'")
        )
    if coupled is None:
        coupled = bool(getattr(module, "coupled_batch_loss", False)) or bool(normalised)
    remove: RemoveFn | None = None
    if coupled and batch_removal == "drop":
        raise ValueError("batch_removal='drop' is defined for losses that are a sum of per-sample terms, not for coupled losses")
    if coupled:
        if not hasattr(module, "remove_from_batch"):
            raise TypeError(f"{type(module).__name__} has no remove_from_batch(batch, index): mix in lightning_influence.InfluenceMixin")
        remove = module.remove_from_batch
    # the default removal (rows of the per-sample tensors) is gathered for many runs at once; an override is called
    default_removal = coupled and getattr(type(module), "remove_from_batch", None) is InfluenceMixin.remove_from_batch
    running = _initial_running_statistics(module, initial_params)
    loss_fn = per_sample_loss_function(module)
    chunks: list[dict[str, Tensor]] = []
    with module_mode(module, training=True), torch.no_grad(), _differentiable_attention():
        if steps and removal_sets:
            with _layers_in_evaluation(module, steps[0].eval_layers):
                _check_functional_gradient(module, loss_fn, initial_params, trained, steps[0], running)
        if remove is not None and normalised and not getattr(module, "coupled_batch_loss", False) and any(removal_sets):
            _check_removal(module, loss_fn, remove, {**running, **{n: initial_params[n].detach() for n in trained}}, steps, step_ids)
        for start in range(0, len(removal_sets), chunk_size):
            chunk = removal_sets[start : start + chunk_size]
            chunks.append(
                _retrain_chunk(
                    module,
                    loss_fn,
                    initial_params,
                    groups,
                    optimizer,
                    steps,
                    step_ids,
                    chunk,
                    coupled,
                    None if default_removal else remove,
                    batch_removal,
                    running,
                )
            )
    names = [*trained, *running]
    start_values = {**{n: initial_params[n].detach() for n in trained}, **running}
    if not chunks:
        return {n: start_values[n].new_empty((0, *start_values[n].shape)) for n in names}
    return {n: torch.cat([c[n] for c in chunks]) for n in names}


def _initial_running_statistics(module: nn.Module, initial_params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The running statistics of ``module``'s normalisation layers at the start of the run (by full
    buffer name, from ``initial_params``), detached; empty for a module without any."""
    names = running_statistics(module)
    missing = [n for n in names if n not in initial_params]
    if missing:
        raise ValueError(
            f"initial_params has no entry for the running statistics {_shown(missing, 4)}: a run with batch norm (or "
            "instance norm with track_running_stats=True) starts from the buffers' values at the start of training as "
            "well as the parameters'. Pass them in initial_params by their buffer names (StepRecorder.initial_params "
            "holds them), e.g. {n: t.clone() for n, t in module.state_dict().items()} taken before fit"
        )
    buffers = dict(module.named_buffers())
    values: dict[str, Tensor] = {}
    for n in names:
        value = initial_params[n].detach()
        if value.shape != buffers[n].shape:
            raise ValueError(
                f"initial_params[{n!r}] has shape {tuple(value.shape)}; the module's buffer has shape {tuple(buffers[n].shape)}"
            )
        values[n] = value
    return values


def _check_removal(
    module: nn.Module,
    loss_fn: PerSampleLossFn,
    remove: RemoveFn,
    point: Mapping[str, Tensor],
    steps: Sequence[TrainingStep],
    step_ids: list[list[list[int]]],
) -> None:
    """Refuse a ``remove_from_batch`` that takes out more than the sample, for a model retrained as
    coupled only because of its batch statistics.

    In evaluation mode batch norm normalises with running statistics (fixed ones for a layer without:
    :func:`~lightning_influence.batch_norm.fixed_statistics`), so every sample's loss is its own: the eval-mode losses of ``remove_from_batch(batch, i)`` must be those of the full batch
    without position ``i`` (to rounding). Checked at the first, middle and last position of the first
    micro-batch of each size among the first steps (at ``point``: the initial parameters and running
    statistics). The default ``remove_from_batch`` drops row ``i`` of every tensor with ``B`` rows,
    also of one that is not per sample but happens to have ``B`` rows (class weights of ``B``
    classes): the message names such a tensor when keeping it whole fixes the losses."""
    sizes: set[int] = set()
    with evaluation_mode(module), fixed_statistics(module):
        for t, (step, micro) in enumerate(zip(steps[:8], step_ids, strict=False)):
            step_loss = _holding(loss_fn, step.varying)
            for m, (batch, ids) in enumerate(zip(step.batches, micro, strict=True)):
                size = len(ids)
                if size < 2 or size in sizes:
                    continue
                sizes.add(size)
                full = step_loss(point, batch)
                for pos in sorted({0, size // 2, size - 1}):
                    sub = _removed(remove, step_loss, point, batch, [pos], size - 1, t, m, ids)
                    gap, tolerance = removal_gap(full, sub, pos)
                    if gap > tolerance:
                        raise ValueError(
                            f"{type(module).__name__} has batch-statistics layers ({_shown(batch_statistics_layers(module), 4)}), "
                            "so it is retrained as coupled: a run without a sample evaluates remove_from_batch(batch, i), "
                            "the batch without it. But remove_from_batch takes out more than the sample: in evaluation "
                            "mode (running statistics: each sample's loss is its own) the losses of "
                            f"remove_from_batch(batch, {pos}) at step {t} (micro-batch {m}) differ from the full batch's "
                            f"losses without position {pos} by up to {gap:.3g}{_shared_rows(module, step_loss, point, batch, pos, torch.cat([full[:pos], full[pos + 1 :]]), tolerance)}. "
                            f"The default remove_from_batch drops row {pos} of every tensor whose first dimension is the "
                            f"batch size ({size}). Override remove_from_batch to drop the sample's rows only, or keep "
                            "tensors that are not per sample (class weights, lookup tables) out of the batch (e.g. as "
                            "module attributes or buffers)"
                        )
            if len(sizes) >= 2:
                return


def _removed(
    remove: RemoveFn,
    loss_fn: PerSampleLossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    positions: Sequence[int],
    remaining: int,
    t: int,
    m: int,
    ids: Sequence[int],
) -> Tensor:
    """The losses of the sub-batch without ``positions`` (``remove_from_batch`` once per position,
    the highest first), with an error inside either call named as one of ``remove_from_batch``'s."""
    try:
        sub = batch
        for pos in sorted(positions, reverse=True):
            sub = remove(sub, pos)
        losses = loss_fn(params, sub)
    except Exception as err:  # noqa: BLE001 - re-raised with what was being evaluated
        raise _sub_batch_error(err, positions, t, m, ids) from err
    if losses.shape != (remaining,):
        raise ValueError(_SHAPE_MESSAGE.format(shape=tuple(losses.shape), t=t, m=m, remaining=remaining))
    return losses


_SHAPE_MESSAGE = (
    "per_sample_loss returned shape {shape} at step {t} (micro-batch {m}) on a sub-batch that should hold "
    "{remaining} samples: remove_from_batch must drop exactly one sample per call, and per_sample_loss return one "
    "loss per sample"
)


def _sub_batch_error(err: Exception, positions: Sequence[int], t: int, m: int, ids: Sequence[int]) -> ValueError:
    removed = sorted({ids[pos] for pos in positions})
    return ValueError(
        f"evaluating remove_from_batch(batch, position) for position(s) {_shown(sorted(positions), 8)} (sample(s) "
        f"{_shown(removed, 8)}) of micro-batch {m} of step {t}, then per_sample_loss on the result, raised "
        f"{type(err).__name__}: {err}. The default remove_from_batch drops the row of every tensor whose first "
        "dimension is the batch size, also of one that is not per sample (class weights, a lookup table): override "
        "remove_from_batch, or keep such tensors out of the batch"
    )


def _shared_rows(
    module: nn.Module, loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, pos: int, expected: Tensor, tolerance: float
) -> str:
    """``": tensor number j of the batch (shape ...) is not per sample"`` when dropping row ``pos`` of
    every tensor with the batch's rows except that one gives the expected losses; else ``""``."""
    size = expected.shape[0] + 1
    rows = [j for j, leaf in enumerate(tensors(batch)) if leaf.dim() > 0 and leaf.shape[0] == size]
    keep = torch.tensor([r for r in range(size) if r != pos])
    for whole in rows:
        counter = iter(range(10**9))

        def drop(leaf: Tensor, whole: int = whole) -> Tensor:
            j = next(counter)
            return leaf if j == whole or leaf.dim() == 0 or leaf.shape[0] != size else leaf.index_select(0, keep.to(leaf.device))

        try:
            losses = loss_fn(params, map_tensors(drop, batch))
        except Exception:  # noqa: BLE001 - a diagnosis only
            continue
        if losses.shape == expected.shape and float((losses - expected).abs().max()) <= tolerance:
            shape = tuple(list(tensors(batch))[whole].shape)
            return (
                f": with tensor {whole} of the batch (in the order map_tensors visits them; shape {shape}) kept whole "
                "they agree, so that tensor is not per sample"
            )
    return ""


def _retrain_chunk(
    module: nn.Module,
    loss_fn: PerSampleLossFn,
    initial_params: Mapping[str, Tensor],
    groups: list[list[str]],
    spec: OptimizerSpec,
    steps: Sequence[TrainingStep],
    step_ids: list[list[list[int]]],
    chunk: list[frozenset[int]],
    coupled: bool = False,
    remove: RemoveFn | None = None,
    batch_removal: BatchRemoval = "reaverage",
    running: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The final parameters (and running statistics, ``running`` being their initial values) of
    the ``chunk``'s runs, stacked ``[K, *shape]``. ``coupled``: each run evaluates its sub-batches,
    made by ``remove`` (the module's own ``remove_from_batch``) or, when ``None``, by taking the rows of
    the per-sample tensors (the default ``remove_from_batch``)."""
    k = len(chunk)
    trained = [n for group in groups for n in group]
    # plain leaf tensors [K, *shape]: the real optimizer updates them in place
    theta = {n: initial_params[n].detach().unsqueeze(0).repeat(k, *([1] * initial_params[n].ndim)) for n in trained}
    # each run's own running statistics, written in place by the training-mode forwards of its sub-batches
    state = {n: v.unsqueeze(0).repeat(k, *([1] * v.ndim)) for n, v in (running or {}).items()}
    # one real optimizer over the stacked tensors; groups left empty by frozen parameters are omitted
    active = [g for g, names in enumerate(groups) if names]
    param_groups = []
    for g in active:
        options = dict(spec.hyperparameters[g])
        for flag in _IMPLEMENTATION_FLAGS:
            if flag in options:
                options[flag] = False
        param_groups.append({**options, "params": [theta[n] for n in groups[g]]})
    opt = _fresh_optimizer(spec, param_groups)

    # inverted index: sample id -> runs of this chunk that remove it
    runs_removing: dict[int, list[int]] = {}
    for run, removed in enumerate(chunk):
        for i in removed:
            runs_removing.setdefault(i, []).append(run)

    vectorize = _Vectorize()
    cumulative = _CumulativeAverage(module)
    drop = batch_removal == "drop"
    for t, (step, micro_ids) in enumerate(zip(steps, step_ids, strict=True)):
        step_loss = _holding(loss_fn, step.varying)
        with _layers_in_evaluation(module, step.eval_layers):
            grads = _step_gradients(
                step, t, micro_ids, step_loss, theta, trained, k, runs_removing, coupled, remove, drop, vectorize, state, cumulative
            )
        grads = _clip(grads, trained, spec, k)
        for n in trained:
            theta[n].grad = grads[n].to(theta[n].dtype).contiguous()
        for group, g in zip(opt.param_groups, active, strict=True):
            group["lr"] = step.lrs[g]
        opt.step()
    for n in trained:
        theta[n].grad = None
    return {**theta, **state}


def _step_gradients(
    step: TrainingStep,
    t: int,
    micro_ids: list[list[int]],
    step_loss: PerSampleLossFn,
    theta: dict[str, Tensor],
    trained: list[str],
    k: int,
    runs_removing: dict[int, list[int]],
    coupled: bool,
    remove: RemoveFn | None,
    drop: bool,
    vectorize: _Vectorize,
    state: dict[str, Tensor],
    cumulative: _CumulativeAverage,
) -> dict[str, Tensor]:
    """Per-run gradients ``[K, *shape]`` of step ``t``'s loss, accumulated over its micro-batches in
    order (as successive backward passes do), before clipping; ``state`` (each run's running
    statistics) is updated in place by the training-mode forwards."""
    grads: dict[str, Tensor] | None = None
    for m, (batch, ids) in enumerate(zip(step.batches, micro_ids, strict=True)):
        if coupled:
            micro = _coupled_gradients(
                step_loss, remove, theta, trained, batch, ids, runs_removing, k, t, m, step.normalizer, vectorize, state, cumulative
            )
            grads = micro if grads is None else {n: grads[n] + micro[n] for n in trained}
            continue
        first = theta[trained[0]]
        weights = torch.ones(k, len(ids), dtype=first.dtype, device=first.device)
        for pos, i in enumerate(ids):
            runs = runs_removing.get(i)
            if runs is not None:
                weights[runs, pos] = 0.0

        def weighted_loss(
            params: dict[str, Tensor],
            w: Tensor,
            batch: Any = batch,
            t: int = t,
            m: int = m,
            norm: int = step.normalizer,
            step_loss: PerSampleLossFn = step_loss,
        ) -> Tensor:
            losses = step_loss(params, batch)
            if losses.shape != w.shape:
                raise ValueError(
                    f"per_sample_loss returned shape {tuple(losses.shape)} at step {t} (micro-batch {m}), but "
                    f"sample_ids reports {w.shape[0]} samples: it must return one loss per sample"
                )
            # the mean over the samples left (an emptied micro-batch: loss 0, no gradient), or with
            # batch_removal="drop" their sum over the full micro-batch's size
            total = w.sum() if not drop else torch.full_like(w.sum(), w.shape[0])
            mean = (w * losses).sum() / torch.where(total > 0, total, torch.ones_like(total))
            return mean / norm

        micro = vectorize.grad(weighted_loss, theta, weights)
        # accumulated in micro-batch order, as successive backward passes do
        grads = micro if grads is None else {n: grads[n] + micro[n] for n in trained}
    assert grads is not None  # a TrainingStep has at least one micro-batch
    return grads


class _CumulativeAverage:
    """Batch norm with ``momentum=None`` (cumulative moving average) replayed under ``torch.func.vmap``.

    Torch's training-mode forward computes that layer's averaging factor as ``1.0 /
    float(num_batches_tracked)`` after incrementing the count, a read of a tensor as a Python number that
    ``vmap`` refuses when the count is each run's own slice. The count is the same for runs that ran
    the same number of training-mode forwards through the layer (every run runs one per micro-batch it
    does not empty), so runs are evaluated in groups of equal counts (:meth:`split`; one group unless a
    removal emptied a micro-batch), and within :meth:`replaying` a forward pre-hook gives each such layer
    the float momentum ``1.0 / float(count + calls)`` torch would compute (``calls``: the training-mode
    calls of the layer in this evaluation so far, counted from :meth:`start`, so a layer called twice
    per forward is replayed too). Torch then takes the float-momentum path, which ``vmap`` batches:
    the same update, in the same arithmetic."""

    def __init__(self, module: nn.Module) -> None:
        self.layers: dict[str, nn.modules.batchnorm._BatchNorm] = {
            f"{name}.num_batches_tracked" if name else "num_batches_tracked": layer
            for name, layer in module.named_modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            and layer.momentum is None
            and layer.track_running_stats
            and layer.num_batches_tracked is not None
        }
        self._counts: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    def split(self, runs: Sequence[int], state: Mapping[str, Tensor]) -> list[tuple[list[int], dict[str, int]]]:
        """``runs`` (indices into ``state``'s leading dimension) grouped by their counts: ``[(positions in
        runs, {count buffer name: count})]``, in the order of the runs' first appearance."""
        names = [n for n in self.layers if n in state]
        if not names or not runs:
            return [(list(range(len(runs))), {})]
        index = torch.tensor(list(runs), device=state[names[0]].device)
        columns = [state[n].index_select(0, index).tolist() for n in names]
        groups: dict[tuple[int, ...], list[int]] = {}
        for j in range(len(runs)):
            groups.setdefault(tuple(int(c[j]) for c in columns), []).append(j)
        return [(positions, dict(zip(names, key, strict=True))) for key, positions in groups.items()]

    @contextlib.contextmanager
    def replaying(self, counts: Mapping[str, int]) -> Iterator[None]:
        """Within the context, each ``momentum=None`` layer's training-mode forward uses the float momentum
        of the runs whose counts are ``counts`` (from :meth:`split`); ``momentum=None`` restored on exit."""
        if not counts:
            yield
            return
        self._counts = dict(counts)
        self.start()
        handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers.items() if name in counts]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers.values():
                layer.momentum = None
            self._counts = {}

    def start(self) -> None:
        """An evaluation of the training forward starts (once per vmapped call, once per run of the loop)."""
        self._calls = {name: 0 for name in self._counts}

    def _hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def set_momentum(layer: nn.Module, args: Any) -> None:
            if layer.training:  # torch counts (and averages) in training mode only
                self._calls[name] += 1
                layer.momentum = 1.0 / float(self._counts[name] + self._calls[name])

        return set_momentum


@contextlib.contextmanager
def _layers_in_evaluation(module: nn.Module, names: Collection[str]) -> Iterator[None]:
    """The submodules of ``module`` named in ``names`` in evaluation mode (as a step recorded them:
    :attr:`TrainingStep.eval_layers`), then restored."""
    if not names:
        yield
        return
    found = dict(module.named_modules())
    missing = sorted(n for n in names if n not in found)
    if missing:
        raise ValueError(
            f"a step records {_shown(missing, 4)} in evaluation mode, which {type(module).__name__} has no submodule of that name"
        )
    layers = [found[n] for n in names]
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.training = mode


def _holding(loss_fn: PerSampleLossFn, values: Mapping[str, Tensor]) -> PerSampleLossFn:
    """``loss_fn`` with the module tensors named in ``values`` held at those values."""
    if not values:
        return loss_fn
    held = dict(values)
    return lambda params, batch: loss_fn({**held, **params}, batch)


class _Vectorize:
    """Evaluate a function of per-run arguments stacked along dim 0 for every run at once
    (``torch.func.vmap``), or run by run with the results stacked: the same values either way.

    The run-by-run loop takes over, for this and every later call, once the vectorised evaluation
    fails in any way while the loop succeeds: an operation without a batching rule (``nn.GRU``), or
    one that torch.func cannot run at all (``pack_padded_sequence`` into an RNN: "Cannot access data
    pointer of Tensor that doesn't have storage"), whatever the error's wording. For gradients the loop
    uses plain autograd (:meth:`grad`), since ``torch.func.grad`` fails on such operations as well. An
    error that the loop raises too is the model's own, and is raised as the loop raises it.

    ``writes``: stacked tensors that the function updates in place (each run's running statistics,
    written by batch norm's training-mode forward through its run's slice); a vectorised evaluation
    that fails part-way is undone on them before the loop runs. (``momentum=None`` batch norm, which
    reads ``num_batches_tracked`` as a Python number, is given that number from outside:
    :class:`_CumulativeAverage`.)"""

    def __init__(self) -> None:
        self.loop = False

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``vmap(fn)(*args)``, or ``fn`` applied to each run's slice of ``args``, stacked."""
        return self._run(lambda: torch.func.vmap(fn)(*args), lambda: _each_run(fn, *args))

    def grad(
        self, fn: Callable[..., Tensor], params: dict[str, Tensor], *args: Any, writes: Iterable[Tensor] = ()
    ) -> dict[str, Tensor]:
        """Per-run gradient ``{name: Tensor[K, *shape]}`` of the scalar ``fn(params_k, *args_k)`` with
        respect to ``params_k`` (``vmap(grad(fn))``, or plain autograd one run at a time); ``writes``:
        the tensors of ``args`` that ``fn`` updates in place."""
        return self._run(
            lambda: torch.func.vmap(torch.func.grad(fn))(params, *args),
            lambda: _each_run(_autograd_gradient(fn), params, *args),
            writes,
        )

    def _run(self, vectorised: Callable[[], Any], sequential: Callable[[], Any], writes: Iterable[Tensor] = ()) -> Any:
        if not self.loop:
            written = [(w, w.clone()) for w in writes]
            try:
                return vectorised()
            except Exception as err:  # noqa: BLE001 - whatever vmap raises, the loop decides whether it is the model's error
                for tensor, before in written:  # undo what the failed evaluation wrote before the loop runs
                    tensor.copy_(before)
                if "random operation" in str(err):  # the loop would draw other numbers in every run: no ground truth
                    raise ValueError(
                        "the retraining needs a deterministic per_sample_loss, but it draws random numbers "
                        f"(torch.func.vmap refused a random operation: {str(err).split('.')[0]}), so each run would "
                        f"see other noise than the recorded run. {RANDOM_FIX}"
                    ) from None
        # outside the handler: an error of the loop is raised as itself, not as a consequence of vmap's
        result = sequential()
        self.loop = True
        return result


def _each_run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` on each run's slice (index ``j`` of dim 0) of every tensor of ``args``, stacked over runs."""
    size = torch.utils._pytree.tree_leaves(args)[0].shape[0]
    runs = [fn(*torch.utils._pytree.tree_map(lambda a, j=j: a[j], args)) for j in range(size)]
    return torch.utils._pytree.tree_map(lambda *parts: torch.stack(parts), *runs)


def _autograd_gradient(fn: Callable[..., Tensor]) -> Callable[..., dict[str, Tensor]]:
    """``torch.func.grad(fn)`` computed by plain autograd: the gradient of the scalar ``fn(params, *args)``
    with respect to ``params`` (a dict of tensors), zero for a parameter the value does not depend on, dense."""

    def gradient(params: dict[str, Tensor], *args: Any) -> dict[str, Tensor]:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            value = fn(leaves, *args)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise RuntimeError(f"expected a scalar loss to differentiate, got {type(value).__name__}")
            if not value.requires_grad:
                return {n: torch.zeros_like(p) for n, p in leaves.items()}
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return {
            n: torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
            for (n, p), g in zip(leaves.items(), grads, strict=True)
        }

    return gradient


def _coupled_gradients(
    loss_fn: PerSampleLossFn,
    remove: RemoveFn | None,
    theta: dict[str, Tensor],
    trained: list[str],
    batch: Any,
    ids: list[int],
    runs_removing: dict[int, list[int]],
    k: int,
    t: int,
    m: int,
    norm: int,
    vectorize: _Vectorize,
    state: dict[str, Tensor],
    cumulative: _CumulativeAverage,
) -> dict[str, Tensor]:
    """Per-run gradients ``[K, *shape]`` of one micro-batch's coupled loss, ``grad mean
    per_sample_loss(sub-batch) / norm``; zero for a run that removes every sample of the micro-batch.

    The runs removing nothing here share the whole batch (one ``vmap`` over their parameters). The
    others: with ``remove=None`` (the default ``remove_from_batch``: the rows of every tensor whose first
    dimension is the batch size), grouped by how many samples they keep, each group's sub-batches
    gathered row by row into tensors ``[runs, remaining, ...]`` and vmapped together with the runs'
    parameters, each run its own rows; with a ``remove`` of the module's own, grouped by the positions
    they remove (one evaluation per distinct sub-batch, built by ``remove`` once per removed position).

    ``state``: each run's running statistics ``{buffer name: Tensor[K, *shape]}``, passed to the
    training-mode forward of the run's sub-batch, which updates them in place as training did (a run
    whose micro-batch is emptied runs no forward: its statistics stay as they were). ``cumulative``: the
    ``momentum=None`` batch norm layers, whose runs are evaluated in groups of equal batch counts."""
    size = len(ids)
    device = theta[trained[0]].device
    removed_at: dict[int, list[int]] = {}  # run -> positions it removes in this micro-batch
    for pos, i in enumerate(ids):
        for run in runs_removing.get(i, ()):
            removed_at.setdefault(run, []).append(pos)
    groups: dict[Any, list[int]] = {}
    for run in range(k):
        positions = tuple(sorted(removed_at.get(run, ())))
        key = positions if remove is not None or not positions else size - len(positions)
        groups.setdefault(key, []).append(run)
    out = {n: torch.zeros_like(theta[n]) for n in trained}
    leaves = list(tensors(batch))
    per_sample = [j for j, leaf in enumerate(leaves) if leaf.dim() > 0 and leaf.shape[0] == size]

    def evaluate(runs: list[int], remaining: int, sub: Any, rows: list[Tensor] | None) -> None:
        """The gradients of ``runs`` on ``sub`` (shared), or on the batch with its per-sample tensors
        replaced by each run's slice of ``rows`` (``[runs, remaining, ...]``): one vectorised evaluation
        per group of runs with equal ``momentum=None`` batch counts (one group without such layers)."""
        for positions, counts in cumulative.split(runs, state):
            part = rows
            if rows is not None and len(positions) < len(runs):
                part = [r.index_select(0, torch.tensor(positions, device=r.device)) for r in rows]
            with cumulative.replaying(counts):
                evaluate_group([runs[j] for j in positions], remaining, sub, part)

    def evaluate_group(runs: list[int], remaining: int, sub: Any, rows: list[Tensor] | None) -> None:
        def mean_loss(params: dict[str, Tensor], buffers: dict[str, Tensor], *own: Tensor) -> Tensor:
            cumulative.start()
            evaluated = sub
            if own:
                visit = iter(range(len(leaves)))
                replaced = dict(zip(per_sample, own, strict=True))
                evaluated = map_tensors(lambda leaf: replaced.get(next(visit), leaf), batch)
            losses = loss_fn({**buffers, **params}, evaluated)
            if losses.shape != (remaining,):
                raise ValueError(_SHAPE_MESSAGE.format(shape=tuple(losses.shape), t=t, m=m, remaining=remaining))
            return losses.mean() / norm

        positions = sorted({pos for run in runs for pos in removed_at.get(run, ())})
        index = torch.tensor(runs, device=device)
        part = {n: theta[n].index_select(0, index) for n in trained}
        buffers = {n: v.index_select(0, index) for n, v in state.items()}
        try:
            grads = vectorize.grad(mean_loss, part, buffers, *(rows or ()), writes=buffers.values())
        except Exception as err:  # noqa: BLE001 - re-raised naming what was evaluated
            if "Expected more than 1 value per channel" not in str(err):
                if not positions or isinstance(err, ValueError):  # the library's own messages, or a full batch's error
                    raise
                raise _sub_batch_error(err, positions, t, m, ids) from err
            removed = sorted({ids[pos] for pos in positions})
            raise ValueError(
                f"removing sample(s) {_shown(removed, 8)} leaves micro-batch {m} of step {t} (sample ids "
                f"{_shown(ids, 8)}) with {remaining} sample(s), which batch norm in training mode cannot normalise "
                "(one value per channel: no batch variance; the recorded run never met such a batch). Leave these "
                "samples out of the removal set, or train the ground-truth run with larger batches"
            ) from None
        for n in trained:
            out[n].index_copy_(0, index, grads[n].to(out[n].dtype))
        for n, v in buffers.items():
            state[n].index_copy_(0, index, v)

    for key, runs in groups.items():
        if key == ():
            evaluate(runs, size, batch, None)
        elif isinstance(key, int):  # the default removal: each run's remaining rows, gathered
            if key == 0:
                continue  # an emptied micro-batch: loss 0, no gradient
            kept = torch.tensor(
                [[pos for pos in range(size) if pos not in set(removed_at[run])] for run in runs], dtype=torch.long
            )
            rows_per_run = sum(leaves[j][0].numel() for j in per_sample) * key
            share = max(1, _GATHERED_ELEMENTS // max(rows_per_run, 1))  # runs per evaluation: bounded memory
            for start in range(0, len(runs), share):
                part = kept[start : start + share]
                rows = [leaves[j][part.to(leaves[j].device)] for j in per_sample]
                evaluate(runs[start : start + share], key, batch, rows)
        else:
            remaining = size - len(key)
            if remaining == 0:
                continue
            sub = batch
            try:
                for pos in reversed(key):  # highest position first: the lower ones keep their place
                    sub = remove(sub, pos)  # type: ignore[misc]
            except Exception as err:  # noqa: BLE001 - re-raised naming remove_from_batch
                raise _sub_batch_error(err, key, t, m, ids) from err
            evaluate(runs, remaining, sub, None)
    return out


_GATHERED_ELEMENTS = 1 << 24
"""At most this many elements of gathered sub-batch rows per vectorised evaluation (128 MiB in float64)."""


def _clip(grads: dict[str, Tensor], trained: list[str], spec: OptimizerSpec, k: int) -> dict[str, Tensor]:
    """Per-run gradient clipping, as Lightning applies it after ``on_before_optimizer_step``."""
    if spec.clip_val is None:
        return grads
    if spec.clip_algorithm == "value":
        return {n: grads[n].clamp(-spec.clip_val, spec.clip_val) for n in trained}
    # torch.nn.utils.clip_grad_norm_: the 2-norm of the per-tensor 2-norms, coefficient
    # max_norm / (total + 1e-6) clamped to 1 -- here per run, over that run's gradients
    norms = torch.stack([torch.linalg.vector_norm(grads[n].reshape(k, -1), 2, dim=1) for n in trained], dim=1)
    total = torch.linalg.vector_norm(norms, 2, dim=1)
    coef = torch.clamp(spec.clip_val / (total + 1e-6), max=1.0)
    return {n: grads[n] * coef.to(grads[n].dtype).reshape(k, *([1] * (grads[n].ndim - 1))) for n in trained}


@contextlib.contextmanager
def _differentiable_attention() -> Iterator[None]:
    """Evaluate attention as the differentiable path does: PyTorch's fast path of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoder(Layer)`` off (``torch.backends.mha``), then
    restored to what it was.

    The fast path runs only in evaluation mode when no gradient is tracked (no_grad, or weights that do
    not require one, as the parameters passed in here), and is not the same function: with a
    key padding mask ``nn.TransformerEncoder`` converts its input to nested tensors and returns zeros at
    the padded positions, where the regular path (the one every gradient goes through) returns values,
    so a loss that pools over padded positions differs. Values computed under ``torch.no_grad()`` for the
    ground truth must be those of the function the estimators differentiate. Nothing to do where the
    installed torch has no such switch."""
    mha = getattr(torch.backends, "mha", None)
    get = getattr(mha, "get_fastpath_enabled", None)
    set_ = getattr(mha, "set_fastpath_enabled", None)
    if get is None or set_ is None:
        yield
        return
    previous = bool(get())
    set_(False)
    try:
        yield
    finally:
        set_(previous)


def _stacked(module: nn.Module, params: Mapping[str, Tensor]) -> bool:
    known = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    unknown = [n for n in params if n not in known]
    if unknown:
        raise ValueError(f"params names {unknown[:5]}, which are not parameters (or buffers) of the module")
    if not params:
        raise ValueError("params is empty")
    kinds = set()
    for n, p in params.items():
        if tuple(p.shape) == tuple(known[n].shape):
            kinds.add(False)
        elif tuple(p.shape[1:]) == tuple(known[n].shape):
            kinds.add(True)
        else:
            raise ValueError(f"params[{n!r}] has shape {tuple(p.shape)}; the module's tensor has shape {tuple(known[n].shape)}")
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
    others keep the module's values). ``params`` may also hold buffers by name, such as the
    running statistics of batch norm that :func:`retrain` returns for each run: evaluation mode
    normalises with them (each run with its own).

    ``params`` is either stacked, ``{name: Tensor[K, *shape]}`` (as :func:`retrain` returns),
    giving a float64 ``Tensor[K]`` (vmapped over K, ``chunk_size`` runs at a time), or
    unstacked, ``{name: Tensor[*shape]}``, giving a float64 0-d tensor. Units: the loss's.
    A float64 module evaluates lower-precision floating inputs converted to float64, as
    Lightning's ``precision="64-true"`` converts the batches its loops feed the module.

    The loss evaluated is the one the estimators differentiate: the same function as with gradients
    enabled. PyTorch's fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` (taken only in
    evaluation mode when no gradient is tracked; with a ``src_key_padding_mask`` it runs on nested tensors and
    returns zeros at padded positions, so a loss that pools over them changes) is switched off while
    evaluating (``torch.backends.mha.set_fastpath_enabled(False)``) and restored afterwards.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    stacked = _stacked(module, params)
    loss_fn = per_sample_loss_function(module)
    batches = target_batch_list(target_batches)
    if any(p.dtype == torch.float64 for p in params.values()):
        widen = lambda t: t.double() if t.is_floating_point() and t.dtype != torch.float64 else t  # noqa: E731
        batches = [map_tensors(widen, batch) for batch in batches]
    params = {n: p.detach() for n, p in params.items()}
    k = next(iter(params.values())).shape[0] if stacked else 1
    totals = torch.zeros(k, dtype=torch.float64)
    count = 0
    vectorize = _Vectorize()
    with evaluation_mode(module), torch.no_grad(), _differentiable_attention():
        for batch in batches:
            if stacked:
                parts = []
                for start in range(0, k, chunk_size):
                    chunk = {n: p[start : start + chunk_size] for n, p in params.items()}
                    parts.append(vectorize(lambda p, b=batch: loss_fn(p, b), chunk))
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


def target_batch_list(target_batches: Iterable[Any]) -> list[Any]:
    """``target_batches`` (a list of batches, a DataLoader, ...) read once into a list; a single
    batch passed by mistake (a tuple or list of tensors, which would be read as batches of one
    tensor each) is refused with the fix."""
    if isinstance(target_batches, (tuple, list)) and target_batches and all(isinstance(b, Tensor) for b in target_batches):
        raise TypeError(
            f"target_batches must be an iterable of batches (a list of batches, a DataLoader), but it is a single batch "
            f"(a {type(target_batches).__name__} of {len(target_batches)} tensors), whose tensors would be read as batches: "
            "wrap it in a list, [batch]"
        )
    return list(target_batches)


def leave_one_out(
    module: nn.Module,
    initial_params: Mapping[str, Tensor],
    steps: Sequence[TrainingStep],
    optimizer: OptimizerSpec,
    sample_ids: Sequence[int] | Tensor,
    target_batches: Iterable[Any],
    *,
    chunk_size: int = 128,
    coupled: bool | None = None,
    batch_removal: BatchRemoval = "reaverage",
) -> Tensor:
    """Exact trajectory-specific leave-one-out influence of each sample in ``sample_ids``.

    ``I(z) = F(theta_T^{-z}) - F(theta_T)`` with ``F`` = :func:`target_loss` on
    ``target_batches`` (iterated once and kept in memory), ``theta_T^{-z}`` = :func:`retrain`
    with ``z`` removed from every micro-batch (same steps, learning rates, optimizer and
    clipping, ``optimizer`` being the run's :class:`OptimizerSpec`), and ``theta_T`` the
    baseline run (nothing removed), retrained by the same engine. Units: the target loss's.
    Sign: positive means removing ``z`` raises the target loss (``z`` helps); negative means
    ``z`` hurts.

    ``sample_ids``: integer ids (a tensor, array or sequence; ``ValueError`` for floating-point,
    complex or boolean ones, which are not rounded to an id, and for ids that no recorded step
    holds: :func:`check_recorded_ids`). Returns a float64
    ``Tensor[len(sample_ids)]`` on the CPU. Cost: ``len(sample_ids) + 1``
    retraining runs, vectorised ``chunk_size`` at a time. ``coupled``: see :func:`retrain` (default:
    ``module.coupled_batch_loss``); the target batches are evaluated whole either way.
    ``batch_removal``: see :func:`retrain` (``"drop"``: the counterfactual that
    ``DiffIn(batch_removal="drop")`` and the ``sgd_influence`` estimator predict).
    """
    ids = as_ids("sample_ids", sample_ids, flatten=True).tolist()
    check_recorded_ids(module, steps, ids)
    batches = target_batch_list(target_batches)
    removals: list[tuple[int, ...]] = [(), *((i,) for i in ids)]
    losses: list[Tensor] = []
    for start in range(0, len(removals), chunk_size):
        final = retrain(
            module,
            initial_params,
            steps,
            optimizer,
            removals[start : start + chunk_size],
            chunk_size=chunk_size,
            coupled=coupled,
            batch_removal=batch_removal,
        )
        losses.append(target_loss(module, final, batches, chunk_size=chunk_size))
    f = torch.cat(losses)
    return f[1:] - f[0]
