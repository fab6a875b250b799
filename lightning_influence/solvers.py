"""Inverse damped curvature-vector products ``(C + damping * I)^{-1} V`` for influence functions.

``C`` is the curvature of the *mean* training loss at the trained parameters: the Hessian, or
the generalised Gauss-Newton matrix (GGN, ``J^T H_out J``: positive semi-definite for losses
convex in the model outputs, e.g. cross-entropy). ``V`` holds one column per right-hand side
(``Tensor[P, Q]``, float64). Every solver returns float64 columns of the same shape.

Solvers (:data:`SOLVERS`), by model size:

- ``"exact"``: explicit ``C`` (``P x P``) and an eigendecomposition; refused above
  ``max_exact_parameters`` (default 5000: a 200 MB float64 matrix). The reference.
- ``"cg"``: conjugate gradient on all columns at once; needs ``C + damping I`` positive definite
  (refused with advice when a non-positive curvature is met: see *Indefinite curvature* below).
  Any size; cost ``iterations x`` one pass over the training set per column.
- ``"lissa"``: the stochastic Neumann recursion of Agarwal et al. / Koh & Liang on sampled
  training batches, ``v_j = b + (I - (w C_batch + damping I) / scale) v_{j-1}``, result
  ``v_J / scale``, where ``w = batch size x number of batches / N`` makes the batches' average
  the curvature of the mean training loss when batch sizes differ. Converges iff every
  eigenvalue of ``(w C_batch + damping I) / scale`` lies in ``(0, 2)``; the error decays like ``(1 - (lambda_min + damping) / scale)^depth``, so
  ``depth`` must be several times ``scale / (lambda_min + damping)``.
- ``"arnoldi"``: top-``rank`` eigenpairs of ``C`` by Arnoldi iteration (full
  re-orthogonalisation) from one random start, then the inverse on that subspace only
  (Schioppa et al. 2022): ``U diag(1 / (mu + damping)) U^T V``; directions outside the subspace
  are dropped.
- ``"ekfac"`` / ``"kfac"``: per-layer Kronecker factors ``A = E[a a^T]`` (layer inputs, with a
  ones column for the bias) and ``S = E[g g^T]`` (gradients at the layer outputs) for
  ``nn.Linear`` and ``nn.Conv2d`` (groups=1, zero padding), collected with hooks;
  ``(S (x) A + damping I)^{-1}`` in the Kronecker eigenbasis. EK-FAC (George et al. 2018,
  Grosse et al. 2023) replaces the eigenvalues ``s_j a_k`` by the exact second moments of the
  per-sample gradients in that basis. Block-diagonal over layers; every attributed parameter
  must belong to a supported layer. ``fisher``: ``"gauss_newton"`` (default: the exact GGN
  expectation, one backward pass per output dimension through a square root of each sample's
  output Hessian), ``"sampled"`` (one Monte-Carlo pseudo-gradient per sample: the GGN in
  expectation, one backward pass) or ``"empirical"`` (true-label gradients: the empirical
  Fisher).

Curvature products (:class:`CurvatureOperator`): ``hvp="autograd"`` (default) is the exact
double-backward Hessian-vector product, summed over the training batches; ``"finite_difference"``
uses :func:`~lightning_influence.kernels.hessian_vector_product` (central differences of mean
training gradients: two gradient passes per product, relative error ~1e-7 in float64, ~1e-3 in
float32). At the final parameters the autograd product is the more accurate choice.

Damping (:func:`resolve_damping`): ``damping_scale="mean_eigenvalue"`` (default) reads
``damping`` relative to the mean eigenvalue of the curvature, ``trace(C) / P`` (exact from the
explicit matrix, or for K-FAC/EK-FAC from the per-sample pseudo-gradients of the fitting pass:
the trace of the curvature they approximate, not of K-FAC's approximation; else a 16-probe
Hutchinson estimate), so the default
``damping=1e-3`` means ``1e-3 * trace(C) / P`` whatever the loss scale; ``"absolute"`` uses the
number as is (e.g. the weight-decay coefficient when the training loss had an L2 term that the
per-sample loss leaves out).

Indefinite curvature. The Hessian of a non-convex model (an MLP) has negative eigenvalues at the
end of training. Where ``C + damping I`` keeps one, its inverse flips the sign of that direction
and the influence scores mean nothing (neither sign nor scale). The solvers check where it costs
nothing extra and warn with an :class:`IndefiniteCurvatureWarning` (the most negative eigenvalue,
how many are negative, the damping that would lift them, the alternatives), also recorded as
``indefinite`` / ``negative_damped_eigenvalues`` / ``warning`` in ``info``
(:func:`check_definite`): ``"exact"`` from all eigenvalues; ``"arnoldi"`` from the Ritz values it
inverts (a negative eigenvalue outside its subspace is dropped, not inverted); ``"lissa"`` from the
20 Ritz values it computes for the automatic ``scale`` (none with a given ``lissa_scale``). Ritz
values lie inside the spectrum, so a negative one proves ``C + damping I`` indefinite, but 20 of
them can miss a negative eigenvalue. ``"cg"`` raises on the first direction of non-positive
curvature. ``"ekfac"``/``"kfac"`` are positive semi-definite by construction, and so is
``curvature="gauss_newton"`` for losses convex in the model outputs (cross-entropy, squared
error).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD

from lightning_influence.batches import batch_size
from lightning_influence.kernels import (
    ParameterSpace,
    PerSampleLossFn,
    batch_gradient,
    forward_mode_unsupported,
    hessian_vector_product,
    reverse_jacobian_products,
    warn_reverse_mode,
)

__all__ = [
    "SOLVERS",
    "CURVATURES",
    "HVP_METHODS",
    "FISHER_KINDS",
    "DAMPING_SCALES",
    "OutputModel",
    "CurvatureOperator",
    "KroneckerFactors",
    "kronecker_layers",
    "check_embeddings",
    "SolveResult",
    "IndefiniteCurvatureWarning",
    "NonFiniteCurvatureError",
    "check_definite",
    "solve",
    "exact_solve",
    "conjugate_gradient",
    "lissa",
    "arnoldi_eigenpairs",
    "resolve_damping",
    "hutchinson_trace",
]

SOLVERS: tuple[str, ...] = ("exact", "cg", "lissa", "arnoldi", "ekfac", "kfac")
CURVATURES: tuple[str, ...] = ("hessian", "gauss_newton")
HVP_METHODS: tuple[str, ...] = ("autograd", "finite_difference")
FISHER_KINDS: tuple[str, ...] = ("gauss_newton", "sampled", "empirical")
DAMPING_SCALES: tuple[str, ...] = ("mean_eigenvalue", "absolute")

Batches = Callable[[], Iterable[Any]]
MatVec = Callable[[Tensor], Tensor]


class NonFiniteCurvatureError(ValueError):
    """A curvature quantity of the training set (a product, the explicit matrix, a Kronecker factor,
    the output Hessians of a batch) is not finite (NaN or inf): a training sample with a non-finite
    loss or gradient, usually. The solvers know no sample ids; the estimators catch this and name
    the samples (:func:`~lightning_influence.estimators.base.non_finite_training_error`)."""


def _check_finite(value: Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteCurvatureError(f"{what} is not finite")


# ------------------------------------------------------------------------ model outputs
class OutputModel:
    """The model split into outputs and an output loss, for Gauss-Newton products and K-FAC.

    ``output_fn(module, batch) -> Tensor[B, C]`` and ``output_loss(outputs, batch) -> Tensor[B]``
    with ``output_loss(output_fn(module, batch), batch) == module.per_sample_loss(batch)``
    (checked on the first batch by :meth:`check`). Defaults: the module's own
    ``influence_outputs(batch)`` / ``influence_output_loss(outputs, batch)`` methods when it has
    them, else ``module(batch[0])`` and cross-entropy against ``batch[1]``.
    """

    def __init__(
        self,
        module: nn.Module,
        output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        output_loss: Callable[[Tensor, Any], Tensor] | None = None,
    ) -> None:
        self.default_split = output_fn is None and not hasattr(module, "influence_outputs")
        """Whether the outputs are the default ``module(batch[0])`` (made for ``(x, y, ids)`` batches)."""
        if output_fn is None:
            output_fn = (lambda m, b: m.influence_outputs(b)) if hasattr(module, "influence_outputs") else (lambda m, b: m(b[0]))
        if output_loss is None:
            if hasattr(module, "influence_output_loss"):
                output_loss = module.influence_output_loss  # type: ignore[assignment]
            else:
                self.default_split = True
                output_loss = lambda out, b: F.cross_entropy(out, b[1], reduction="none")  # noqa: E731
        self.module = module
        self.output_fn = output_fn
        self.output_loss = output_loss
        self._wrapper = _OutputCall(module, output_fn)

    def outputs(self, params: Mapping[str, Tensor] | None, batch: Any) -> Tensor:
        """Model outputs ``[B, C]`` at ``params`` (the module's own parameters when ``None``)."""
        if params is None:
            return self.output_fn(self.module, batch)
        return torch.func.functional_call(self._wrapper, {f"inner.{n}": p for n, p in params.items()}, (batch,), strict=False)

    def check(self, batch: Any) -> None:
        """Refuse an output split that does not reproduce ``module.per_sample_loss``."""
        with torch.no_grad():
            try:
                out = self.outputs(None, batch)
                if out.dim() != 2:
                    raise ValueError(
                        f"Gauss-Newton curvature needs model outputs of shape [B, C], got {tuple(out.shape)}: give output_fn/"
                        "output_loss (or influence_outputs/influence_output_loss on the module) that flatten the outputs per sample"
                    )
                got = self.output_loss(out, batch)
            except (KeyError, IndexError, TypeError, AttributeError, RuntimeError) as error:
                if not self.default_split:
                    raise
                # e.g. dict batches, which the default split (made for (x, y, ids) tuples) cannot index
                raise ValueError(f"{self._split_advice('cannot be evaluated on this batch')} (it failed with {type(error).__name__}: {error})") from error
            want = self.module.per_sample_loss(batch)  # type: ignore[operator]
        tol = 1e-6 if want.dtype == torch.float64 else 1e-3
        if got.shape != want.shape or not torch.allclose(got.to(want.dtype), want, rtol=tol, atol=tol):
            raise ValueError(self._split_advice("does not reproduce module.per_sample_loss(batch)"))

    def _split_advice(self, problem: str) -> str:
        split = "the default split (module(batch[0]) with cross-entropy against batch[1])" if self.default_split else "the given split"
        return (
            "Gauss-Newton curvature and K-FAC/EK-FAC need the per-sample loss split into model outputs and an output loss; "
            f"{split} {problem}. Pass output_fn=(module, batch) -> outputs [B, C] and output_loss=(outputs, batch) "
            "-> per-sample losses [B], or define influence_outputs(batch) / influence_output_loss(outputs, batch) on the module"
        )

    def output_hessians(self, outputs: Tensor, batch: Any) -> Tensor:
        """Each sample's Hessian of its loss with respect to its outputs: ``[B, C, C]``
        (one double-backward pass per output dimension; samples are independent)."""
        out = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(self.output_loss(out, batch).sum(), out, create_graph=True)[0]
            C = out.shape[1]
            try:  # all output dimensions in one vectorised double-backward pass
                unit = torch.eye(C, dtype=g.dtype, device=g.device).unsqueeze(1).expand(C, *g.shape)
                return torch.autograd.grad(g, out, grad_outputs=unit, is_grads_batched=True)[0].permute(1, 2, 0).detach()
            except (RuntimeError, NotImplementedError):
                cols = [torch.autograd.grad(g[:, c].sum(), out, retain_graph=True)[0] for c in range(C)]
                return torch.stack(cols, dim=2).detach()


class _OutputCall(nn.Module):
    def __init__(self, inner: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self._fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self._fn(self.inner, batch)


def _psd_sqrt(hessians: Tensor) -> Tensor:
    """``L[B, C, C]`` with ``L L^T = H`` (negative eigenvalues of the symmetrised ``H`` set to zero).
    Raises :class:`NonFiniteCurvatureError` for a non-finite ``H`` (which ``eigh`` cannot decompose)."""
    _check_finite(hessians, "the loss Hessian with respect to the model outputs of a training batch")
    evals, evecs = torch.linalg.eigh(0.5 * (hessians + hessians.transpose(1, 2)))
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)


# ------------------------------------------------------------------------ curvature products
@dataclass
class CurvatureOperator:
    """Products with the curvature of the mean training loss at the flat point ``theta``.

    ``batches()`` yields the training batches (on the module's device); the mean is over all
    their samples. ``curvature``: ``"hessian"`` or ``"gauss_newton"`` (needs ``outputs``).
    ``hvp``: ``"autograd"`` (exact double-backward) or ``"finite_difference"`` (Hessian only).
    Vectors are float64 ``Tensor[P, K]`` columns; products run in the parameters' dtype.
    """

    loss_fn: PerSampleLossFn
    space: ParameterSpace
    theta: Tensor
    batches: Batches
    curvature: str = "hessian"
    hvp: str = "autograd"
    outputs: OutputModel | None = None
    num_samples: int = 0
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.hvp not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {self.hvp!r}")
        if self.curvature == "gauss_newton" and self.hvp != "autograd":
            raise ValueError("hvp='finite_difference' differentiates gradients: it gives Hessian products only; use hvp='autograd' with curvature='gauss_newton'")
        if self.curvature == "gauss_newton" and self.outputs is None:
            raise ValueError("curvature='gauss_newton' needs an OutputModel (outputs=...)")
        if self.num_samples <= 0:
            self.num_samples = sum(batch_size(b) for b in self.batches())
        if self.num_samples == 0:
            raise ValueError("the training loader produced no samples: the curvature of the mean loss is undefined")

    @property
    def size(self) -> int:
        return self.space.size

    def matvec(self, vectors: Tensor) -> Tensor:
        """``C @ vectors`` over all training batches (float64 ``[P, K]``; a 1-D vector is one column)."""
        squeeze = vectors.dim() == 1
        V = vectors.reshape(self.size, -1)
        total = torch.zeros(self.size, V.shape[1], dtype=torch.float64, device=V.device)
        if self.hvp == "finite_difference":
            for k in range(V.shape[1]):
                total[:, k] = hessian_vector_product(self._mean_gradient, self.theta, V[:, k].to(self.space.dtype)).to(torch.float64)
        else:
            for batch in self.batches():
                total += self.batch_matvec(V, batch) * (batch_size(batch) / self.num_samples)
        if bool(torch.isfinite(V).all()):
            _check_finite(total, "a curvature-vector product over the training batches")
        self.calls += V.shape[1]
        return total.reshape(-1) if squeeze else total

    def batch_matvec(self, V: Tensor, batch: Any) -> Tensor:
        """Curvature of the *batch-mean* loss times ``V`` (float64 ``[P, K]``)."""
        if self.hvp == "finite_difference":
            grad = lambda th: batch_gradient(self.loss_fn, self.space, th, batch)  # noqa: E731
            cols = [hessian_vector_product(grad, self.theta, V[:, k].to(self.space.dtype)).to(torch.float64) for k in range(V.shape[1])]
            return torch.stack(cols, dim=1)
        if self.curvature == "gauss_newton":
            return self._ggn_batch(V, batch)
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.space.unflatten(self.theta).items()}
        params = list(leaves.values())
        with torch.enable_grad():
            loss = self.loss_fn(leaves, batch).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            if not flat.requires_grad:  # the loss is linear in the parameters
                return torch.zeros(self.size, V.shape[1], dtype=torch.float64, device=V.device)
            W = V.to(self.space.dtype)
            try:  # H symmetric: H V = (V^T H)^T, one vectorised double-backward for all columns
                hv = torch.autograd.grad(flat, params, grad_outputs=W.T.contiguous(), retain_graph=True, allow_unused=True, is_grads_batched=True)
                return torch.cat(
                    [(h if h is not None else torch.zeros(W.shape[1], *p.shape, dtype=p.dtype, device=p.device)).reshape(W.shape[1], -1) for h, p in zip(hv, params)],
                    dim=1,
                ).T.to(torch.float64)
            except (RuntimeError, NotImplementedError):
                pass
            try:
                cols = [self.space.flatten(list(torch.autograd.grad(flat, params, grad_outputs=W[:, k], retain_graph=True, allow_unused=True)), torch.float64) for k in range(W.shape[1])]
            except NotImplementedError as err:  # an operation without a second derivative (nn.EmbeddingBag)
                raise NotImplementedError(
                    f"curvature='hessian' takes Hessian-vector products by double backward, which an operation of the model "
                    f"does not support ({str(err).splitlines()[0]}): use curvature='gauss_newton' (first derivatives only), or "
                    "hvp='finite_difference' (differences of gradients)"
                ) from err
            return torch.stack(cols, dim=1)

    def _ggn_batch(self, V: Tensor, batch: Any) -> Tensor:
        assert self.outputs is not None
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.space.unflatten(self.theta).items()}
        with torch.enable_grad():
            out = self.outputs.outputs(leaves, batch)
        H = self.outputs.output_hessians(out, batch)
        W = V.to(self.space.dtype)
        JV = self._jvps(leaves, batch, W, out)  # [K, B, C]
        U = (torch.einsum("bcd,kbd->kbc", H, JV) / out.shape[0]).to(out.dtype)
        params = list(leaves.values())
        with torch.enable_grad():
            try:  # all columns in one vectorised backward pass
                g = torch.autograd.grad(out, params, grad_outputs=U, retain_graph=True, allow_unused=True, is_grads_batched=True)
                return torch.cat(
                    [(t if t is not None else torch.zeros(U.shape[0], *p.shape, dtype=p.dtype, device=p.device)).reshape(U.shape[0], -1) for t, p in zip(g, params)],
                    dim=1,
                ).T.to(torch.float64)
            except (RuntimeError, NotImplementedError):
                cols = [self.space.flatten(list(torch.autograd.grad(out, params, grad_outputs=U[k], retain_graph=True, allow_unused=True)), torch.float64) for k in range(U.shape[0])]
                return torch.stack(cols, dim=1)

    def _jvps(self, leaves: Mapping[str, Tensor], batch: Any, W: Tensor, out: Tensor) -> Tensor:
        """Output Jacobian times each column of ``W``: ``[K, B, C]`` (vectorised forward mode,
        falling back to one forward-mode pass per column)."""
        assert self.outputs is not None
        primals = {n: p.detach() for n, p in leaves.items()}
        f = lambda p: self.outputs.outputs(p, batch)  # noqa: E731
        try:
            return torch.func.vmap(lambda w: torch.func.jvp(f, (primals,), (self.space.unflatten(w),))[1])(W.T.contiguous())
        except (RuntimeError, NotImplementedError, ValueError):
            pass
        jv = []
        try:
            with torch.no_grad(), fwAD.dual_level():
                for k in range(W.shape[1]):
                    tangent = self.space.unflatten(W[:, k])
                    duals = {n: fwAD.make_dual(p, tangent[n]) for n, p in primals.items()}
                    t = fwAD.unpack_dual(f(duals)).tangent
                    jv.append(torch.zeros_like(out) if t is None else t)
            return torch.stack(jv)
        except NotImplementedError as err:  # an operation without a forward-mode formula (nn.EmbeddingBag)
            if not forward_mode_unsupported(err):
                raise
            warn_reverse_mode(err)
        inputs = {n: p.detach().requires_grad_(True) for n, p in primals.items()}
        columns = [self.space.unflatten(W[:, k]) for k in range(W.shape[1])]
        directions = [torch.stack([c[n] for c in columns]).to(p.dtype) for n, p in inputs.items()]
        _, products = reverse_jacobian_products(lambda: f(inputs).reshape(-1), list(inputs.values()), directions)  # [B C, K]
        return products.T.reshape(W.shape[1], *out.shape).to(out.dtype)

    def _mean_gradient(self, theta: Tensor) -> Tensor:
        total = torch.zeros(self.size, dtype=self.space.dtype, device=theta.device)
        for batch in self.batches():
            total += batch_gradient(self.loss_fn, self.space, theta, batch) * (batch_size(batch) / self.num_samples)
        return total

    def matrix(self, chunk_size: int = 64) -> Tensor:
        """The explicit ``P x P`` curvature (float64, symmetrised), from products with blocks of
        ``chunk_size`` unit vectors (Hessian) or per-batch Jacobians (Gauss-Newton)."""
        P = self.size
        if self.curvature == "gauss_newton" and self.hvp == "autograd":
            return self._ggn_matrix(chunk_size)
        eye = torch.eye(P, dtype=torch.float64, device=self.theta.device)
        blocks = [self.matvec(eye[:, i : i + chunk_size]) for i in range(0, P, chunk_size)]
        M = torch.cat(blocks, dim=1)
        return 0.5 * (M + M.T)

    def _ggn_matrix(self, chunk_size: int) -> Tensor:
        assert self.outputs is not None
        P = self.size
        M = torch.zeros(P, P, dtype=torch.float64, device=self.theta.device)
        for batch in self.batches():
            out = self.outputs.outputs(self.space.unflatten(self.theta), batch).detach()
            L = _psd_sqrt(self.outputs.output_hessians(out, batch)).to(torch.float64)  # [B, C, C]
            f = lambda t: self.outputs.outputs(self.space.unflatten(t), batch)  # noqa: E731
            try:
                J = torch.func.jacrev(f, chunk_size=chunk_size)(self.theta)  # [B, C, P]
            except (RuntimeError, NotImplementedError):
                J = torch.autograd.functional.jacobian(f, self.theta)
            JL = torch.einsum("bcp,bck->bkp", J.to(torch.float64), L).reshape(-1, P)
            M += JL.T @ JL
        _check_finite(M, "the Gauss-Newton matrix of the training batches")
        M /= self.num_samples
        self.calls += P
        return 0.5 * (M + M.T)


# ------------------------------------------------------------------------ solvers
@dataclass
class SolveResult:
    """``solution``: float64 ``[P, Q]``; ``damping``: the absolute damping used; ``info``: JSON-able facts."""

    solution: Tensor
    damping: float
    info: dict[str, Any] = field(default_factory=dict)


class IndefiniteCurvatureWarning(RuntimeWarning):
    """The damped curvature ``C + damping I`` has negative eigenvalues (the Hessian of a
    non-convex model, too little damping): its inverse flips the sign of those directions, so the
    influence scores built on it are not meaningful."""


def _roundoff(values: Tensor) -> float:
    """Eigenvalues within this of 0 are round-off of a matrix whose spectrum spans ``values``."""
    return 1e3 * torch.finfo(torch.float64).eps * max(float(values.abs().max()) if values.numel() else 0.0, 1e-300)


def check_definite(
    solver: str,
    eigenvalues: Tensor,
    damping: float,
    size: int,
    *,
    mean_eigenvalue: float | None = None,
    complete: bool = True,
) -> dict[str, Any]:
    """Warn (:class:`IndefiniteCurvatureWarning`) when ``C + damping I`` has a negative eigenvalue.

    ``eigenvalues``: all of ``C``'s (``complete=True``) or Ritz values (``complete=False``: they
    lie inside ``C``'s spectrum, so the count of negative ones is a lower bound and their minimum
    an upper bound on ``lambda_min``). ``mean_eigenvalue`` (``trace(C) / P``) lets the advice give
    the damping in ``damping_scale="mean_eigenvalue"`` units too. Returns the ``info`` entries
    ``indefinite``, ``negative_damped_eigenvalues`` (and the warning text under ``warning``)."""
    evals = eigenvalues.to(torch.float64)
    tol = _roundoff(evals + damping)
    below = int((evals + damping < -tol).sum())
    info: dict[str, Any] = {"indefinite": below > 0, "negative_damped_eigenvalues": below}
    if below == 0:
        return info
    low = float(evals.min())
    negative = int((evals < -_roundoff(evals)).sum())
    if complete:
        found = f"C has {negative} negative eigenvalues (of {size}), the most negative lambda_min = {low:.3g}"
    else:
        found = (
            f"C has at least {negative} negative eigenvalues ({negative} of the {evals.numel()} Ritz values computed), "
            f"the most negative lambda_min <= {low:.3g}"
        )
    relative = (
        f", or > {-low / mean_eigenvalue:.3g} with damping_scale='mean_eigenvalue'"
        if mean_eigenvalue is not None and math.isfinite(mean_eigenvalue) and mean_eigenvalue > 0
        else ""
    )
    message = (
        f"solver={solver!r}: the damped curvature C + lambda I is indefinite: {found}, and the damping lambda = "
        f"{damping:.3g} leaves {below} of them below 0. Its inverse flips the sign of those directions, so the influence "
        f"scores are meaningless (sign and scale). Fix: damping above |lambda_min| (damping > {-low:.3g}"
        f"{'' if complete else ' at least'} with damping_scale='absolute'{relative}), curvature='gauss_newton' (positive "
        "semi-definite for losses convex in the outputs, e.g. cross-entropy), or solver='ekfac' / 'kfac' (positive "
        "semi-definite by construction)"
    )
    warnings.warn(message, IndefiniteCurvatureWarning, stacklevel=3)
    info["warning"] = message
    return info


def exact_solve(matrix: Tensor, rhs: Tensor, damping: float) -> tuple[Tensor, dict[str, Any]]:
    """``(M + damping I)^{-1} rhs`` by an eigendecomposition of the symmetric ``M``.

    Refuses a (numerically) singular damped matrix; warns (:class:`IndefiniteCurvatureWarning`)
    when it is indefinite. ``info``: extreme eigenvalues, the number of negative ones beyond
    round-off (``negative_eigenvalues``) and of the damped matrix (``negative_damped_eigenvalues``,
    ``indefinite``: the solution is not meaningful then)."""
    evals, evecs = torch.linalg.eigh(matrix)
    denom = evals + damping
    scale = float(denom.abs().max()) if denom.numel() else 1.0
    if bool((denom.abs() <= 1e3 * torch.finfo(matrix.dtype).eps * max(scale, 1e-300)).any()):
        raise ValueError(
            f"the damped curvature is singular (an eigenvalue of C + {damping:g} I is ~0; eigenvalues of C span "
            f"[{float(evals.min()):.3g}, {float(evals.max()):.3g}]): increase damping"
        )
    solution = evecs @ ((evecs.T @ rhs) / denom.unsqueeze(1))
    info = {"min_eigenvalue": float(evals.min()), "max_eigenvalue": float(evals.max()), "negative_eigenvalues": int((evals < -_roundoff(evals)).sum())}
    mean = float(evals.mean()) if evals.numel() else None
    info.update(check_definite("exact", evals, damping, matrix.shape[0], mean_eigenvalue=mean))
    return solution, info


def conjugate_gradient(matvec: MatVec, rhs: Tensor, damping: float, tol: float = 1e-8, max_iter: int = 1000) -> tuple[Tensor, dict[str, Any]]:
    """Solve ``(C + damping I) X = rhs`` for every column by conjugate gradient (columns advance
    together; a converged column stops). Stops when each residual norm is at most ``tol`` times
    its right-hand side's norm. Raises if a non-positive curvature ``p^T (C + damping I) p <= 0``
    is met (the damped matrix is not positive definite). Warns when ``max_iter`` is reached."""
    X = torch.zeros_like(rhs)
    R = rhs.clone()
    D = R.clone()
    rs = (R * R).sum(0)
    target = (tol * rhs.norm(dim=0)) ** 2
    it = 0
    for it in range(1, max_iter + 1):
        active = (rs > target).nonzero().reshape(-1)
        if active.numel() == 0:
            it -= 1
            break
        Da = D[:, active]
        ADa = matvec(Da) + damping * Da
        curv = (Da * ADa).sum(0)
        if bool((curv <= 0).any()):
            k = int(curv.argmin())
            rayleigh = float(curv[k] / (Da[:, k] * Da[:, k]).sum().clamp_min(1e-300)) - damping  # >= lambda_min(C)
            raise ValueError(
                f"conjugate gradient met a direction p of non-positive curvature (p^T (C + {damping:g} I) p = {float(curv[k]):.3g}): "
                f"the damped curvature is not positive definite (C has an eigenvalue <= {rayleigh:.3g}, e.g. the Hessian of a "
                "non-convex model) and its inverse would give meaningless scores. Fix: damping above |lambda_min| (above "
                f"{max(-rayleigh, 0.0):.3g} at least, damping_scale='absolute'; solver='exact' or 'arnoldi' report lambda_min), "
                "curvature='gauss_newton' (positive semi-definite for losses convex in the outputs), or solver='ekfac' / 'kfac'"
            )
        alpha = rs[active] / curv
        X[:, active] += alpha * Da
        R[:, active] -= alpha * ADa
        new = (R[:, active] ** 2).sum(0)
        D[:, active] = R[:, active] + (new / rs[active]) * Da
        rs[active] = new
    else:
        it = max_iter
    residual = float((rs.sqrt() / rhs.norm(dim=0).clamp_min(1e-300)).max()) if rhs.numel() else 0.0
    converged = bool((rs <= target).all())
    if not converged:
        warnings.warn(
            f"conjugate gradient stopped at max_iter={max_iter} with relative residual {residual:.3g} > tol={tol:g}: "
            "raise cg_max_iter or damping", RuntimeWarning, stacklevel=2,
        )
    return X, {"iterations": it, "relative_residual": residual, "converged": converged}


def lissa(
    batch_matvec: Callable[[Tensor, Any], Tensor],
    batches: Batches,
    rhs: Tensor,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
) -> tuple[Tensor, dict[str, Any]]:
    """LiSSA: ``v_j = rhs + v_{j-1} - (w_j C_{b_j} + damping I) v_{j-1} / scale``, ``v_0 = rhs``,
    estimate ``v_depth / scale``, averaged over ``repeats`` recursions; ``b_j`` cycles through the
    training batches and ``C_b`` is the curvature of batch ``b``'s mean loss (``batch_matvec``).
    Each batch's product is weighted by ``w = n_b K / N`` (``n_b`` its samples, ``K`` batches,
    ``N`` samples in all), so a cycle averages to ``sum_b (n_b / N) C_b``: the curvature of the
    mean training loss whatever the batch sizes (``w = 1`` for equal batches). Convergence needs
    every eigenvalue of ``(w C_b + damping I)/scale`` in ``(0, 2)`` (``scale`` above the largest
    weighted batch eigenvalue plus damping) and ``depth >> scale / (lambda_min + damping)``.
    Raises if the recursion blows up, :class:`NonFiniteCurvatureError` if a batch's product is
    not finite. Reads the batches once more first, for their sizes."""
    if scale <= 0 or depth < 1 or repeats < 1:
        raise ValueError(f"LiSSA needs scale > 0, depth >= 1, repeats >= 1; got {scale}, {depth}, {repeats}")
    sizes = [batch_size(b) for b in batches()]
    if not sizes or sum(sizes) == 0:
        raise ValueError("the training loader produced no batches")
    per_batch = len(sizes) / sum(sizes)
    stream = _cycle(batches)
    estimate = torch.zeros_like(rhs)
    start = float(rhs.norm())
    last_change = 0.0
    for _ in range(repeats):
        v = rhs.clone()
        for _ in range(depth):
            batch = next(stream)
            product = batch_matvec(v, batch) * (batch_size(batch) * per_batch)
            new = v + rhs - (product + damping * v) / scale
            norm = float(new.norm())
            last_change = float((new - v).norm()) / max(norm, 1e-300)
            if not math.isfinite(norm) and not bool(torch.isfinite(product).all()) and bool(torch.isfinite(v).all()):
                raise NonFiniteCurvatureError("a training batch's curvature-vector product in the LiSSA recursion is not finite")
            v = new
            if not math.isfinite(norm) or norm > 1e12 * max(start, 1e-300) * depth:
                raise ValueError(
                    f"LiSSA diverged (scale={scale:g}): the damped batch curvature has eigenvalues outside (0, 2 * scale). "
                    "Increase lissa_scale or damping, or use curvature='gauss_newton'"
                )
        estimate += v / scale
    return estimate / repeats, {"depth": depth, "repeats": repeats, "scale": scale, "last_relative_change": last_change}


def _cycle(batches: Batches) -> Iterator[Any]:
    while True:
        empty = True
        for b in batches():
            empty = False
            yield b
        if empty:
            raise ValueError("the training loader produced no batches")


def arnoldi_eigenpairs(matvec: MatVec, size: int, iterations: int, rank: int, seed: int = 0, device: torch.device | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Top-``rank`` (by magnitude) Ritz pairs of the symmetric operator ``matvec`` from
    ``iterations`` Arnoldi steps with full re-orthogonalisation (two Gram-Schmidt passes) from
    one random start. Returns ``(eigenvalues[k], vectors[P, k], info)``, float64. A Krylov
    space from one start holds one direction per distinct eigenvalue, so on an invariant subspace
    (repeated eigenvalues, e.g. a curvature ``I_K (x) E[h h^T]`` of K outputs) the iteration
    restarts from a new random vector orthogonal to the basis so far (``info["restarts"]``) and
    stops early only when the basis spans the whole space."""
    iterations = min(iterations, size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.zeros(size, iterations + 1, dtype=torch.float64, device=device)
    Hm = torch.zeros(iterations + 1, iterations, dtype=torch.float64, device=device)
    q = torch.randn(size, generator=g, dtype=torch.float64).to(device)
    Q[:, 0] = q / q.norm()
    m = restarts = 0
    norm_scale = 0.0
    for j in range(iterations):
        w = matvec(Q[:, j : j + 1])[:, 0]
        norm_scale = max(norm_scale, float(w.norm()))
        for _ in range(2):
            h = Q[:, : j + 1].T @ w
            w = w - Q[:, : j + 1] @ h
            Hm[: j + 1, j] += h
        m = j + 1
        beta = float(w.norm())
        if beta <= 1e-12 * max(norm_scale, 1e-300):
            if m == iterations:
                break
            # Invariant subspace: continue from a fresh direction orthogonal to it (the operator is symmetric,
            # so it maps that direction's complement into itself and Hm stays the projection, with a zero here).
            w = torch.randn(size, generator=g, dtype=torch.float64).to(device)
            for _ in range(2):
                w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
            if float(w.norm()) <= 1e-8:  # the basis spans the whole space
                break
            restarts += 1
            Q[:, j + 1] = w / w.norm()
            continue
        Hm[j + 1, j] = beta
        Q[:, j + 1] = w / beta
    T = Hm[:m, :m]
    evals, evecs = torch.linalg.eigh(0.5 * (T + T.T))
    keep = evals.abs().argsort(descending=True)[: min(rank, m)]
    return evals[keep], Q[:, :m] @ evecs[:, keep], {"iterations": m, "rank": int(keep.numel()), "restarts": restarts}


def hutchinson_trace(matvec: MatVec, size: int, probes: int = 16, seed: int = 0, device: torch.device | None = None) -> float:
    """Hutchinson estimate of ``trace(C)`` from ``probes`` Rademacher vectors (one block product)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Z = (torch.randint(0, 2, (size, probes), generator=g) * 2 - 1).to(torch.float64).to(device)
    return float((Z * matvec(Z)).sum() / probes)


def resolve_damping(damping: float, damping_scale: str, mean_eigenvalue: Callable[[], float]) -> float:
    """The absolute damping: ``damping`` itself (``"absolute"``) or ``damping * mean_eigenvalue()``
    (``"mean_eigenvalue"``; a non-positive mean eigenvalue is refused)."""
    if damping_scale == "absolute":
        return float(damping)
    mean = float(mean_eigenvalue())
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"damping relative to the mean eigenvalue needs a positive trace(C)/P, got {mean:.3g}: use damping_scale='absolute'")
    return float(damping) * mean


# ------------------------------------------------------------------------ layers a gradient cannot go through
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def check_embeddings(module: nn.Module, names: Sequence[str], owner: str, max_norm: bool = False) -> None:
    """Refuse, before any work, an embedding whose attributed weight (one of ``names``, the
    attributed parameters' first names) the estimator ``owner`` cannot differentiate:

    - ``sparse=True``: its weight gradient is a sparse tensor, which the flat attributed parameter
      space (per-sample gradients, target gradients, curvature products) cannot hold;
    - with ``max_norm=True`` (the influence-function solvers), a ``max_norm``: every forward pass
      renormalises the looked-up rows of the weight in place (``torch.embedding_renorm_``), which
      breaks the autograd graph of curvature products ("modified by an inplace operation") and
      would rewrite the parameters being scored.

    The message names the layer and the fix (``sparse = False`` / ``max_norm = None`` on the layer
    for scoring, or leave its weight out of ``params=``)."""
    first_names = dict(module.named_parameters())
    attributed = {id(first_names[n]) for n in names if n in first_names}
    for mname, m in module.named_modules():
        if not isinstance(m, _EMBEDDINGS) or id(m.weight) not in attributed:
            continue
        layer = f"{mname or '<root>'!r} ({type(m).__name__})"
        if m.sparse:
            raise ValueError(
                f"{owner}: the embedding {layer} has sparse=True: its weight gradient is a sparse tensor, which the flat "
                "attributed parameters' gradients cannot hold. For scoring, set `.sparse = False` on that layer (e.g. "
                f"`model.{mname + '.' if mname else ''}sparse = False`; the forward pass and the trained weights are "
                "unchanged, sparse gradients only matter to the optimizer), or leave its weight out of params="
            )
        if max_norm and m.max_norm is not None:
            with torch.no_grad():
                largest = float(m.weight.detach().norm(p=m.norm_type, dim=-1).max()) if m.weight.numel() else 0.0
            within = (
                "every row is within it, so the scores are the trained model's"
                if largest <= m.max_norm * (1 + 1e-6)
                else f"rows up to {largest:.4g} exceed it: the model would rescale them when it looks them up"
            )
            raise ValueError(
                f"{owner}: the embedding {layer} has max_norm={m.max_norm}: its forward pass renormalises the looked-up "
                "rows of the attributed weight in place, which breaks the curvature products' autograd graph and would "
                "change the parameters being scored. For scoring, set `.max_norm = None` on that layer (e.g. "
                f"`model.{mname + '.' if mname else ''}max_norm = None`; autograd never differentiates the "
                f"renormalisation, and {within}), or leave its weight out of params="
            )


# ------------------------------------------------------------------------ K-FAC / EK-FAC
_SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: str
    bias: str | None
    A: Tensor | None = None
    S: Tensor | None = None
    QA: Tensor | None = None
    QS: Tensor | None = None
    eig: Tensor | None = None  # [out, in(+1)]


def kronecker_layers(module: nn.Module, names: Sequence[str]) -> list[_Layer]:
    """The layers that K-FAC/EK-FAC factor for the attributed parameters ``names`` of ``module``.

    Layers are matched to the attributed parameters by identity (a parameter is attributed under
    its first name, whichever module registers it first). Raises ``ValueError`` naming

    - an attributed parameter registered by more than one module (a tied weight, ``c.weight =
      b.weight``; a tied bias): the factors of one layer cannot hold the other use's share of the
      gradient, so the scores would be silently wrong;
    - the attributed parameters outside supported layers (``nn.Linear``; ``nn.Conv2d`` with
      ``groups=1`` and zero padding), or a bias attributed without its weight.

    Not seen here: a weight that the forward pass also uses outside its layer, e.g.
    ``F.linear(x, self.b.weight)`` elsewhere; its factors then miss that use. Score such a model
    with ``solver="exact"``, ``"cg"`` or ``"arnoldi"``."""
    first_names = dict(module.named_parameters())
    attributed = {id(first_names[n]): n for n in names if n in first_names}
    owners: dict[int, list[str]] = {}
    for mname, m in module.named_modules():  # each module object once, under its first name
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in attributed:
                owners.setdefault(id(p), []).append(f"{mname or '<root>'!r} ({type(m).__name__}, as its {pname})")
    shared = {attributed[i]: used for i, used in owners.items() if len(used) > 1}
    if shared:
        described = "; ".join(f"{name!r} belongs to the modules {' and '.join(used)}" for name, used in shared.items())
        raise ValueError(
            f"K-FAC/EK-FAC cannot factor a parameter shared by several modules (a tied weight or bias): {described}. "
            "Each module's Kronecker factors would count only its own use of the parameter, not the other modules' share "
            "of its gradient, so the scores would be wrong. Use solver='exact', 'cg' or 'arnoldi' (they differentiate "
            "through every use), untie the parameter, or leave it out of params="
        )
    layers, claimed = [], set()
    for mname, m in module.named_modules():
        if not isinstance(m, _SUPPORTED_LAYERS):
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            continue
        if id(m.weight) in attributed:
            w = attributed[id(m.weight)]
            b = attributed.get(id(m.bias)) if m.bias is not None else None
            layers.append(_Layer(mname, m, w, b))
            claimed |= {w} | ({b} if b is not None else set())
    rest = [n for n in names if n not in claimed]
    if rest:
        raise ValueError(
            f"K-FAC/EK-FAC attributes only nn.Linear and nn.Conv2d (groups=1, zero padding) layers, with the bias only "
            f"together with its weight; these attributed parameters are not covered: {rest}. Restrict params= to the "
            "supported layers' weights and biases, or use another solver"
        )
    return layers


class KroneckerFactors:
    """Per-layer K-FAC / EK-FAC approximation of the GGN (or Fisher) of the mean training loss.

    Collects, over the training batches, ``A = mean_{i,t} a a^T`` (layer inputs, per location
    ``t`` for convolutions or sequence positions, with a ones entry for the bias) and
    ``S = mean_i sum_{k,t} g g^T`` (per-sample gradients at the layer outputs of the
    pseudo-losses ``k`` chosen by ``fisher``). ``corrected=True`` (EK-FAC) then takes a second
    pass for the second moments of the per-sample gradients in the eigenbasis of
    ``S (x) A``. :meth:`solve` applies ``(G_layer + damping I)^{-1}`` block by block.

    Refuses attributed parameters outside supported layers (``nn.Linear``; ``nn.Conv2d`` with
    ``groups=1`` and zero padding) and a bias attributed without its weight.
    """

    def __init__(
        self,
        module: nn.Module,
        space: ParameterSpace,
        outputs: OutputModel,
        fisher: str = "gauss_newton",
        corrected: bool = True,
        seed: int = 0,
    ) -> None:
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        self.module, self.space, self.outputs, self.fisher, self.corrected = module, space, outputs, fisher, corrected
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.layers = self._find_layers()
        self.num_samples = 0
        self.curvature_trace = math.nan

    def _find_layers(self) -> list[_Layer]:
        return kronecker_layers(self.module, self.space.names)

    # -- hooks: per layer, inputs [B, T, D] and output gradients [B, T, out]
    def _inputs(self, layer: _Layer, x: Tensor) -> Tensor:
        m = layer.module
        if isinstance(m, nn.Conv2d):
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if layer.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a.to(torch.float64)

    @staticmethod
    def _out_grad(layer: _Layer, g: Tensor) -> Tensor:
        if isinstance(layer.module, nn.Conv2d):
            return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).to(torch.float64)
        return g.reshape(g.shape[0], -1, g.shape[-1]).to(torch.float64)

    def _pass(self, batch: Any) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """One batch: layer inputs and, for each pseudo-loss column, the output gradients."""
        acts: dict[str, Tensor] = {}
        outs: dict[str, Tensor] = {}
        handles = []
        for layer in self.layers:
            def fwd(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor, layer: _Layer = layer) -> None:
                if layer.name in acts:
                    raise ValueError(
                        f"K-FAC/EK-FAC: layer {layer.name!r} is called more than once in one forward pass (a shared layer): "
                        "its factors would count only one of the calls. Use solver='cg', 'arnoldi', 'lissa' or 'exact', "
                        "or leave its parameters out of params="
                    )
                acts[layer.name] = self._inputs(layer, inp[0].detach())
                outs[layer.name] = out
            handles.append(layer.module.register_forward_hook(fwd))
        try:
            with torch.enable_grad():
                if self.fisher == "empirical":
                    losses = self.module.per_sample_loss(batch)  # type: ignore[operator]
                    roots, seeds = [losses], [torch.ones_like(losses)]
                else:
                    out = self.outputs.outputs(None, batch)
                    L = _psd_sqrt(self.outputs.output_hessians(out, batch))  # [B, C, C]
                    if self.fisher == "gauss_newton":
                        seeds = [L[:, :, k] for k in range(L.shape[2])]
                    else:
                        eps = torch.randn(L.shape[0], L.shape[2], generator=self.generator, dtype=L.dtype).to(L.device)
                        seeds = [torch.einsum("bck,bk->bc", L, eps)]
                    roots = [out] * len(seeds)
                unused = [l.name for l in self.layers if l.name not in outs]
                if unused:
                    raise ValueError(
                        f"K-FAC/EK-FAC: the attributed layers {unused} are not called when the model computes its outputs "
                        "(an unused or auxiliary head?), so they have no inputs to factor. Leave their parameters out of "
                        "params=, or use solver='cg', 'arnoldi', 'lissa' or 'exact'"
                    )
                layer_outs = [outs[l.name] for l in self.layers]
                columns = []
                for k, (root, seed) in enumerate(zip(roots, seeds)):
                    grads = torch.autograd.grad(root, layer_outs, grad_outputs=seed.to(root.dtype), retain_graph=k + 1 < len(seeds), allow_unused=True)
                    columns.append({l.name: self._out_grad(l, g if g is not None else torch.zeros_like(o)) for l, g, o in zip(self.layers, grads, layer_outs)})
        finally:
            for h in handles:
                h.remove()
        return acts, columns

    def fit(self, batches: Batches, progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None) -> KroneckerFactors:
        """Collect the factors (and, for EK-FAC, the corrected eigenvalues) over ``batches()``."""
        wrap = progress or (lambda it, desc: it)
        sums_A = {l.name: 0.0 for l in self.layers}
        sums_S = {l.name: 0.0 for l in self.layers}
        squared_norms: Tensor | float = 0.0
        n = 0
        for batch in wrap(batches(), "K-FAC factors"):
            acts, columns = self._pass(batch)
            n += batch_size(batch)
            for l in self.layers:
                a = acts[l.name]
                sums_A[l.name] = sums_A[l.name] + torch.einsum("btd,bte->de", a, a) / a.shape[1]
                for col in columns:
                    g = col[l.name]
                    sums_S[l.name] = sums_S[l.name] + torch.einsum("bto,btp->op", g, g)
                    squared_norms = squared_norms + _squared_gradient_norms(a, g)
        if n == 0:
            raise ValueError("the training loader produced no samples: K-FAC factors are undefined")
        self.num_samples = n
        self.curvature_trace = float(squared_norms) / n
        if not math.isfinite(self.curvature_trace):
            raise NonFiniteCurvatureError("the trace of the Kronecker-factored curvature (the per-sample pseudo-gradients) is not finite")
        for l in self.layers:
            l.A = sums_A[l.name] / n
            l.S = sums_S[l.name] / n
            _check_finite(l.A, f"the K-FAC input factor A of layer {l.name!r}")
            _check_finite(l.S, f"the K-FAC output-gradient factor S of layer {l.name!r}")
            ea, l.QA = torch.linalg.eigh(l.A)
            es, l.QS = torch.linalg.eigh(l.S)
            l.eig = es.clamp_min(0).unsqueeze(1) * ea.clamp_min(0).unsqueeze(0)
        if self.corrected:
            sums = {l.name: 0.0 for l in self.layers}
            for batch in wrap(batches(), "EK-FAC eigenvalues"):
                acts, columns = self._pass(batch)
                for l in self.layers:
                    aq = acts[l.name] @ l.QA  # [B, T, D]
                    for col in columns:
                        gq = col[l.name] @ l.QS  # [B, T, out]
                        sums[l.name] = sums[l.name] + (torch.einsum("bto,btd->bod", gq, aq) ** 2).sum(0)
            for l in self.layers:
                l.eig = sums[l.name] / n
                _check_finite(l.eig, f"the EK-FAC eigenvalues of layer {l.name!r}")
        return self

    def trace(self) -> float:
        """``trace(C)`` of the curvature the factors approximate (the GGN, or the sampled or
        empirical Fisher, of the attributed parameters): the mean squared norm of the per-sample
        pseudo-gradients, exact, collected in the first pass of :meth:`fit` (the same for K-FAC and
        EK-FAC; EK-FAC's eigenvalues sum to it too, K-FAC's products ``s_j a_k`` do not)."""
        if self.layers[0].eig is None:
            raise RuntimeError("call fit() before trace()")
        return self.curvature_trace

    def approximation_trace(self) -> float:
        """``trace`` of the block-diagonal approximation itself (the sum of its eigenvalues:
        ``s_j a_k`` for K-FAC, which differs from :meth:`trace`; the corrected ones for EK-FAC)."""
        return float(sum(float(l.eig.sum()) for l in self.layers))  # type: ignore[union-attr]

    def solve(self, rhs: Tensor, damping: float) -> Tensor:
        """``blockdiag(G_layer + damping I)^{-1} rhs`` for float64 ``rhs[P, Q]``."""
        if self.layers[0].eig is None:
            raise RuntimeError("call fit() before solve()")
        out = torch.zeros_like(rhs)
        offsets = dict(zip(self.space.names, _offsets(self.space)))
        for l in self.layers:
            w0, w1 = offsets[l.weight]
            n_out = l.S.shape[0]  # type: ignore[union-attr]
            W = rhs[w0:w1].T.reshape(rhs.shape[1], n_out, -1)  # [Q, out, in]
            if l.bias is not None:
                b0, b1 = offsets[l.bias]
                W = torch.cat([W, rhs[b0:b1].T.unsqueeze(2)], dim=2)
            rot = l.QS.T @ W @ l.QA  # type: ignore[union-attr]
            rot = rot / (l.eig + damping)
            back = l.QS @ rot @ l.QA.T  # type: ignore[union-attr]
            if l.bias is not None:
                out[b0:b1] = back[:, :, -1].T
                back = back[:, :, :-1]
            out[w0:w1] = back.reshape(rhs.shape[1], -1).T
        return out


def _squared_gradient_norms(a: Tensor, g: Tensor) -> Tensor:
    """``sum_i |sum_t g_it a_it^T|_F^2``: the squared Frobenius norms of a layer's per-sample
    weight gradients (inputs ``a[B, T, D]``, output gradients ``g[B, T, out]``), by whichever of
    the Gram form ``sum_{t,s} (g_t . g_s)(a_t . a_s)`` and the explicit gradients is cheaper."""
    T, D, O = a.shape[1], a.shape[2], g.shape[2]
    if T == 1:
        return ((g[:, 0] ** 2).sum(1) * (a[:, 0] ** 2).sum(1)).sum()
    if T * (D + O) <= D * O:
        return (torch.einsum("btd,bsd->bts", a, a) * torch.einsum("bto,bso->bts", g, g)).sum()
    return (torch.einsum("bto,btd->bod", g, a) ** 2).sum()


def _offsets(space: ParameterSpace) -> list[tuple[int, int]]:
    result, start = [], 0
    for n in space.numels:
        result.append((start, start + n))
        start += n
    return result


# ------------------------------------------------------------------------ dispatcher
def solve(
    solver: str,
    operator: CurvatureOperator | None,
    rhs: Tensor,
    damping: float,
    *,
    damping_scale: str = "mean_eigenvalue",
    max_exact_parameters: int = 5000,
    chunk_size: int = 64,
    cg_tol: float = 1e-8,
    cg_max_iter: int = 1000,
    lissa_scale: float | None = None,
    lissa_depth: int = 1000,
    lissa_repeats: int = 1,
    lissa_batches: Batches | None = None,
    arnoldi_iterations: int = 200,
    arnoldi_rank: int = 50,
    kronecker: KroneckerFactors | None = None,
    seed: int = 0,
) -> SolveResult:
    """``(C + lambda I)^{-1} rhs`` with the named solver (float64 ``rhs[P, Q]``; see the module
    docstring). ``operator`` gives the curvature products (all solvers but ``ekfac``/``kfac``, which
    take fitted ``kronecker`` factors). ``lambda`` is resolved from ``damping`` and
    ``damping_scale`` (:func:`resolve_damping`). ``lissa_batches`` (default: the operator's)
    are the batches the LiSSA recursion cycles through. An indefinite ``C + lambda I`` is warned
    about or refused (see *Indefinite curvature* in the module docstring)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {SOLVERS}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if damping_scale not in DAMPING_SCALES:
        raise ValueError(f"damping_scale must be one of {DAMPING_SCALES}, got {damping_scale!r}")
    rhs = rhs.to(torch.float64)
    if solver in ("ekfac", "kfac"):
        if kronecker is None:
            raise ValueError(f"solver {solver!r} needs fitted KroneckerFactors (kronecker=...)")
        lam = resolve_damping(damping, damping_scale, lambda: kronecker.trace() / kronecker.space.size)
        return SolveResult(kronecker.solve(rhs, lam), lam, {"layers": len(kronecker.layers)})
    if operator is None:
        raise ValueError(f"solver {solver!r} needs a CurvatureOperator")
    P = operator.size
    if solver == "exact":
        if P > max_exact_parameters:
            raise ValueError(
                f"solver='exact' builds the explicit {P} x {P} curvature, above max_exact_parameters={max_exact_parameters}: "
                "use solver='cg', 'arnoldi', 'lissa' or 'ekfac', attribute fewer parameters (params=[...]), or raise max_exact_parameters"
            )
        M = operator.matrix(chunk_size)
        lam = resolve_damping(damping, damping_scale, lambda: float(torch.trace(M)) / P)
        X, info = exact_solve(M, rhs, lam)
        return SolveResult(X, lam, info)
    trace = lambda: hutchinson_trace(operator.matvec, P, seed=seed, device=rhs.device) / P  # noqa: E731
    if solver == "cg":
        lam = resolve_damping(damping, damping_scale, trace)
        X, info = conjugate_gradient(operator.matvec, rhs, lam, cg_tol, cg_max_iter)
        return SolveResult(X, lam, info)
    # trace(C) / P, for the advice in relative units
    mean_eigenvalue = lambda lam: lam / damping if damping_scale == "mean_eigenvalue" and damping > 0 else None  # noqa: E731
    if solver == "lissa":
        lam = resolve_damping(damping, damping_scale, trace)
        checks: dict[str, Any] = {}
        if lissa_scale is None:
            # 20 Ritz values: the top one sets the scale, the lowest checks C + lam I for negative eigenvalues
            ritz, _, _ = arnoldi_eigenpairs(operator.matvec, P, 20, 20, seed=seed, device=rhs.device)
            lissa_scale = 2.0 * (float(ritz.abs().max()) + lam)
            checks = {"min_ritz_value": float(ritz.min())}
            checks.update(check_definite("lissa", ritz, lam, P, mean_eigenvalue=mean_eigenvalue(lam), complete=False))
        X, info = lissa(operator.batch_matvec, lissa_batches or operator.batches, rhs, lam, lissa_scale, lissa_depth, lissa_repeats)
        return SolveResult(X, lam, {**info, **checks})
    # arnoldi
    evals, U, info = arnoldi_eigenpairs(operator.matvec, P, arnoldi_iterations, arnoldi_rank, seed=seed, device=rhs.device)
    lam = resolve_damping(damping, damping_scale, trace)
    denom = evals + lam
    if bool((denom.abs() < 1e-12 * max(float(denom.abs().max()), 1e-300)).any()):
        raise ValueError("an Arnoldi eigenvalue of C + damping I is ~0: increase damping")
    info.update({"min_eigenvalue": float(evals.min()), "max_eigenvalue": float(evals.max())})
    info.update(check_definite("arnoldi", evals, lam, P, mean_eigenvalue=mean_eigenvalue(lam), complete=False))
    X = U @ ((U.T @ rhs) / denom.unsqueeze(1))
    return SolveResult(X, lam, info)
