"""Math kernels: flat parameter vectors, per-sample directional derivatives and
finite-difference Hessian-vector products.

Everything here works on a *functional* view of a module: parameters are passed
as a ``{name: tensor}`` dict, so the module's own parameters are never touched.
Per-sample gradients are never materialised: a per-sample directional
derivative ``<grad l_i(theta), v>`` for every sample of a batch is one
forward-mode pass of the vector of per-sample losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import weakref
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from lightning_influence.batches import batch_chunks, batch_size, map_tensors, select_samples, tensors

PerSampleLossFn = Callable[[Mapping[str, Tensor], Any], Tensor]
"""``(params, batch) -> Tensor[B]``: unreduced per-sample losses at ``params``."""

FiniteDifference = Literal["forward", "central"]

_MODE_DEPENDENT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class ParameterSpace:
    """An ordered set of named parameters, viewed as one flat vector.

    The flat layout is the concatenation of ``param.reshape(-1)`` in ``names`` order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_parameters(cls, named: Sequence[tuple[str, Tensor]]) -> ParameterSpace:
        if not named:
            raise ValueError("no trainable parameters to attribute: every parameter is frozen or unused")
        lazy = [n for n, p in named if nn.parameter.is_lazy(p)]
        if lazy:
            raise ValueError(
                f"parameter {lazy[0]!r}{f' (and {len(lazy) - 1} more)' if len(lazy) > 1 else ''} is still uninitialised "
                "(a lazy module such as nn.LazyLinear, whose shape is set by its first forward pass): the influence "
                "callbacks and recorders lay the parameters out when fit starts, before any training forward. Run one "
                "forward pass on an example batch before fit, e.g. at the end of the module's __init__ or in its "
                "setup() (self(example_input)), so that lazy modules have their shapes"
            )
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"attributed parameters must share one dtype and device, got dtypes {sorted(map(str, dtypes))} "
                f"and devices {sorted(map(str, devices))}"
            )
        return cls(
            names=tuple(n for n, _ in named),
            shapes=tuple(p.shape for _, p in named),
            dtype=dtypes.pop(),
            device=devices.pop(),
        )

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor | None], dtype: torch.dtype | None = None) -> Tensor:
        """One flat vector from per-parameter tensors (``None`` entries count as zeros)."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        parts = []
        for t, shape in zip(tensors, self.shapes, strict=True):
            if t is None:
                t = torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)
            parts.append(t.detach().reshape(-1).to(dtype or self.dtype))
        return torch.cat(parts)

    def unflatten(self, vector: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """``{name: view}`` of a flat vector, cast to ``dtype`` (default: the parameters' dtype)."""
        if vector.shape != (self.size,):
            raise ValueError(f"expected a flat vector of {self.size} entries, got shape {tuple(vector.shape)}")
        vector = vector.to(dtype or self.dtype)
        return {n: c.view(s) for n, c, s in zip(self.names, vector.split(self.numels), self.shapes, strict=True)}

    def expand(self, per_parameter: Tensor) -> Tensor:
        """Repeat one scalar per parameter tensor to the flat layout (e.g. per-group learning rates)."""
        return per_parameter.repeat_interleave(torch.tensor(self.numels, device=per_parameter.device))


def parameter_names(module: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of ``module``, by ``id``: a tied parameter (an output layer
    sharing the embedding's weight) has several, its ``named_parameters()`` name first."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def matches_any(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Does one of a parameter's ``names`` match one of the fnmatch ``patterns``?"""
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def per_sample_loss_function(module: nn.Module, method: str = "per_sample_loss") -> PerSampleLossFn:
    """A functional ``(params, batch) -> Tensor[B]`` that calls ``module.<method>(batch)``
    with the given parameters swapped in (``torch.func.functional_call``); the
    parameters not named in ``params`` keep their current values."""
    wrapper = _MethodCall(module, method)

    def loss_fn(params: Mapping[str, Tensor], batch: Any) -> Tensor:
        prefixed = {f"inner.{n}": p for n, p in params.items()}
        losses = torch.func.functional_call(wrapper, prefixed, (batch,), strict=False)
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"{type(module).__name__}.{method}(batch) must return an unreduced Tensor[B] (one loss per sample), got "
                f"{shape}: compute the loss without reduction (e.g. F.cross_entropy(logits, y, reduction='none'))"
            )
        return losses

    return loss_fn


class _MethodCall(nn.Module):
    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self._method = method

    def forward(self, batch: Any) -> Tensor:
        # A LightningModule compiled as a whole (torch.compile(model) given to the Trainer) has its
        # forward replaced by the compiled one, which forward-mode AD and functional calls do not go
        # through: evaluate with the original forward (the same function, uncompiled).
        ctx = getattr(self.inner, "_compiler_ctx", None)
        original = ctx.get("original_forward") if isinstance(ctx, dict) else None
        if original is None:
            return getattr(self.inner, self._method)(batch)
        compiled = self.inner.__dict__.get("forward")
        self.inner.forward = original
        try:
            return getattr(self.inner, self._method)(batch)
        finally:
            if compiled is None:
                del self.inner.forward
            else:
                self.inner.forward = compiled


def directional_derivatives(
    loss_fn: PerSampleLossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    tangent: Mapping[str, Tensor],
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample losses and their directional derivatives ``<grad l_i(params), tangent>``.

    One forward-mode pass for the whole batch (or per chunk of at most ``chunk_size`` samples,
    :func:`batch_chunks`, to bound its memory): the parameters become dual tensors
    (``torch.autograd.forward_ad``, the mechanism under ``torch.func.jvp``, without its
    per-call tracing overhead, which is 10-100x the pass itself on small models).
    Returns ``(losses[B], derivatives[B])``.
    """
    chunks = batch_chunks(batch, chunk_size)
    if len(chunks) > 1:
        parts = [directional_derivatives(loss_fn, params, chunk, tangent) for chunk, _ in chunks]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if _known_reverse(loss_fn):
        return _reverse_mode(loss_fn, params, batch, tangent)
    try:
        return _forward_mode(loss_fn, params, batch, tangent, autograd=False)
    except NotImplementedError as err:
        if not forward_mode_unsupported(err):
            raise
        first = err
    # Fused kernels without forward-mode formulas: TransformerEncoderLayer's inference "fast path" (taken
    # only without autograd) and fused attention (the math backend is plain operations). Once more without.
    try:
        return _forward_mode(loss_fn, params, batch, tangent, autograd=True)
    except NotImplementedError as err:
        if not forward_mode_unsupported(err):
            raise
    # An operation without a forward-mode formula (nn.EmbeddingBag, a submodule compiled with inductor): the
    # same values from reverse mode, one backward pass per sample (vectorised where the backward allows it).
    warn_reverse_mode(first)
    try:
        _FORWARD_MODE_UNSUPPORTED.add(loss_fn)
    except TypeError:  # not weakly referable: tried again next time
        pass
    return _reverse_mode(loss_fn, params, batch, tangent)


def _known_reverse(loss_fn: Any) -> bool:
    try:
        return loss_fn in _FORWARD_MODE_UNSUPPORTED
    except TypeError:
        return False


def forward_mode_unsupported(err: NotImplementedError) -> bool:
    """Whether ``err`` is an operation's lack of a forward-mode formula (a built-in one, or a custom
    ``autograd.Function`` without ``jvp``, as inductor's compiled graphs are)."""
    text = str(err)
    return "forward AD" in text or "forward mode AD" in text


REVERSE_MODE_BYTES = 2**28
"""Memory for the gradients of one batched backward pass in :func:`reverse_jacobian_products` (256 MiB)."""

REVERSE_MODE_ROWS = 16
"""At most this many outputs per batched backward pass: its intermediate gradients grow with the rows
times the whole batch's activations, which the parameter bound does not see."""

_FORWARD_MODE_UNSUPPORTED: weakref.WeakSet[Any] = weakref.WeakSet()
"""Loss functions found to need reverse mode: later calls go there directly."""

_REVERSE_MODE_WARNED: set[str] = set()


def warn_reverse_mode(err: Exception) -> None:
    """Warn once per process and operation that forward-mode derivatives fall back to reverse mode."""
    key = str(err).split("\n")[0]
    if key in _REVERSE_MODE_WARNED:
        return
    _REVERSE_MODE_WARNED.add(key)
    warnings.warn(
        f"forward-mode AD is not supported by an operation of the model ({key}); the directional derivatives are "
        "computed in reverse mode instead, about one backward pass per sample and direction (per output with "
        "Gauss-Newton curvature): the same values, many times slower on large batches. nn.EmbeddingBag is one such operation (nn.Embedding followed by a masked "
        "mean is not); a submodule compiled with torch.compile (inductor) is another: compile the LightningModule as a "
        "whole instead (torch.compile(model) passed to Trainer.fit; the original forward is then differentiated). "
        "DiffIn's per_sample='finite_difference' (its default on smooth models) needs neither",
        RuntimeWarning,
        stacklevel=3,
    )


def reverse_jacobian_products(compute: Callable[[], Tensor], inputs: Sequence[Tensor], directions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(outputs, J D)``: the flat ``outputs [M]`` that ``compute()`` evaluates (with autograd on, from
    ``inputs``) and, float64 ``[M, K]``, their Jacobian ``J [M, P]`` by ``inputs`` times ``K`` directions given
    per input (``[K, *input.shape]``), in reverse mode: batched backward passes over rows of the identity
    (``is_grads_batched``, rows bounded by :data:`REVERSE_MODE_BYTES`), else one backward pass per output
    (a backward without a batching rule), else one forward and backward pass per output (a compiled backward
    that cannot run twice on one graph)."""
    columns = directions[0].shape[0]
    flat_directions = [d.reshape(columns, -1) for d in directions]

    def product(grads: Sequence[Tensor | None], rows: int, device: torch.device) -> Tensor:
        total = torch.zeros(rows, columns, dtype=torch.float64, device=device)
        for g, d in zip(grads, flat_directions, strict=True):
            if g is not None:
                total += (g.reshape(rows, -1).to(d.dtype) @ d.T).to(torch.float64)
        return total

    with torch.enable_grad():
        outputs = compute()
        size, device = outputs.shape[0], outputs.device
        if size == 0:
            return outputs.detach(), torch.zeros(0, columns, dtype=torch.float64, device=device)
        numel = sum(p.numel() * p.element_size() for p in inputs)
        rows = max(1, min(size, REVERSE_MODE_ROWS, REVERSE_MODE_BYTES // max(1, numel + size * outputs.element_size())))
        out: list[Tensor] = []
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap's slower fallback: still exact
                for start in range(0, size, rows):
                    count = min(rows, size - start)  # rows start .. start + count - 1 of the identity
                    block = torch.zeros(count, size, dtype=outputs.dtype, device=device)
                    block[torch.arange(count, device=device), torch.arange(start, start + count, device=device)] = 1
                    grads = torch.autograd.grad(outputs, list(inputs), grad_outputs=block, is_grads_batched=True, retain_graph=True, allow_unused=True)
                    out.append(product(grads, block.shape[0], device))
            return outputs.detach(), torch.cat(out)
        except (RuntimeError, NotImplementedError):
            pass
        try:  # a backward without a batching rule
            out = [product(torch.autograd.grad(outputs[i], list(inputs), retain_graph=True, allow_unused=True), 1, device) for i in range(size)]
        except RuntimeError:  # a graph whose backward runs once (inductor's donated buffers): one forward per output
            out = [product(torch.autograd.grad(compute()[i], list(inputs), allow_unused=True), 1, device) for i in range(size)]
        return outputs.detach(), torch.cat(out)


def _reverse_mode(
    loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, tangent: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(losses[B], <grad l_i, tangent>[B])`` in reverse mode (:func:`reverse_jacobian_products` of the losses)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    directions = [tangent[n].to(p.dtype).unsqueeze(0) for n, p in leaves.items()]
    losses, derivatives = reverse_jacobian_products(lambda: loss_fn(leaves, batch), list(leaves.values()), directions)
    return losses, derivatives[:, 0].to(losses.dtype)


def _forward_mode(
    loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, tangent: Mapping[str, Tensor], autograd: bool
) -> tuple[Tensor, Tensor]:
    fused = contextlib.nullcontext() if not autograd else sdpa_kernel([SDPBackend.MATH])
    with torch.set_grad_enabled(autograd), fused, fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach().requires_grad_(autograd), tangent[n].to(p.dtype)) for n, p in params.items()}
        out = fwAD.unpack_dual(loss_fn(duals, batch))
        derivative = out.tangent if out.tangent is not None else torch.zeros_like(out.primal)
        return out.primal.detach(), derivative.detach()


FUNCTIONAL_GRADIENT_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
"""Relative tolerance of :func:`check_functional_gradient` per parameter dtype (5e-2 for others)."""

FUNCTIONAL_CALL_ADVICE = (
    "Part of the loss reads the module's own parameters instead of those passed in: activation checkpointing "
    "(torch.utils.checkpoint, use_reentrant True or False) does so when it recomputes the forward in the backward "
    "pass, and so does a module that keeps its own reference to a weight tensor (e.g. in a list, for tying). Turn "
    "activation checkpointing off for this computation (a flag on the module that forward reads; it does not change "
    "the values, so a recorded run stays valid), and read weights through their owning module at every forward"
)


def shifted_point(params: Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """``params`` moved by a fixed random amount (0.1 of each tensor's RMS plus 0.01, Gaussian):
    a point where the module's own values and passed-in ones are told apart."""
    generator = torch.Generator().manual_seed(seed)
    point: dict[str, Tensor] = {}
    for name, p in params.items():
        p = p.detach()
        rms = float(p.double().pow(2).mean().sqrt()) if p.numel() else 0.0
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
        point[name] = p + (0.1 * rms + 0.01) * noise
    return point


def module_gradient(module: nn.Module, point: Mapping[str, Tensor], batch: Any, method: str = "per_sample_loss") -> dict[str, Tensor] | None:
    """Plain-autograd gradient of ``module.<method>(batch).mean()`` with the values of ``point``
    (parameters, and buffers by name) written into the module's own tensors, as ``{name: grad}``
    for the parameters in ``point``. Uses ``backward()`` as training does (reentrant activation
    checkpointing refuses ``torch.autograd.grad``). The module's tensors and ``.grad`` fields are
    restored bit for bit. ``None`` when a value does not fit the module's tensor of its name."""
    params = dict(module.named_parameters())
    tensors = {**dict(module.named_buffers()), **params}
    if any(n not in tensors or tensors[n].shape != v.shape or tensors[n].dtype != v.dtype for n, v in point.items()):
        return None
    saved = {n: t.detach().clone() for n, t in tensors.items()}
    saved_grads = {n: p.grad for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, v in point.items():
                tensors[n].copy_(v)
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            _MethodCall(module, method)(batch).mean().backward()
        return {n: torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.detach().clone() for n in point if n in params}
    finally:
        with torch.no_grad():
            for n, t in tensors.items():
                t.copy_(saved[n])
        for n, p in params.items():
            p.grad = saved_grads[n]


def check_functional_gradient(
    module: nn.Module,
    functional_gradient: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
    params: Mapping[str, Tensor],
    batch: Any,
    held: Mapping[str, Tensor] | None = None,
    owner: str = "this computation",
    random_advice: str | None = None,
) -> None:
    """Refuse a loss that does not see the parameters a functional evaluation passes in.

    ``random_advice``: what to do about a forward that draws random numbers, for an ``owner`` that
    evaluates the module in training mode (default: the advice for evaluation mode, where
    ``nn.Dropout`` and ``training=self.training`` switch the randomness off).

    At :func:`shifted_point` of ``params`` (so that passed-in and own values differ), the gradient
    ``functional_gradient(point)`` (``{name: grad}``) must equal :func:`module_gradient` of the
    module holding the same values (and ``held``: buffers the evaluation passes in too) to
    :data:`FUNCTIONAL_GRADIENT_RTOL` of its norm. Raises ``ValueError`` naming ``owner`` and the
    fix (:data:`FUNCTIONAL_CALL_ADVICE`); if plain autograd fails as well, its own error is raised.
    """
    name = type(module).__name__
    point = shifted_point(params)
    failure: Exception | None = None
    functional: Mapping[str, Tensor] = {}
    try:
        functional = functional_gradient(point)
    except (RuntimeError, NotImplementedError) as err:
        failure = err
    try:
        reference = module_gradient(module, {**(held or {}), **point}, batch)
    except Exception:
        if failure is not None:  # plain autograd fails too: the model's own error, not the functional call's
            raise failure from None
        raise
    if reference is None:
        if failure is not None:
            raise failure
        return
    if failure is not None:
        raise ValueError(
            f"{owner} evaluates {name}.per_sample_loss functionally (torch.func.functional_call with the parameters "
            f"passed in), which fails although plain autograd on the module works: {str(failure).rstrip('.')}. "
            f"{FUNCTIONAL_CALL_ADVICE}"
        ) from failure
    def dense(t: Tensor) -> Tensor:  # sparse gradients (nn.Embedding(sparse=True)) compare as dense tensors
        return (t.to_dense() if t.is_sparse else t).double()

    errors = {n: float(torch.linalg.vector_norm(dense(functional[n]) - dense(reference[n]))) for n in point}
    total = math.sqrt(sum(e * e for e in errors.values()))
    scale = math.sqrt(sum(float(torch.linalg.vector_norm(dense(reference[n]))) ** 2 for n in point))
    rtol = max(FUNCTIONAL_GRADIENT_RTOL.get(v.dtype, 5e-2) for v in point.values())
    if total > rtol * scale + 1e-30:
        again = module_gradient(module, {**(held or {}), **point}, batch)
        assert again is not None
        spread = math.sqrt(sum(float(torch.linalg.vector_norm(dense(again[n]) - dense(reference[n]))) ** 2 for n in point))
        if spread > rtol * scale + 1e-30:
            advice = random_advice or (
                "in evaluation mode, gave gradients {spread} apart (relative): the forward draws random numbers that eval "
                "mode does not switch off, e.g. F.dropout(x, p) with training=True hard-wired, added noise or a sampled "
                "latent. Use nn.Dropout or F.dropout(x, p, training=self.training), and make other randomness depend on "
                "self.training"
            )
            raise ValueError(
                f"{owner} needs a deterministic {name}.per_sample_loss, but two evaluations at the same parameters, "
                + advice.format(spread=f"{spread / max(scale, 1e-300):.2e}")
            )
        worst = sorted(point, key=lambda n: -errors[n])[:3]
        raise ValueError(
            f"{owner} evaluates {name}.per_sample_loss functionally (torch.func.functional_call with the parameters "
            f"passed in), and its gradient there differs from plain autograd on the module holding the same values "
            f"(relative difference {total / max(scale, 1e-300):.2e}, most in {', '.join(worst)}). {FUNCTIONAL_CALL_ADVICE}"
        )


def batch_gradient(loss_fn: PerSampleLossFn, space: ParameterSpace, theta: Tensor, batch: Any) -> Tensor:
    """Flat gradient of the batch-mean loss at the flat point ``theta`` (parameters' dtype)."""
    return losses_and_gradient(loss_fn, space, theta, batch)[1]


class SampleWeights:
    """The sample weights ``w [B]`` of one forward pass: ones, created as an autograd leaf by the
    first layer that asks for them (a layer that couples the batch's samples, e.g. batch norm's
    statistics, weighting each sample's rows) or else by the loss's weighted mean (see
    :func:`weighted_batch_loss`)."""

    def __init__(self, values: Tensor | None = None) -> None:
        self.tensor: Tensor | None = values
        """The weights (``values``: given ones, e.g. 0/1 to evaluate a sub-batch through the weighted layers)."""
        self.auxiliary: list[AuxiliaryObjective] = []
        """Terms the weighted forward adds to the objective of its gradient pass (see :class:`AuxiliaryObjective`)."""

    def get(self, size: int, like: Tensor, where: str = "") -> Tensor:
        """The weights for ``size`` samples (``like``'s dtype and device); raises if an earlier
        request (another layer of the same forward) saw another number of samples."""
        if self.tensor is None:
            self.tensor = torch.ones(size, dtype=like.dtype, device=like.device, requires_grad=True)
        elif self.tensor.shape[0] != size:
            raise SampleWeightsError(
                f"{where or 'a layer'} received {size} rows where the batch's first weighted layer received "
                f"{self.tensor.shape[0]} (sample weights need every weighted layer's rows to be the batch's samples)"
            )
        return self.tensor


class SampleWeightsError(ValueError):
    """A weighted layer or the loss saw another number of samples than the batch's weights."""


class AuxiliaryObjective(Protocol):
    """A term that a weighted forward (a :data:`SampleWeighting` context, which appends it to
    :attr:`SampleWeights.auxiliary`) adds to the objective of the gradient pass of
    :func:`losses_and_gradient` or :func:`shifted_losses`, so that the pass differentiates it with the
    batch loss at no extra pass (e.g. batch norm's running statistics along their adjoint): the
    parameters' gradient, and the sample weights' behind the removal losses, then hold its share."""

    def objective(self) -> Tensor | None:
        """After the forward: the scalar added to the batch loss (``None``: nothing)."""
        ...


def _weighted_objective(total: Tensor, weights: SampleWeights) -> Tensor:
    """The pass's objective: the batch loss ``total`` plus the auxiliary terms of ``weights``."""
    objective = total
    for term in weights.auxiliary:
        value = term.objective()
        if value is not None:
            objective = objective + value.to(total.dtype)
    return objective


SampleWeighting = Callable[[SampleWeights], contextlib.AbstractContextManager[None]]
"""``weighting(weights)``: a context in which the module's forward weights each sample of its
batch by ``weights`` wherever it couples samples (e.g.
:meth:`~lightning_influence.estimators.diffin_batch_norm.BatchNormTrace.sample_weighting`)."""


def weighted_batch_loss(
    loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, weighting: SampleWeighting, holder: SampleWeights | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(losses [B], weights [B], L)``: the per-sample losses of a forward run under ``weighting``
    with unit weights (an autograd leaf) and the weighted batch loss
    ``L(w) = sum_i w_i l_i(w) / sum_i w_i``, which at ``w = 1`` is the batch's mean loss. Run with
    autograd enabled and differentiate ``L`` by the weights for :func:`removal_losses`. ``holder``:
    the forward's :class:`SampleWeights` (fresh ones by default), e.g. to read its auxiliary terms."""
    weights = SampleWeights() if holder is None else holder
    with weighting(weights):
        losses = loss_fn(params, batch)
    if losses.dim() != 1:
        raise SampleWeightsError(f"per_sample_loss returned shape {tuple(losses.shape)}; expected one loss per sample, [B]")
    w = weights.get(losses.shape[0], losses, "the per-sample loss")
    return losses, w, (w * losses).sum() / w.sum()


def removal_losses(total: Tensor, weights: Tensor, weight_gradient: Tensor) -> Tensor:
    """Each sample's *removal loss* ``v_i = L + b dL/dw_i`` at ``w = 1`` (``b`` samples; ``L`` and
    its gradient by the weights from :func:`weighted_batch_loss`), detached, in the loss's units.

    The loss of a batch without ``z`` is, to first order, ``L(B \\ z) = L(B) + (L - v_z) / (b - 1)``:
    along ``w = 1 - t e_z`` every weighted mean is affine in ``s = t / (b - t)`` and the removal is
    ``t = 1``, ``s = 1 / (b - 1)``, so ``dL/ds = -b dL/dw_z``; the error is second order in the
    step ``1 / (b - 1)`` (the curvature of the batch's statistics, e.g. batch norm's variance, in
    ``s``). For losses that do not couple samples ``v_i = l_i`` and the formula is exact. ``mean v = L``
    (``L`` does not change when every weight is scaled alike), so ``v`` replaces the per-sample
    losses wherever the removal is ``(mean - value_z) / (b - 1)``: differences along a tangent of
    ``v`` give the removal's derivatives at the cost of a gradient pass, instead of ``b`` passes
    over the sub-batches (:func:`removal_derivatives`)."""
    return total.detach() + weights.numel() * weight_gradient.detach()


def losses_and_gradient(
    loss_fn: PerSampleLossFn,
    space: ParameterSpace,
    theta: Tensor,
    batch: Any,
    chunk_size: int | None = None,
    flat: bool = True,
    weighting: SampleWeighting | None = None,
) -> tuple[Tensor, Tensor | list[Tensor]]:
    """Per-sample losses ``[B]`` (detached) and the flat gradient of their mean at the flat point
    ``theta`` (parameters' dtype): one forward and one backward pass (per chunk of at most
    ``chunk_size`` samples, see :func:`batch_chunks`). ``flat=False``: the gradient as one tensor
    per parameter, in ``space``'s order (saves the parameter-sized copy into a flat vector).
    ``weighting``: the forward couples the batch's samples (batch norm): the losses returned are
    the :func:`removal_losses` (from the same backward pass), and the batch is one chunk; the
    weighting's :class:`AuxiliaryObjective` terms are differentiated with the loss (the gradient is
    then that of the loss plus the terms, and so are the weights' gradients behind the removal losses)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in space.unflatten(theta).items()}
    if weighting is not None:
        if chunk_size is not None:
            raise ValueError("chunk_size splits a batch whose forward couples its samples (sample weighting): leave chunk_size=None")
        holder = SampleWeights()
        with torch.enable_grad():
            _, weights, total = weighted_batch_loss(loss_fn, leaves, batch, weighting, holder)
            *grads, by_weight = torch.autograd.grad(_weighted_objective(total, holder), [*leaves.values(), weights], allow_unused=True)
        values = removal_losses(total, weights, by_weight)
        parts = [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves.values(), strict=True)]
        return values, (space.flatten(parts) if flat else parts)
    chunks = batch_chunks(batch, chunk_size)
    total_size = sum(n for _, n in chunks)
    every: list[Tensor] = []
    total: Tensor | list[Tensor] | None = None
    for chunk, n in chunks:
        with torch.enable_grad():
            losses = loss_fn(leaves, chunk)
            grads = torch.autograd.grad(losses.mean(), list(leaves.values()), allow_unused=True)
        every.append(losses.detach())
        weight = n / total_size
        if flat:
            vector = space.flatten(list(grads))
            vector = vector if len(chunks) == 1 else vector.mul_(weight)
            total = vector if total is None else total.add_(vector)  # type: ignore[union-attr]
            continue
        parts = [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves.values(), strict=True)]
        if len(chunks) > 1:
            torch._foreach_mul_(parts, weight)
        if total is None:
            total = parts
        else:
            torch._foreach_add_(total, parts)  # type: ignore[arg-type]
    assert total is not None
    return (every[0] if len(every) == 1 else torch.cat(every)), total


def difference_derivatives(
    loss_fn: PerSampleLossFn,
    space: ParameterSpace,
    theta: Tensor,
    batch: Any,
    tangent: Tensor,
    eps: Step,
    *,
    plus: Tensor | None = None,
    minus: Tensor | None = None,
    base: Tensor | None = None,
    chunk_size: int | None = None,
    weighting: SampleWeighting | None = None,
) -> Tensor:
    """Per-sample directional derivatives ``<grad l_i(theta), tangent>`` by central differences
    of the per-sample losses, float64 ``[B]``:

        (l_i(theta + eps * tangent) - l_i(theta - eps * tangent)) / (2 eps)

    or, when ``plus`` and the losses at ``theta`` itself (``base``) are known and ``minus`` is
    not, by the forward difference ``(l_i(theta + eps * tangent) - l_i(theta)) / eps`` (no pass
    at all; truncation ``O(eps)``, as in a forward-difference Hessian product with that ``eps``).

    ``plus``/``minus``: the losses at the two points when already known (e.g. from the gradient
    passes of a finite-difference Hessian product along the same vector and step); each missing
    side costs one forward pass without autograd (per chunk of ``chunk_size`` samples). Error: ``O(eps^2)`` truncation plus the losses'
    rounding divided by ``2 eps`` (use :func:`finite_difference_step` with ``"central"``). The
    forward-mode :func:`directional_derivatives` is exact; this costs less where a shifted
    gradient pass is computed anyway. ``weighting``: differences of the :func:`removal_losses`
    (a forward that couples the batch's samples), for the sides not given.
    """
    if plus is not None and minus is None and base is not None:
        if plus.shape != base.shape:
            raise ValueError(f"per-sample losses of shapes {tuple(plus.shape)} and {tuple(base.shape)} at the two points")
        return (plus.double() - base.double()) * reciprocal(eps)
    if plus is None:
        plus = shifted_losses(loss_fn, space, theta, batch, tangent, eps, chunk_size, weighting)
    if minus is None:
        minus = shifted_losses(loss_fn, space, theta, batch, tangent, -eps, chunk_size, weighting)
    if plus.shape != minus.shape:
        raise ValueError(f"per-sample losses of shapes {tuple(plus.shape)} and {tuple(minus.shape)} at the two points")
    return (plus.double() - minus.double()) * reciprocal(eps, 0.5)


def shifted_losses(
    loss_fn: PerSampleLossFn,
    space: ParameterSpace,
    theta: Tensor,
    batch: Any,
    direction: Tensor,
    step: Step,
    chunk_size: int | None = None,
    weighting: SampleWeighting | None = None,
) -> Tensor:
    """Per-sample losses ``[B]`` at the flat point ``theta + step * direction``: one forward pass
    without autograd (per chunk of at most ``chunk_size`` samples). ``weighting``: the
    :func:`removal_losses` of a forward that couples the batch's samples instead (a forward and a
    backward pass to the sample weights)."""
    if weighting is not None:  # the removal losses: the weights' gradient, one backward pass without the parameters'
        params = space.unflatten(shift(theta, direction, step).detach())
        holder = SampleWeights()
        with torch.enable_grad():
            _, weights, total = weighted_batch_loss(loss_fn, params, batch, weighting, holder)
            (by_weight,) = torch.autograd.grad(_weighted_objective(total, holder), [weights])
        return removal_losses(total, weights, by_weight)
    with torch.no_grad():
        params = space.unflatten(shift(theta, direction, step))
        return torch.cat([loss_fn(params, chunk) for chunk, _ in batch_chunks(batch, chunk_size)])


def default_rel_step(dtype: torch.dtype, scheme: FiniteDifference) -> float:
    """The square root (forward) or cube root (central) of ``dtype``'s machine epsilon: the step
    that balances truncation against rounding error for a smooth function."""
    return torch.finfo(dtype).eps ** (0.5 if scheme == "forward" else 1.0 / 3.0)


Step = float | Tensor
"""A finite-difference step: a number, or a float64 0-d tensor on the device (see
:func:`finite_difference_step`), which no function here reads on the host."""


def finite_difference_step(
    theta: Tensor,
    direction: Tensor,
    scheme: FiniteDifference,
    rel_step: float | None = None,
    theta_norm: float | None = None,
    on_device: bool = False,
) -> Step:
    """Step length ``eps`` for a finite difference along ``direction`` at ``theta``.

    ``eps = rel_step * (1 + ||theta||) / ||direction||`` (0 for a zero direction) with
    ``rel_step`` defaulting to the square root (forward) or cube root (central) of the
    parameters' machine epsilon, which balances truncation against rounding error.
    ``theta_norm``: ``||theta||`` when the caller knows it (or a value of the same scale, e.g.
    one norm for a whole trajectory). ``on_device``: returned as a float64 0-d tensor on the
    direction's device, without reading the norm on the host (no synchronisation).
    """
    if rel_step is None:
        rel_step = default_rel_step(theta.dtype, scheme)
    scale = float(theta.norm()) if theta_norm is None else theta_norm
    if on_device:
        norm = direction.norm().double()
        return torch.where(norm > 0, rel_step * (1.0 + scale) / norm, torch.zeros_like(norm))
    norm = float(direction.norm())
    return rel_step * (1.0 + scale) / norm if norm > 0 else 0.0


def shift(theta: Tensor, direction: Tensor, step: Step) -> Tensor:
    """``theta + step * direction`` (a new tensor in ``theta``'s dtype), for a number or a 0-d tensor ``step``."""
    direction = direction.to(theta.dtype)
    if isinstance(step, Tensor):
        return torch.addcmul(theta, direction, step.to(theta.dtype))
    return torch.add(theta, direction, alpha=step)


def reciprocal(step: Step, factor: float = 1.0) -> Step:
    """``factor / step``, and 0 for a zero step (whose differences are all zero): a number, or a
    0-d tensor for a tensor ``step`` (no host read)."""
    if isinstance(step, Tensor):
        return torch.where(step != 0, factor / step, torch.zeros_like(step))
    return factor / step if step != 0 else 0.0


def hessian_vector_product(
    gradient: Callable[[Tensor], Tensor | Sequence[Tensor]],
    theta: Tensor,
    vector: Tensor,
    *,
    scheme: FiniteDifference = "central",
    base_gradient: Tensor | None = None,
    rel_step: float | None = None,
    eps: Step | None = None,
    add_to: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``H(theta) @ vector``, the Jacobian of the flat ``gradient`` function along ``vector``,
    from finite differences of gradients (``gradient``: e.g. :func:`batch_gradient` of a batch,
    or the accumulated gradient of an optimizer step's micro-batches; it may return the gradient
    as consecutive pieces of the flat vector instead, e.g. one tensor per parameter, which the
    differences then use as they are).

    ``forward``: ``(g(theta + eps v) - g(theta)) / eps``; ``g(theta)`` is ``base_gradient``
    when given (e.g. the gradient recorded during training), so it costs one backward pass.
    ``central``: ``(g(theta + eps v) - g(theta - eps v)) / (2 eps)``: two backward passes,
    second-order accurate. ``gradient`` is called at ``theta + eps v`` first, then at ``theta``
    (forward, without ``base_gradient``) or ``theta - eps v`` (central). ``eps``: the step
    (default :func:`finite_difference_step`; a 0-d tensor ``eps`` is never read on the host, and a
    zero one gives a zero product). Returned flat, in the parameters' dtype
    (differences of nearby gradients lose nothing to it); with ``add_to`` the product times
    ``alpha`` is added into that flat tensor in place instead (saving two parameter-sized passes)
    and it is returned. A negative ``eps`` steps along ``-vector`` (the product is the same).
    """
    if scheme not in ("forward", "central"):
        raise ValueError(f"unknown finite-difference scheme {scheme!r}: use 'forward' or 'central'")
    if eps is None:
        eps = finite_difference_step(theta, vector, scheme, rel_step)
    if isinstance(eps, float) and eps == 0.0:
        return add_to if add_to is not None else torch.zeros_like(theta)
    plus = gradient(shift(theta, vector, eps))
    # Differences of nearby gradients are exact in the parameters' dtype; one conversion at the end.
    if scheme == "forward":
        other = base_gradient if base_gradient is not None else gradient(theta)
        factor = reciprocal(eps, alpha)
    else:
        other, factor = gradient(shift(theta, vector, -eps)), reciprocal(eps, 0.5 * alpha)
    if isinstance(plus, Tensor):
        difference = plus.sub_(other.to(plus.dtype) if isinstance(other, Tensor) else torch.cat([o.reshape(-1) for o in other]))
        pieces = [difference]
    else:
        pieces = list(plus)
        torch._foreach_sub_(pieces, _pieces_of(other, pieces))
    if add_to is None:
        flat = pieces[0] if len(pieces) == 1 and pieces[0].dim() == 1 else torch.cat([p.reshape(-1) for p in pieces])
        return flat.mul_(factor)
    targets = _pieces_of(add_to, pieces)
    if pieces[0].dtype != add_to.dtype:
        pieces = [p.to(add_to.dtype) for p in pieces]
    if isinstance(factor, Tensor):  # one pass, as with a number: the 0-d factor broadcasts
        torch._foreach_addcmul_(targets, pieces, [factor.to(add_to.dtype)] * len(pieces))
    else:
        torch._foreach_add_(targets, pieces, alpha=factor)
    return add_to


def _pieces_of(value: Tensor | Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """``value`` as pieces shaped like ``like``, the consecutive pieces of a flat vector: a flat
    ``value`` is split into views (writing into them writes into it); pieces are taken as they are."""
    if not isinstance(value, Tensor):
        return list(value)
    return [piece.view(p.shape) for piece, p in zip(value.split([p.numel() for p in like]), like, strict=True)]


def all_finite(tensors: Tensor | Sequence[Tensor]) -> bool:
    """True if every entry of a tensor (or of several, e.g. a model's gradients) is finite. Checks
    the sum first (one reduction per tensor, no mask, one host-device synchronisation for them
    all): NaN and infinity propagate into it; only an overflowing sum of finite values needs the
    full check."""
    if isinstance(tensors, Tensor):
        return bool(torch.isfinite(tensors.sum())) or bool(torch.isfinite(tensors).all())
    parts = list(tensors)
    if not parts:
        return True
    return bool(finite_flag(parts)) or all(bool(torch.isfinite(t).all()) for t in parts)


def finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-d bool tensor on the tensors' device, true if the float32 sum of all their entries is
    finite: false for any NaN or infinity, and for finite values whose sum overflows float32
    (beyond 3.4e38). One reduction per tensor and no read on the host: the value can be read
    later, when the device has computed it (:class:`~lightning_influence.host.HostCopy`)."""
    return torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum())


KINKED_REL_STEP = 5e-3
"""Default relative finite-difference step for losses with kinks (see :func:`kinked_operations`):
about the cube root of float32's machine epsilon, so float64 runs average the curvature over the
same width as float32 ones (``benchmarks/kinked_steps.py`` compares steps against retraining)."""

_KINKS = frozenset(
    {
        # piecewise-linear activations (ReLU family, hard activations, shrinkage, ReLU RNNs)
        "relu", "relu_", "_prelu_kernel", "prelu", "leaky_relu", "leaky_relu_", "rrelu_with_noise",
        "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardshrink", "softshrink",
        "rnn_relu", "rnn_relu_cell",
        # max pooling and other selections of one element among several
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "fractional_max_pool2d", "fractional_max_pool3d", "max", "min", "amax", "amin", "aminmax", "maximum",
        "minimum", "fmax", "fmin", "topk", "sort", "kthvalue", "median", "nanmedian", "cummax", "cummin",
        # absolute values and margins (L1 losses, hinge losses)
        "abs", "abs_", "multi_margin_loss", "multilabel_margin_loss_forward",
        # comparisons of parameter-dependent values (masks such as x * (x > 0), torch.where(x > 0, ...))
        "gt", "ge", "lt", "le", "sign", "sgn", "heaviside",
    }
)
_CLAMPS = frozenset(
    {"clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_", "hardtanh", "hardtanh_", "threshold", "threshold_"}
)
"""Kinked where they bind: counted only if they change a value of the traced batch (``F.normalize``'s
``clamp_min(eps)`` of a norm never does)."""


class _KinkTrace(TorchDispatchMode):
    """Follows which tensors depend on the parameters through every operation and collects the
    kinked operations applied to them (see :func:`kinked_operations`)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        super().__init__()
        self.dependent: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for p in params:
            self.dependent[p] = True
        self.kinks: dict[str, None] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        dependent = any(t in self.dependent for t in inputs)
        before = args[0].clone() if dependent and name in _CLAMPS and name.endswith("_") else None
        out = func(*args, **kwargs)
        if not dependent or name == "detach":
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.dependent[t] = True
        floating = any(t.is_floating_point() for t in inputs if t in self.dependent)
        if not floating:
            return out
        if name in _CLAMPS:
            unclamped = before if before is not None else args[0]
            if bool((out != unclamped).any()):
                self.kinks[name] = None
        elif name in _KINKS or (name in ("elu", "elu_") and _elu_is_kinked(args, kwargs)):
            self.kinks[name] = None
        return out


def _elu_is_kinked(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """``aten.elu(x, alpha, scale, input_scale)``: slope ``alpha * scale * input_scale`` below zero and
    ``scale`` above it (SELU: 1.76 against 1.05); continuous only if ``alpha * input_scale == 1``."""
    alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
    input_scale = args[3] if len(args) > 3 else kwargs.get("input_scale", 1.0)
    return float(alpha) * float(input_scale) != 1.0


def kinked_operations(
    loss_fn: PerSampleLossFn, params: Mapping[str, Tensor], batch: Any, module: nn.Module | None = None
) -> list[str]:
    """The operations of ``loss_fn(params, batch)`` whose derivative jumps, applied to values that
    depend on ``params`` (ATen names, in order of first use; empty for a smooth loss).

    One traced evaluation (a dispatch mode follows the dependence on ``params``), so kinks count
    however they are written: ``nn.ReLU``, ``F.relu``, ``x.clamp(min=0)``, max pooling, L1 and
    hinge losses, masks from comparisons. A finite-difference step that crosses a kink turns the
    gradient's jump into a spurious product of size ``jump / eps``; larger central steps
    (:data:`KINKED_REL_STEP`) average over the kinks instead. Operations on the data alone
    (clamping inputs, masks from labels) are not kinks in the parameters and are not listed;
    clamps count only if they change a value of ``batch``'s evaluation. ``module``: the network
    ``loss_fn`` evaluates; its compiled submodules run uncompiled for the trace (dynamo does not
    compile under a dispatch mode, and would not compile a frame it skipped once, training included).
    """
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    trace = _KinkTrace(list(leaves.values()))

    with _uncompiled(module), torch.enable_grad(), trace:
        loss_fn(leaves, batch)
    return list(trace.kinks)


@contextlib.contextmanager
def _uncompiled(module: nn.Module | None) -> Iterator[None]:
    """Run the compiled submodules of ``module`` (``torch.compile(sub)``, ``sub.compile()``) by their
    original code, leaving their compiled code untouched."""
    saved: list[tuple[nn.Module, str, Any]] = []
    for sub in module.modules() if module is not None else ():
        if isinstance(sub, torch._dynamo.eval_frame.OptimizedModule):
            saved.append((sub, "forward", sub.__dict__.get("forward")))
            sub.forward = sub._orig_mod.__call__
        elif getattr(sub, "_compiled_call_impl", None) is not None:
            saved.append((sub, "_compiled_call_impl", sub._compiled_call_impl))
            sub._compiled_call_impl = None
    try:
        yield
    finally:
        for sub, name, value in saved:
            if value is None:
                sub.__dict__.pop(name, None)
            else:
                setattr(sub, name, value)


def spectral_norm_layers(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` under spectral normalisation (``torch.nn.utils.spectral_norm``
    or ``torch.nn.utils.parametrizations.spectral_norm``), whose power iteration writes buffers in train mode."""
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm

    found: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, _SpectralNorm):  # "<layer>.parametrizations.<tensor>.<i>": name the layer
            name = name.rsplit("parametrizations.", 1)[0].rstrip(".")
        elif not any(isinstance(h, SpectralNorm) for h in sub._forward_pre_hooks.values()):
            continue
        name = name or type(module).__name__
        if name not in found:
            found.append(name)
    return found


def has_mode_dependent_layers(module: nn.Module) -> bool:
    """True if ``module`` holds a standard layer that acts differently in train and eval mode
    (dropout with ``p > 0``, also the dropout built into ``nn.MultiheadAttention`` and multi-layer
    ``nn.RNN``/``nn.GRU``/``nn.LSTM``; batch norm, instance norm with running statistics). Dropout
    written as a function (``F.dropout(x, p, training=self.training)``) is not seen here: DiffIn
    tells it apart from other train-only terms on the first batch (random from one evaluation to
    the next)."""
    return any(is_mode_dependent(m) for m in module.modules())


def is_mode_dependent(module: nn.Module) -> bool:
    """``module`` itself acts differently in train and eval mode (see :func:`has_mode_dependent_layers`)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0  # dropout with p=0 is the identity in either mode
    if isinstance(module, nn.MultiheadAttention):
        return float(module.dropout) > 0  # on the attention weights, in training mode only
    if isinstance(module, nn.RNNBase):
        return float(module.dropout) > 0 and module.num_layers > 1  # between layers, in training mode only
    return isinstance(module, _MODE_DEPENDENT_LAYERS)


class BufferWatch:
    """Finds the tensors that training changes although the optimizer does not train them: the
    buffers of ``module`` outside its normalisation layers (whose running statistics change by
    design) and the ``fixed`` parameters (an annealed temperature, an EMA teacher), modified in
    place or replaced. The tensors are listed once; each :meth:`check` compares identities and
    in-place versions (no pass over the data), and values only when a tensor was written to (DDP
    rewrites buffers with rank zero's values at every forward).

    A tensor found changed is *varying* from then on: :meth:`values` copies the current values of
    the varying tensors (what the step about to be taken trains with), :attr:`initial` holds the
    value each had before its first change (what every earlier step trained with). Names given as
    ``varying`` (known from an earlier part of the run) are varying from the start; their initial
    values are the caller's to know.
    """

    def __init__(self, module: nn.Module, fixed: Sequence[str] = (), varying: Sequence[str] = ()) -> None:
        wanted, known = set(fixed), set(varying)
        # (name, slot table, slot, weak reference, in-place version, value): a weak reference, as an id
        # could be reused by a tensor created after the watched one is gone
        self._watched: list[tuple[str, dict[str, Any], str, weakref.ref[Tensor], int, Tensor]] = []
        self._varying: dict[str, tuple[dict[str, Any], str]] = {}
        self._copies: dict[str, tuple[weakref.ref[Tensor], int, Tensor]] = {}
        self.initial: dict[str, Tensor] = {}
        self.removed: list[str] = []
        for prefix, sub in module.named_modules():
            slots = [] if is_mode_dependent(sub) else [(sub._buffers, name) for name in sub._buffers]
            slots += [(sub._parameters, name) for name in sub._parameters if f"{prefix}.{name}".lstrip(".") in wanted]
            for table, name in slots:
                tensor = table[name]
                if tensor is not None:
                    full = f"{prefix}.{name}" if prefix else name
                    if full in known:
                        self._varying[full] = (table, name)
                    else:
                        self._watched.append((full, table, name, weakref.ref(tensor), tensor._version, tensor.detach().clone()))

    @property
    def varying(self) -> list[str]:
        """Names of the tensors found changed (and still present), in the order found."""
        return list(self._varying)

    def check(self) -> list[str]:
        """Names of the watched tensors changed (or removed) since the last check. A changed one
        becomes varying; a removed one (or a varying one removed since) is listed in :attr:`removed`."""
        found: list[str] = []
        still: list[tuple[str, dict[str, Any], str, weakref.ref[Tensor], int, Tensor]] = []
        for full, table, name, ref, version, value in self._watched:
            tensor = table.get(name)
            if tensor is None:
                self.removed.append(full)
                found.append(full)
            elif ref() is tensor and tensor._version == version:
                still.append((full, table, name, ref, version, value))
            elif tensor.shape != value.shape or tensor.dtype != value.dtype or not torch.equal(tensor, value):
                self._varying[full] = (table, name)
                self.initial[full] = value
                found.append(full)
            else:  # written with the same values
                still.append((full, table, name, weakref.ref(tensor), tensor._version, value))
        self._watched = still
        for full, (table, name) in list(self._varying.items()):
            if table.get(name) is None:
                del self._varying[full]
                self.removed.append(full)
                found.append(full)
        return found

    def values(self) -> dict[str, Tensor]:
        """Detached copies of the varying tensors' current values, by full name; a tensor not
        written to since the last call is given as the same copy again (no new memory)."""
        out: dict[str, Tensor] = {}
        for full, (table, name) in self._varying.items():
            tensor = table[name]
            last = self._copies.get(full)
            if last is None or last[0]() is not tensor or last[1] != tensor._version:
                last = (weakref.ref(tensor), tensor._version, tensor.detach().clone())
                self._copies[full] = last
            out[full] = last[2]
        return out


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Run ``module`` in train (``training=True``) or eval mode, then restore every submodule's
    own train/eval flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def evaluation_mode(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Evaluate ``module`` deterministically (dropout off, normalisation statistics frozen)."""
    return module_mode(module, training=False)


def per_sample_gradients(loss_fn: PerSampleLossFn, space: ParameterSpace, theta: Tensor, batch: Any, chunk_size: int | None = None) -> Tensor:
    """Gradient of every sample's loss at the flat point ``theta``: ``Tensor[B, P]`` (parameters' dtype).

    Materialises ``B x P`` numbers: meant for estimators that need the vectors themselves
    (TracIn, influence functions, GraNd); per-sample *directional* derivatives are far cheaper
    with :func:`directional_derivatives`. Every sample is evaluated as a batch of one: its
    per-sample tensors (those whose leading dimension is the batch size, labels and ids
    included, see :mod:`lightning_influence.batches`) each get a leading dimension of 1, the
    other leaves are shared. Computed with ``torch.func.vmap`` over ``torch.func.grad`` of that
    one-sample loss, ``chunk_size`` samples vectorised at once (memory grows with it, not with
    the batch). Falls back to one backward pass per one-sample sub-batch when the loss cannot be
    vmapped (data-dependent control flow, ``.item()``) or the batch holds per-sample lists of
    plain values (strings), which a vectorised pass cannot split. Either way each row depends on
    its own sample only: a sample with a non-finite loss gives a non-finite row and leaves the
    others as they are.
    """
    params = space.unflatten(theta)
    size = batch_size(batch)

    def per_sample(t: Tensor) -> bool:
        return t.dim() > 0 and t.shape[0] == size

    if size > 0 and not _per_sample_values(batch, size):
        rows = tuple(t for t in tensors(batch) if per_sample(t))

        def one(p: Mapping[str, Tensor], sample_rows: tuple[Tensor, ...]) -> Tensor:
            it = iter(sample_rows)
            single = map_tensors(lambda t: next(it).unsqueeze(0) if per_sample(t) else t, batch)
            return _one_loss(loss_fn(p, single))

        try:
            grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0), chunk_size=chunk_size)(params, rows)
            return torch.cat([grads[n].reshape(size, -1).to(space.dtype) for n in space.names], dim=1)
        except _OneSampleLossError:
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError):
            pass  # not vmappable: one backward pass per sample below
    out = torch.zeros(size, space.size, dtype=space.dtype, device=theta.device)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        for i in range(size):
            loss = _one_loss(loss_fn(leaves, select_samples(batch, [i], size)))
            g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            out[i] = space.flatten(list(g))
    return out


class _OneSampleLossError(ValueError):
    """``per_sample_loss`` of a one-sample sub-batch is not one loss."""


def _one_loss(losses: Tensor) -> Tensor:
    if losses.numel() != 1:
        raise _OneSampleLossError(
            f"per_sample_loss returned shape {tuple(losses.shape)} for a batch of one sample; expected (1,): per-sample "
            "gradients evaluate each sample as a batch of one, so the loss must give one value per sample of any batch"
        )
    return losses.reshape(())


def _per_sample_values(batch: Any, size: int) -> bool:
    """Whether ``batch`` holds a list/tuple of ``size > 1`` plain values (strings, numbers) that
    :func:`~lightning_influence.batches.select_samples` treats as per-sample."""
    if size <= 1 or isinstance(batch, Tensor):
        return False
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return any(_per_sample_values(getattr(batch, f.name), size) for f in dataclasses.fields(batch) if f.init)
    if isinstance(batch, Mapping):
        return any(_per_sample_values(v, size) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        if len(batch) == size and all(isinstance(v, (str, bytes, int, float, complex, bool, type(None))) for v in batch):
            return True
        return any(_per_sample_values(v, size) for v in batch)
    return False


RemoveFn = Callable[[Any, Any], Any]
"""``(batch, index) -> batch``: the batch without its sample at position ``index`` (an ``int`` or
a 0-d integer tensor), e.g. :meth:`~lightning_influence.mixin.InfluenceMixin.remove_from_batch`."""


class RemovalSizeError(ValueError):
    """``per_sample_loss`` of a sub-batch from ``remove_from_batch`` has the wrong number of losses."""


def removal_derivatives(
    loss_fn: PerSampleLossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    tangent: Mapping[str, Tensor],
    remove: RemoveFn,
    size: int,
    *,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample removal derivatives of a *coupled* batch loss (each sample's loss depends on
    the whole batch, e.g. contrastive in-batch negatives):

        d_z = < grad mean l(B \\ z) - grad mean l(B), tangent >     for every z in B (size b)

    where ``mean l(S)`` is the mean of ``loss_fn(params, S)`` *evaluated on the sub-batch S*
    (``B \\ z = remove(batch, z)``), so ``z`` is also gone from the other samples' losses. With an
    empty sub-batch (``b = 1``) the mean is 0. For an uncoupled loss this is
    ``(mean_B s - s_z) / (b - 1)`` with ``s_i = <grad l_i, tangent>``. Returns ``Tensor[b]``
    (the parameters' dtype). Units: the loss's, per unit of ``tangent``.

    Cost: one forward-mode pass over ``B`` plus ``b`` forward-mode passes over sub-batches of
    ``b - 1`` samples (O(b^2) sample evaluations, more for losses that are quadratic in the batch
    such as InfoNCE's b x b similarity matrix). With ``vectorize`` the ``b`` passes are one
    ``torch.func.vmap`` (over the removal index, ``chunk_size`` at a time) of ``torch.func.jvp``;
    a ``remove`` or loss that cannot be vmapped (Python control flow on the index) falls back to
    one pass per sample. A sub-batch whose loss vector does not have ``b - 1`` entries raises
    :class:`RemovalSizeError`.
    """
    _, s = directional_derivatives(loss_fn, params, batch, tangent)
    if s.shape != (size,):
        raise RemovalSizeError(f"per_sample_loss returned shape {tuple(s.shape)} for a batch of {size} samples")
    full = s.mean()
    if size == 1:
        return -full.reshape(1)
    names = tuple(params)
    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(tangent[n].to(params[n].dtype) for n in names)

    def check(losses: Tensor) -> Tensor:
        if losses.shape != (size - 1,):
            raise RemovalSizeError(
                f"per_sample_loss returned shape {tuple(losses.shape)} on a sub-batch from remove_from_batch(batch, i) "
                f"of a batch of {size} samples; expected ({size - 1},): remove_from_batch must drop exactly one sample "
                "from every per-sample tensor of the batch"
            )
        return losses

    if vectorize:

        def sub_mean(index: Tensor) -> Tensor:
            sub = remove(batch, index)
            mean = lambda *ps: check(loss_fn(dict(zip(names, ps, strict=True)), sub)).mean()  # noqa: E731
            return torch.func.jvp(mean, primals, tangents)[1]

        try:
            with torch.no_grad():
                index = torch.arange(size, device=s.device)
                sub = torch.func.vmap(sub_mean, chunk_size=chunk_size)(index)
            return sub.to(s.dtype) - full
        except RemovalSizeError:
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError):
            pass  # not vmappable: one pass per removed sample below
    out = torch.empty(size, dtype=s.dtype, device=s.device)
    for z in range(size):
        _, sub_s = directional_derivatives(lambda p, b: check(loss_fn(p, b)), params, remove(batch, z), tangent)
        out[z] = sub_s.mean()
    return out - full
