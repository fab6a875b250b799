"""The one interface every influence estimator shares, and the registry that names them.

An estimator answers one question: *how would the target loss change if training sample z
were removed?* Every estimator returns :class:`~lightning_influence.scores.InfluenceScores`
in the library's sign and units: the predicted change of the target loss (units of the
target loss, e.g. nats of mean cross-entropy) when the sample is removed. Positive: the sample
helps. Negative: it hurts. Estimators whose natural output has other units (coreset scores,
Forward-INF loss shifts) say so in their metadata (``"units"``) and keep the sign: a larger
value means more helpful / more worth keeping.

Two kinds share the protocol:

- *post-hoc* estimators work on the trained module and its loaders;
- *recording* estimators must watch training: :meth:`Estimator.callback` returns the Lightning
  callback to add to the Trainer before ``fit``; :meth:`Estimator.scores` is called after.

Use :func:`build` / :func:`available` to select one by name (this is what the Hydra configs do)::

    estimator = build("influence_function", solver="cg", damping=1e-3)
    trainer = L.Trainer(callbacks=[c for c in [estimator.callback()] if c is not None])
    trainer.fit(model, datamodule=dm)
    scores = estimator.scores(model, dm.train_dataloader(), Target("val", dm.val_dataloader()))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import sys
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor

from lightning_influence.checks import check_dataset_ids, check_influence_aware, check_losses, coupling_message, undeclared_coupling
from lightning_influence.kernels import ParameterSpace, PerSampleLossFn, matches_any, parameter_names, per_sample_loss_function
from lightning_influence.scores import InfluenceScores
from lightning_influence.targets import TARGET_KINDS, TargetGradient, TargetKind, in_order
from lightning_influence.validation import check_count, did_you_mean

__all__ = [
    "Estimator",
    "Target",
    "REGISTRY",
    "available",
    "build",
    "estimator_class",
    "attributed_space",
    "device_batches",
    "progress",
    "TrainingPasses",
    "posthoc_training",
    "batch_fingerprint",
    "different_inputs_message",
    "non_finite_samples_error",
    "non_finite_training_error",
]


@dataclass(frozen=True)
class Target:
    """What the scores are about.

    ``kind``: ``"train"`` (mean training loss over ``train_loader``: self / empirical-risk
    influence), ``"val"`` (mean loss over ``loader``), or ``"query"`` (one score column per
    sample of ``loader``). ``sample_count``: use a fixed random subset of that many target
    samples, drawn once with ``seed`` (by sample id for ``"train"``).
    """

    kind: TargetKind = "val"
    loader: Iterable[Any] | None = None
    sample_count: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if self.kind in ("val", "query") and self.loader is None:
            raise ValueError(f"a {self.kind!r} target needs a loader: Target({self.kind!r}, loader=...)")
        check_count("sample_count", self.sample_count, none_ok=True)

    def loader_for(self, train_loader: Iterable[Any]) -> Iterable[Any]:
        """The loader whose samples define the target (the training loader for ``"train"``)."""
        if self.kind == "train":
            return train_loader if self.loader is None else self.loader
        return in_order(self.loader)  # every pass sees the same samples in the same order

    def gradient(self, module: L.LightningModule, train_loader: Iterable[Any]) -> TargetGradient:
        """A :class:`~lightning_influence.targets.TargetGradient` over this target's batches,
        moved to the module's device; call it as ``grad(loss_fn, space, theta)``."""
        source = self.loader_for(train_loader)
        return TargetGradient(
            self.kind,  # type: ignore[arg-type]
            lambda: device_batches(module, source),
            sample_count=self.sample_count,
            seed=self.seed,
            sample_ids=module.sample_ids if self.kind == "train" else None,  # type: ignore[attr-defined]
            batch_ids=getattr(module, "sample_ids", None),
        )


def check_recorded_target(owner: str, recorded: Any, target: Target | str | Iterable[Any]) -> None:
    """A recording estimator's scores answer the target its callback ``recorded`` during fit (its
    ``target``, ``target_loader`` and ``target_samples``): refuse a ``target`` that asks another
    question. A loader must be the recorded one (or a loader over the same dataset object); one
    the callback did not get (it used the Trainer's validation loader) cannot be compared and is
    taken as given. A ``sample_count`` must be the recorded one (none when none was recorded), and
    so must the ``seed`` that drew its subset."""
    kind = target if isinstance(target, str) else as_target(target).kind
    if kind != recorded.target:
        raise ValueError(
            f"{owner} recorded scores for target={recorded.target!r} but {kind!r} was asked for: choose the target "
            f"when building the estimator (build({owner.lower()!r}, target=...)); in a recipe, set recipe.target"
        )
    if isinstance(target, str):
        return
    wanted = as_target(target)
    loader = recorded.target_loader
    if wanted.loader is not None and loader is not None and wanted.loader is not loader:
        same_data = getattr(wanted.loader, "dataset", None) is not None and getattr(wanted.loader, "dataset", None) is getattr(loader, "dataset", object())
        if not same_data:
            raise ValueError(
                f"{owner} recorded its scores against the target_loader it was built with, not against the loader passed "
                "to scores(): pass that same loader, or build the estimator with target_loader=<this loader> before fit"
            )
    if wanted.sample_count is None and recorded.target_samples is not None:
        raise ValueError(
            f"{owner} recorded its scores against a subset of target_samples={recorded.target_samples} target samples, but "
            f"the whole target was asked for: pass Target(..., sample_count={recorded.target_samples}, "
            f"seed={getattr(recorded, 'seed', 0)}), or build the estimator without target_samples before fit"
        )
    if wanted.sample_count is not None and wanted.sample_count != recorded.target_samples:
        raise ValueError(
            f"{owner} recorded its scores against target_samples={recorded.target_samples} but sample_count="
            f"{wanted.sample_count} was asked for: build the estimator with target_samples={wanted.sample_count} before fit"
        )
    recorded_seed = getattr(recorded, "seed", 0)
    if wanted.sample_count is not None and wanted.seed != recorded_seed:
        raise ValueError(
            f"{owner} recorded its scores against the subset of target_samples={recorded.target_samples} drawn with "
            f"seed={recorded_seed} but seed={wanted.seed} was asked for (another subset of the target): build the "
            f"estimator with seed={wanted.seed} before fit, or ask for Target(..., seed={recorded_seed})"
        )


def as_target(target: Target | str | Iterable[Any] | None) -> Target:
    """``"train"`` / a :class:`Target` / a loader (read as a ``"val"`` target)."""
    if isinstance(target, Target):
        return target
    if target is None or target == "train":
        return Target("train")
    if isinstance(target, str):
        raise ValueError(f"a {target!r} target needs its loader: pass Target({target!r}, loader=...)")
    return Target("val", target)


class Estimator(ABC):
    """Base class of every estimator: ``scores(module, train_loader, target) -> InfluenceScores``.

    ``module`` is a trained LightningModule with :class:`~lightning_influence.InfluenceMixin`
    (``per_sample_loss`` and ``sample_ids``); ``train_loader`` yields the training batches
    (each sample once per pass, the same samples with the same inputs every pass: no random
    augmentation; the order does not matter to post-hoc estimators, which read it through
    :func:`posthoc_training`).
    """

    name: ClassVar[str] = ""
    #: Does the estimator need to watch training (``callback()`` must be added to the Trainer)?
    records_training: ClassVar[bool] = False
    #: Do its scores rank samples for a coreset (higher = more worth keeping, in its own units)
    #: rather than by the effect of their removal (the library's sign convention)?
    ranks_for_keeping: ClassVar[bool] = False
    #: Are its scores predicted removal effects (the library's sign, in target-loss units, so that a
    #: set's sum predicts the set's removal), rather than a ranking by some other measure? (A
    #: ranking's metadata says ``calibrated: False`` and what a high value means.)
    predicts_removal: ClassVar[bool] = True

    options_from: ClassVar[type | None] = None
    """For an estimator whose ``**options`` are its callback's arguments: the callback class, whose
    constructor's names and annotations the options are checked against."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__ and not getattr(cls.__init__, "_checks_options", False):
            cls.__init__ = _checked_options(cls.__init__)  # type: ignore[method-assign]

    def callback(self) -> L.Callback | None:
        """The callback to add to the Trainer before ``fit`` (``None`` for post-hoc estimators)."""
        return None

    @abstractmethod
    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        """Score every training sample of ``train_loader`` (sign and units: see the module docstring)."""

    def check_module(self, module: torch.nn.Module, batch: Any = None) -> None:
        """Refuse, from the module (and, when given, one training ``batch`` on the module's
        device), options and contracts that :meth:`scores` would refuse only after its work: here,
        ``params`` patterns that select no trainable parameter (estimators with a ``params``
        option). Subclasses add their own (a solver's size limit or supported layers, an output
        split or class scores the batch must give). No gradient, no curvature: cheap enough to run
        on a trial model before any training (the recipes do)."""
        if hasattr(self, "params"):
            attributed_space(module, self.params)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


_SCALARS: dict[Any, str] = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}



def _scalar_mismatch(value: Any, hint: Any) -> str | None:
    """What a value for an option annotated with scalar types (``bool``, ``int``, ``float``,
    ``str``, or a union of them with ``None``) must be, if ``value`` is not that; else ``None``.
    Other annotations (paths, loaders, functions, sequences) are not checked here."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [m for m in members if m is not type(None)]
    if not kinds or any(k not in _SCALARS for k in kinds):
        return None
    if value is None:
        return None if len(kinds) < len(members) else " or ".join(_SCALARS[k] for k in kinds)
    fits = any(
        isinstance(value, bool) if k is bool
        else isinstance(value, int) and not isinstance(value, bool) if k is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if k is float
        else isinstance(value, str)
        for k in kinds
    )
    return None if fits else " or ".join(_SCALARS[k] for k in kinds) + (" or None" if len(kinds) < len(members) else "")


def _options_signature(init: Any) -> tuple[inspect.Signature, dict[str, Any]]:
    signature = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation naming a type imported for type checkers only: check params alone
        hints = {}
    return signature, hints


def check_options(owner: str, init: Any, options: dict[str, Any], skip_first: bool = True) -> dict[str, Any]:
    """``options`` (keyword arguments of ``init``) checked the same way for every estimator and
    however they arrive (Python, or strings and numbers from a Hydra command line): a name that is
    none of ``init``'s arguments is refused with the closest ones; a value of an option annotated
    with scalar types must be of them (``bool``: ``"off"`` would read as true; ``int``: not
    ``True`` or ``"3"``); ``params`` (parameter-name patterns) given as one string is that one
    pattern, not its characters. Returns the options, ``params`` normalised."""
    signature, hints = _options_signature(init)
    parameters = list(signature.parameters.values())[1 if skip_first else 0 :]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    any_name = any(p.kind is p.VAR_KEYWORD for p in parameters)
    result = dict(options)
    for name, value in options.items():
        if name not in names:
            if any_name:
                continue
            hint = did_you_mean(name, names, f"its options are {', '.join(names) or 'none'}")
            raise TypeError(f"estimator {owner!r} has no option {name!r}: {hint}")
        expected = _scalar_mismatch(value, hints.get(name))
        if expected is not None:
            hydra = " (on a Hydra command line: =true or =false)" if hints.get(name) is bool else ""
            raise TypeError(f"estimator {owner!r}: option {name} must be {expected}, got {value!r} ({type(value).__name__}){hydra}")
        if name == "params" and isinstance(value, str):
            result[name] = [value]
        elif name == "params" and value is not None and (not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value)):
            raise TypeError(f"estimator {owner!r}: params must be parameter-name patterns (strings), got {value!r}")
        elif name == "params" and value is not None and len(value) == 0:
            raise ValueError(
                f"estimator {owner!r}: params={value!r} selects no parameter; give name patterns such as ['head.*'], "
                "or leave params unset (None) for every trainable parameter"
            )
    return result


def _checked_options(init: Any) -> Any:
    """``init`` with its options checked first (:func:`check_options`). An estimator that forwards
    ``**options`` to its callback (``options_from``) has them checked against the callback's
    constructor."""
    signature, _ = _options_signature(init)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        owner = getattr(type(self), "name", "") or type(self).__name__
        bound = signature.bind_partial(self, *args)
        kwargs = check_options(owner, init, {**{k: v for k, v in bound.arguments.items() if k != "self"}, **kwargs})
        forwarded = getattr(type(self), "options_from", None)
        if forwarded is not None:
            kwargs = check_options(owner, forwarded.__init__, kwargs)
        init(self, **kwargs)

    checked._checks_options = True  # type: ignore[attr-defined]
    return checked


class CallbackEstimator(Estimator):
    """An estimator computed during ``fit`` by its callback (:attr:`options_from`, built from
    ``options`` at once, so bad options are refused before training): add :meth:`callback` to the
    Trainer, run ``fit``, then :meth:`scores` returns what the callback computed, after checking
    that ``target`` is the one it recorded."""

    records_training: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if self.options_from is None:
            raise TypeError(f"{type(self).__name__} must name its callback class in options_from")
        self.options = options
        self._callback: Any = self.options_from(**options)  # validates the options now

    def callback(self) -> Any:
        return self._callback

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        owner = self._callback.__class__.__name__
        if self._callback.scores is None:
            raise RuntimeError(f"{owner} computes its scores during fit: add estimator.callback() to the Trainer, run fit, then call scores()")
        check_recorded_target(owner, self._callback, target)
        return self._callback.scores

# name -> "module:attribute"; imported on first use so one estimator's optional dependency
# never breaks another.
REGISTRY: dict[str, str] = {
    "diffin": "lightning_influence.estimators.diffin:DiffInEstimator",
    "sgd_influence": "lightning_influence.estimators.diffin:SGDInfluence",
    "diffin_checkpoints": "lightning_influence.estimators.diffin_checkpoints:DiffInCheckpoints",
    "influence_function": "lightning_influence.estimators.influence_functions:InfluenceFunction",
    "datainf": "lightning_influence.estimators.influence_functions:DataInf",
    "forward_inf": "lightning_influence.estimators.forward_inf:ForwardInf",
    "tracin": "lightning_influence.estimators.tracin:TracInEstimator",
    "tracin_checkpoints": "lightning_influence.estimators.tracin:TracInCheckpoints",
    "el2n": "lightning_influence.estimators.coreset:EL2N",
    "grand": "lightning_influence.estimators.coreset:GraNd",
    "forgetting": "lightning_influence.estimators.coreset:Forgetting",
    "random": "lightning_influence.estimators.coreset:RandomScores",
    "loss": "lightning_influence.estimators.coreset:FinalLoss",
    "outlier_gradient": "lightning_influence.estimators.outlier_gradient:OutlierGradient",
}


def estimator_class(name: str) -> type[Estimator]:
    """The estimator class registered under ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"no estimator named {name!r}; available: {', '.join(sorted(REGISTRY))}")
    module_name, attr = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise TypeError(f"{REGISTRY[name]} is not an Estimator subclass")
    return cls


def build(name: str, **options: Any) -> Estimator:
    """Instantiate the estimator registered under ``name`` with keyword ``options``."""
    return estimator_class(name)(**options)


def available() -> list[str]:
    """Names of the registered estimators."""
    return sorted(REGISTRY)


# ---------------------------------------------------------------------- shared helpers
def attributed_space(module: torch.nn.Module, params: list[str] | None = None) -> tuple[ParameterSpace, Tensor, PerSampleLossFn]:
    """``(space, theta, loss_fn)`` for a trained module: the trainable parameters (or those whose
    names match one of the fnmatch patterns ``params``), their flat values, and the module's
    functional per-sample loss."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if params:
        aliases = parameter_names(module)  # a tied parameter matches a pattern under any of its names
        named = [(n, p) for n, p in named if matches_any(aliases[id(p)], params)]
        if not named:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            raise ValueError(f"no trainable parameter name matches params={params}; the names are like {names[:6]}")
    space = ParameterSpace.from_parameters(named)
    theta = space.flatten(dict(named))
    return space, theta, per_sample_loss_function(module)


def device_batches(module: L.LightningModule, loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches moved to the module's device (its ``transfer_batch_to_device`` hook).
    The module must be influence-aware (per-sample losses and sample ids). A
    :class:`TrainingPasses` yields its checked pass (its batches are on the device already)."""

    if isinstance(loader, TrainingPasses):
        yield from loader.batches()
        return
    check_influence_aware(module)
    device = getattr(module, "device", torch.device("cpu"))
    for batch in loader:
        if hasattr(module, "transfer_batch_to_device"):
            batch = module.transfer_batch_to_device(batch, device, 0)
        yield batch


def progress(iterable: Iterable[Any], description: str, enabled: bool = True, total: int | None = None) -> Iterable[Any]:
    """Wrap ``iterable`` in a tqdm bar in Lightning's style (Lightning depends on tqdm)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True, smoothing=0)


# ---------------------------------------------------------------------- the training loader, read post hoc
#: Input fingerprints are residues modulo this prime: the product of a word of at most 32 bits and a
#: weight below it fits an int64, so every fingerprint is exact integer arithmetic (no rounding, the
#: same on every device and in any summation order).
_PRIME = 2**31 - 1
#: Elements hashed at a time: bounds the temporary int64 copy to 32 MiB per tensor.
_BLOCK = 1 << 22
_WEIGHTS: dict[torch.device, Tensor] = {}


def _mixed(index: Tensor) -> Tensor:
    """Pseudo-random weights in ``[1, _PRIME]``, a fixed function of each integer of ``index``
    (any int64: sample ids, column positions): the same on every call and device."""
    x = index.remainder(_PRIME)
    x = (x * 48271 + 11).remainder_(_PRIME)
    x = (x * x).remainder_(_PRIME)
    x = (x * 16807 + index.remainder(65521)).remainder_(_PRIME)
    x = (x * x).remainder_(_PRIME)
    return x.add_(1)


def _position_weights(start: int, count: int, device: torch.device) -> Tensor:
    """The weights of positions ``start .. start + count - 1`` (a cached prefix for ``start = 0``)."""
    if start > 0:
        return _mixed(torch.arange(start, start + count, dtype=torch.long, device=device))
    cached = _WEIGHTS.get(device)
    if cached is None or cached.numel() < count:
        cached = _mixed(torch.arange(max(count, 1024), dtype=torch.long, device=device))
        _WEIGHTS[device] = cached
    return cached[:count]


def _row_hashes(tensor: Tensor, rows: int) -> Tensor | None:
    """One fingerprint per row of ``tensor`` viewed as ``[rows, -1]`` (int64 ``[rows]`` on its device):
    ``sum_j word_j * weight_j mod _PRIME`` over the row's bytes read as unsigned words of at most 32
    bits, so it sees the exact bits (not a rounded sum) and where they sit (a flipped image changes
    it; a sum or a sum of squares would not). ``None`` for tensors without plain strided storage
    (sparse, nested, quantized, meta): those are not fingerprinted."""
    try:
        if tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized or tensor.device.type == "meta":
            return None
        t = tensor.detach()
        if t.is_complex():
            t = torch.view_as_real(t.resolve_conj())
        t = t.resolve_neg().reshape(rows, -1).contiguous()
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[t.element_size()]
        t = t.view(word)
    except (KeyError, RuntimeError, TypeError):
        return None
    hashes = torch.zeros(rows, dtype=torch.long, device=t.device)
    columns = t.shape[1]
    row_step = max(1, _BLOCK // max(columns, 1))
    for r in range(0, rows, row_step):
        for c in range(0, columns, _BLOCK):
            block = t[r : r + row_step, c : c + _BLOCK].to(torch.long).bitwise_and_(0xFFFFFFFF)
            block.mul_(_position_weights(c, block.shape[1], t.device)).remainder_(_PRIME)
            hashes[r : r + row_step] += block.sum(1)
            hashes[r : r + row_step] %= _PRIME
    return hashes


def _tensor_leaves(batch: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor of ``batch`` (``batch[0]``, ``batch['x']``, ``batch.x``), in
    the order of :func:`lightning_influence.batches.tensors`."""
    if isinstance(batch, Tensor):
        yield path, batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            if f.init:
                yield from _tensor_leaves(getattr(batch, f.name), f"{path}.{f.name}")
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _tensor_leaves(value, f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)):
        for index, value in enumerate(batch):
            yield from _tensor_leaves(value, f"{path}[{index}]")


@dataclass(frozen=True, slots=True)
class _LeafPrint:
    """The fingerprint of one tensor of a batch: where it is, its dtype and shape, the fingerprint
    of the whole tensor (rows in order) and, for a per-sample tensor (leading dimension = the
    number of sample ids), the order-free sum of its rows' fingerprints, each keyed by its sample id."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    whole: int
    by_sample: int | None

    def describe(self) -> str:
        return f"{self.path} ({self.dtype.replace('torch.', '')} {list(self.shape)})"


def batch_fingerprint(batch: Any, ids: Tensor) -> tuple[_LeafPrint, ...]:
    """Cheap fingerprints of the tensors of ``batch`` (on any device), whose samples have the ids
    ``ids`` (CPU ``[B]``): a few integer operations per element, O(1) numbers per tensor kept.
    Identical tensors give identical fingerprints, exactly, on any device (integer arithmetic on
    their bits); other inputs give other fingerprints except with probability ~1e-9."""
    count = ids.numel()
    prints = []
    for path, tensor in _tensor_leaves(batch):
        per_sample = tensor.dim() > 0 and tensor.shape[0] == count
        rows = _row_hashes(tensor, count if per_sample else 1)
        if rows is None:
            continue
        rows = rows.cpu()
        order = _position_weights(0, rows.numel(), rows.device)
        whole = int((rows * order).remainder_(_PRIME).sum().remainder(_PRIME))
        by_sample = int((rows * _mixed(ids)).remainder_(_PRIME).sum().remainder(_PRIME)) if per_sample else None
        prints.append(_LeafPrint(sys.intern(path), sys.intern(str(tensor.dtype)), tuple(tensor.shape), whole, by_sample))
    return tuple(prints)


class _PassPrint:
    """Order-free fingerprints of a whole pass: per tensor position in the batch, the sum (mod
    ``_PRIME``) of its per-sample row fingerprints, and whether that tensor was per-sample with one
    shape per sample (``[B, *shape]``) in every batch. Only such tensors can be compared between
    passes that batch the samples differently (a shuffling loader; dynamic padding changes the
    rows' shapes with the batch, so a padded tensor is left out)."""

    def __init__(self) -> None:
        self.sums: dict[int, int] = {}
        self.shapes: dict[int, set[tuple[int, ...]]] = {}
        self.paths: dict[int, str] = {}
        self.dtypes: dict[int, str] = {}
        self.unusable: set[int] = set()
        self.structure: set[int] = set()

    def add(self, prints: tuple[_LeafPrint, ...]) -> None:
        self.structure.add(len(prints))
        for index, leaf in enumerate(prints):
            self.paths.setdefault(index, leaf.path)
            if leaf.by_sample is None or self.dtypes.setdefault(index, leaf.dtype) != leaf.dtype:
                self.unusable.add(index)
                continue
            self.sums[index] = (self.sums.get(index, 0) + leaf.by_sample) % _PRIME
            self.shapes.setdefault(index, set()).add(leaf.shape[1:])

    def differs_from(self, first: _PassPrint) -> str | None:
        """The tensor (described) whose order-free fingerprint differs from the ``first`` pass's, or
        ``None`` where every comparable tensor agrees."""
        if len(self.structure | first.structure) != 1:
            return None  # batches of several structures: the positions of the tensors do not correspond
        for index, total in self.sums.items():
            comparable = (
                index not in self.unusable | first.unusable
                and index in first.sums
                and len(self.shapes[index]) == 1
                and self.shapes[index] == first.shapes[index]
                and self.dtypes[index] == first.dtypes[index]
            )
            if comparable and total != first.sums[index]:
                shape = ", ".join(str(d) for d in next(iter(self.shapes[index])))
                return f"{self.paths[index]} ({self.dtypes[index].replace('torch.', '')} [B{', ' if shape else ''}{shape}])"
        return None


class TrainingPasses:
    """The training loader as a post-hoc estimator reads it, often several times (the target, the
    curvature, the scores; a pass per checkpoint or per target column): its batches on the
    module's device, each pass checked to hold the same samples, with the same inputs, as the
    first one.

    *Samples*: compared as a set, so a loader that shuffles the same samples is fine; one that
    draws another subset each pass (``shuffle=True`` with ``drop_last=True``, a sampler with
    replacement or ``num_samples`` below the dataset's length, a one-shot iterator) is refused at
    the first sample that differs, before a score mixes quantities of two different sets of
    samples (a curvature of one, the gradients of another).

    *Inputs*: every tensor of every batch is fingerprinted (:func:`batch_fingerprint`: exact integer
    hashes of its bits, O(1) numbers per tensor and batch). A batch that holds the same sample ids
    in the same order as the batch at its position on the first pass must have the same
    fingerprints, and so must, over a whole pass, every per-sample tensor whose rows keep one shape
    (the comparison a shuffling loader allows). A loader that serves other inputs on each pass (a
    random augmentation in the dataset, the collate function or the transfer hooks) is refused:
    Forward-INF's ``moved - base`` losses come from two passes and would be augmentation noise;
    other estimators would mix gradients of different inputs. Identical inputs always give
    identical fingerprints.

    ``batches(limit)`` reads the first ``limit`` batches only (a partial pass, such as
    ``hessian_batches``); partial passes of one ``limit`` are compared with each other (their
    batches with the first pass's batch at their position, too). A pass that its reader abandons
    early is compared batch by batch as far as it was read, not as a whole. Iterating the object
    (or passing it to :func:`device_batches`) reads a full pass; ``len()`` is the loader's."""

    def __init__(self, module: L.LightningModule, loader: Iterable[Any], owner: str) -> None:

        check_dataset_ids(loader, module)
        self.module, self.loader, self.owner = module, loader, owner
        self._reference: dict[int | None, Tensor] = {}  # limit -> sorted ids of the first complete pass
        # position -> (digest of the batch's ids in order, fingerprints of its tensors), from the first pass that read it
        self._batch_prints: list[tuple[bytes, tuple[_LeafPrint, ...]]] = []
        self._pass_prints: dict[int | None, _PassPrint] = {}  # limit -> order-free fingerprints of the first complete pass

    def __iter__(self) -> Iterator[Any]:
        return self.batches()

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError for a loader without len, as the loader's

    def batches(self, limit: int | None = None) -> Iterator[Any]:
        """One pass (the first ``limit`` batches, or all) on the module's device, checked."""
        reference = self._reference.get(limit)
        seen: list[Tensor] = []
        inputs = _PassPrint()
        for position, batch in enumerate(device_batches(self.module, self.loader)):
            if limit is not None and position >= limit:
                break
            ids = torch.as_tensor(self.module.sample_ids(batch)).detach().reshape(-1).to("cpu", torch.long)  # type: ignore[operator]
            check_unique_ids(ids, scope="batch")
            if reference is not None:
                stray = ids[~torch.isin(ids, reference)]
                if stray.numel():
                    raise ValueError(self._different(limit, f"sample id {int(stray[0])} is in this pass but not in the first"))
            prints = batch_fingerprint(batch, ids)
            self._check_batch(position, ids, prints)
            inputs.add(prints)
            seen.append(ids)
            yield batch
        ids = torch.cat(seen).unique() if seen else torch.zeros(0, dtype=torch.long)
        if reference is None:
            self._reference[limit] = ids
        elif not torch.equal(ids, reference):
            missing = reference[~torch.isin(reference, ids)]
            detail = (
                "this pass yielded no batch at all (a one-shot iterator or generator? pass a DataLoader or a list of batches)"
                if not seen
                else f"{missing.numel()} sample(s) of the first pass are missing from this one (e.g. sample id {int(missing[0])})"
            )
            raise ValueError(self._different(limit, detail))
        first = self._pass_prints.setdefault(limit, inputs)
        if first is not inputs:
            tensor = inputs.differs_from(first)
            if tensor is not None:
                raise ValueError(
                    different_inputs_message(
                        self.owner,
                        f"over the whole pass, the per-sample rows of {tensor} hold other values than on the first pass, "
                        "although the pass holds the same samples (the loader batches them in another order, so the pass is "
                        "compared as a whole; with shuffle=False the message names the batch)",
                    )
                )

    def _check_batch(self, position: int, ids: Tensor, prints: tuple[_LeafPrint, ...]) -> None:
        """Compare batch ``position`` with the first pass's batch there, if it holds the same ids in
        the same order (always, for a loader that does not shuffle); record it if it is the first."""
        order = hashlib.blake2b(ids.contiguous().numpy().tobytes(), digest_size=16).digest()
        if position == len(self._batch_prints):
            self._batch_prints.append((order, prints))
            return
        first_order, first = self._batch_prints[position]
        if order != first_order or prints == first:
            return
        if len(prints) != len(first):
            what = f"it holds {len(prints)} tensor(s) where the first pass's held {len(first)}"
        else:
            now, then = next((a, b) for a, b in zip(prints, first) if a != b)
            what = (
                f"its tensor {now.describe()} holds other values than on the first pass"
                if (now.path, now.dtype, now.shape) == (then.path, then.dtype, then.shape)
                else f"its tensor {now.describe()} was {then.describe()} on the first pass"
            )
        raise ValueError(
            different_inputs_message(
                self.owner,
                f"training batch {position} (counted from 0) holds the same sample ids in the same order as on the first "
                f"pass, but {what}",
            )
        )

    def _different(self, limit: int | None, detail: str) -> str:
        return different_passes_message(self.owner, detail, limit)


def different_inputs_message(owner: str, detail: str) -> str:
    """The refusal of a training loader that serves other inputs for the same samples on two
    passes (one wording for every estimator that reads the loader more than once)."""
    return (
        f"the training loader served different inputs on two passes: {detail}. {owner} reads the training loader more "
        "than once and combines what it computes on each pass, so every pass must serve the same inputs; this loader "
        "serves different inputs on each pass (a random augmentation in the dataset's transforms, the collate_fn or "
        "the module's transfer hooks?), so its scores would mix quantities of different inputs: augmentation noise "
        "(Forward-INF's would be mostly noise). Score with a loader without augmentation, e.g. DataLoader(<the same "
        "dataset with its evaluation transforms>, batch_size=..., shuffle=False), keeping the same sample ids"
    )


def different_passes_message(owner: str, detail: str, limit: int | None = None) -> str:
    """The refusal of a training loader whose passes hold different samples (one wording for every
    estimator that reads the loader more than once)."""
    what = "the training loader" if limit is None else f"the first {limit} batches of the training loader"
    return (
        f"{what} yielded different samples on two passes: {owner} reads it more than once and needs the same samples "
        f"every pass ({detail}). A loader that draws another subset each epoch does this: shuffle=True with "
        "drop_last=True, a sampler with replacement or with num_samples below the dataset's length. Score with a "
        "loader that yields every training sample once, e.g. DataLoader(train_set, batch_size=..., shuffle=False) "
        "(the order does not matter to post-hoc estimators)"
    )


def posthoc_training(
    module: L.LightningModule, train_loader: Iterable[Any], owner: str, *, differentiates: bool = True, alone: bool = False
) -> TrainingPasses:
    """The training loader of a post-hoc estimator as :class:`TrainingPasses`, after the checks every
    post-hoc estimator makes before any heavy work: the module is influence-aware, the loader
    yields a batch, and (``differentiates``: the estimator takes gradients of the per-sample
    losses) ``per_sample_loss`` of the first training batch is a floating-point ``Tensor[B]``, one
    loss per sample id, that depends on the trainable parameters. Every later pass is checked to
    serve the same samples and inputs (:class:`TrainingPasses`). ``alone``: the estimator takes
    each sample's gradient from its loss evaluated alone (a batch of one), which a declared coupled
    batch loss does not define: refused. Called by every post-hoc estimator at the top of
    ``scores``; a ``TrainingPasses`` passed in is returned as it is."""
    if alone and getattr(module, "coupled_batch_loss", False):
        raise ValueError(
            f"{type(module).__name__} declares coupled_batch_loss (a sample's loss depends on the other samples of its "
            f"batch), but {owner} takes each sample's gradient from its loss evaluated alone, as a batch of one, which a "
            "coupled loss does not define (InfoNCE of a single pair is 0). Score it with DiffIn, which removes a sample "
            "from its batch, or with an estimator that evaluates the losses within their batches (influence_function, "
            "tracin, tracin_checkpoints)"
        )

    if isinstance(train_loader, TrainingPasses):
        return train_loader
    check_influence_aware(module)
    passes = TrainingPasses(module, train_loader, owner)
    if differentiates:
        first = next(iter(passes.batches(limit=1)), None)
        if first is None:
            raise ValueError(f"the training loader produced no batches: {owner} has nothing to score")
        check_differentiable_losses(module, first, owner)
        _warn_coupled(module, first, owner)
    return passes


def _warn_coupled(module: L.LightningModule, batch: Any, owner: str) -> None:
    """Post-hoc estimators treat per-sample losses as independent: warn where a removal would also
    change the other samples' losses in its batch (declared, or found on the first batch)."""

    name = type(module).__name__
    if getattr(module, "coupled_batch_loss", False):
        message = (
            f"{name} declares coupled_batch_loss: removing a sample also changes the other samples' losses in its batch "
            f"(in-batch negatives), which {owner}, built on each sample's own loss, does not see, so its scores depend on "
            "the loader's batch size. DiffIn scores coupled removals"
        )
    else:
        change = undeclared_coupling(module, batch)
        if change is None:
            return
        message = coupling_message(module, change) + f". ({owner} itself scores each sample's own loss only)"
    rank_zero_warn(message)


def check_unique_ids(ids: Tensor, scope: str = "pass") -> None:
    """Refuse ``ids`` of one training ``scope`` (``"batch"`` or ``"pass"``) that hold a sample id
    twice: post-hoc estimators score each training sample once. The usual cause is batches without
    ids, whose labels the default ``sample_ids`` reads instead. (A loader that repeats whole epochs
    is fine where only batches are checked: each sample keeps its one score.)"""
    unique, counts = ids.unique(return_counts=True)
    if bool((counts > 1).any()):
        first, repeated = int(unique[counts > 1][0]), int((counts > 1).sum())
        where = (
            f"a training batch holds sample id {first} more than once ({repeated} of {unique.numel()} ids repeat in a batch "
            f"of {ids.numel()}): post-hoc estimators score each training sample once"
            if scope == "batch"
            else f"the training loader yields sample id {first} more than once in one pass ({repeated} of {unique.numel()} ids "
            "repeat): post-hoc estimators need each training sample exactly once (one epoch, no repeats)"
        )
        raise ValueError(
            f"{where}. If the batches carry no sample ids, the default sample_ids(batch) reads their last element (the "
            "labels?) as ids: wrap the dataset, DataLoader(lightning_influence.IndexedDataset(dataset), ...), or override "
            "sample_ids(batch); a sampler drawing with replacement repeats samples too: score with a plain loader"
        )


def check_differentiable_losses(module: L.LightningModule, batch: Any, owner: str) -> None:
    """``per_sample_loss(batch)``, computed in evaluation mode with autograd on, must be an unreduced
    floating-point ``Tensor[B]`` (one loss per sample id) that depends on the trainable parameters:
    the messages of the DiffIn callback's first-batch check
    (:func:`~lightning_influence.checks.check_losses`), raised before a post-hoc estimator
    differentiates anything."""
    from lightning_influence.kernels import evaluation_mode

    ids = torch.as_tensor(module.sample_ids(batch)).reshape(-1)  # type: ignore[operator]
    with evaluation_mode(module), torch.enable_grad():
        losses = module.per_sample_loss(batch)  # type: ignore[operator]
    check_losses(losses, ids, requires_grad=True, owner=owner, batch=batch, module=module)


def non_finite_samples_error(owner: str, ids: Tensor, what: str, batches: Iterable[int] | None = None, detail: str = "") -> ValueError:
    """The refusal of training samples (``ids``) whose loss or gradient is not finite: one wording
    for every post-hoc estimator, naming the samples (up to 10) and, when known, the positions of
    their batches in the training loader; ``detail``: how it was found."""
    ids = torch.as_tensor(ids).reshape(-1).cpu()
    shown = ids[:10].tolist()
    more = f" and {ids.numel() - 10} more" if ids.numel() > 10 else ""
    where = ""
    if batches is not None:
        positions = sorted(set(batches))
        where = f" (training batch{'es' if len(positions) > 1 else ''} {', '.join(str(b) for b in positions[:10])}{' ...' if len(positions) > 10 else ''}, counted from 0)"
    return ValueError(
        f"{owner}: the {what} of training sample id{'s' if ids.numel() > 1 else ''} {shown}{more}{where} "
        f"{'are' if ids.numel() > 1 else 'is'} not finite (NaN or inf){f' (detected because {detail})' if detail else ''}, so every score "
        "would be NaN or meaningless. Check "
        "these samples for NaN/inf inputs (torch.isfinite) and the loss for log(0) or division by zero; repair them or "
        "leave them out of the training loader, then score again"
    )


def non_finite_training_error(
    module: L.LightningModule, batches: Iterable[Any], owner: str, found: str, params: list[str] | None = None
) -> ValueError:
    """The refusal of a training set on which a quantity of the whole set (``found``: a curvature,
    its trace, a Kronecker factor) came out non-finite. Called on that error path only, it reads
    ``batches`` (on the module's device) once more to name the samples at fault: those whose loss is
    not finite, else those whose gradient (with respect to the attributed ``params``) is not; if
    every loss and gradient is finite, the message says the curvature itself overflowed."""
    from lightning_influence.kernels import evaluation_mode, per_sample_gradients

    space, theta, loss_fn = attributed_space(module, params)
    bad_ids: list[Tensor] = []
    positions: list[int] = []
    kinds: set[str] = set()
    with evaluation_mode(module):
        for position, batch in enumerate(batches):
            ids = torch.as_tensor(module.sample_ids(batch)).reshape(-1).cpu()  # type: ignore[operator]
            with torch.no_grad():
                losses = module.per_sample_loss(batch)  # type: ignore[operator]
            bad = ~torch.isfinite(losses.detach()).reshape(-1).cpu()
            if bool(bad.any()):
                kinds.add("loss")
            else:
                bad = ~torch.isfinite(per_sample_gradients(loss_fn, space, theta, batch)).all(1).cpu()
                if bool(bad.any()):
                    kinds.add("loss gradient")
            if bool(bad.any()):
                bad_ids.append(ids[bad])
                positions.append(position)
    if bad_ids:
        what = " or ".join(sorted(kinds, key=len))
        return non_finite_samples_error(owner, torch.cat(bad_ids), what, positions, detail=found)
    return ValueError(
        f"{owner}: {found}, although every training sample's loss and gradient is finite: the curvature overflowed "
        "(model outputs or a loss whose second derivatives are huge or not finite, e.g. in float16/bfloat16). Score in "
        "float32 or float64, or check the model's outputs and the loss"
    )
