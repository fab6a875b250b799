"""Optimizer steps as pure functions on flat vectors, and their linearisation.

Diff-In needs, for every recorded step ``t``, the sensitivity of the step's outputs (the new
parameters and the new optimizer state) to its inputs (parameters, optimizer state, and the
gradient the step was fed). A :class:`StepModel` writes one optimizer step as a pure function

    (theta_{t+1}, state_{t+1}) = update(theta_t, state_t, g_t, hyper_t)

of flat vectors, mirroring ``torch.optim`` exactly (checked against the real optimizer on the
first recorded steps of every fit), including gradient clipping (applied to the raw batch
gradient ``g_t``, as Lightning does after ``on_before_optimizer_step``). Its vector-Jacobian
product (:meth:`StepModel.vjp`, by autograd through ``update``) is what the reverse sweep
needs: given the adjoints of the outputs it returns the adjoints of ``theta_t``, ``state_t``
and ``g_t``. One mechanism for every family; a family only states its update.

Modelled (per parameter group, any mix): ``torch.optim.SGD`` with momentum, dampening,
Nesterov, coupled weight decay and ``maximize``; ``torch.optim.Adam`` / ``AdamW`` with coupled
or decoupled weight decay, ``amsgrad`` and ``maximize``; ``torch.optim.RMSprop`` with
``alpha``, momentum, ``centered``, weight decay and ``maximize``; ``torch.optim.Adagrad`` with
``lr_decay``, ``initial_accumulator_value``, weight decay and ``maximize``; ``torch.optim.NAdam``
(its momentum schedule) and ``torch.optim.RAdam`` (its rectification), with coupled or decoupled
weight decay and ``maximize``. The learning rate and every other
hyperparameter are read per step, so any scheduler (including ones that cycle momentum or
betas) is followed. Gradient clipping by norm (over all parameters of the optimizer) or by
value.

The second moment of the adaptive families (Adam's ``v``, RMSprop's ``square_avg`` and
``grad_avg``, Adagrad's ``sum``): ``second_moment="linearized"`` (default) differentiates it too,
so the removed sample's effect on the preconditioner is carried; ``"frozen"`` treats the
preconditioner ``lr / (sqrt(v_hat) + eps)`` as fixed along the trajectory (cheaper to reason
about; the README measures what it costs for Adam).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_influence.kernels import parameter_names

SecondMoment = Literal["linearized", "frozen"]
ClipAlgorithm = Literal["norm", "value"]

MODELLED_OPTIMIZERS = (
    "torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize), torch.optim.Adam and "
    "torch.optim.AdamW (weight_decay, amsgrad, maximize), torch.optim.RMSprop (alpha, momentum, centered, "
    "weight_decay, maximize), torch.optim.Adagrad (lr_decay, initial_accumulator_value, weight_decay, maximize), "
    "torch.optim.NAdam (momentum_decay, weight_decay coupled or decoupled, maximize) and torch.optim.RAdam "
    "(weight_decay coupled or decoupled, maximize)"
)


class UnsupportedOptimizer(ValueError):
    """The optimizer (or one of its options) is not modelled: scores would be wrong."""


def torch_optimizer(optimizer: Any, owner: str = "DiffIn") -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer``, or ``optimizer`` itself. Only
    Lightning's wrapper is looked through: another library's wrapper that keeps an inner optimizer
    in an attribute (a Lookahead, say) takes other steps than that inner optimizer, and is returned
    as it is (so that it is judged as what it is, e.g. refused as an unmodelled optimizer).
    ``UnsupportedOptimizer`` for an object that is not a ``torch.optim.Optimizer`` at all."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedOptimizer(
            f"{owner} follows optimizers that are a torch.optim.Optimizer (their steps, hooks and parameter groups); "
            f"configure_optimizers returned a {type(optimizer).__module__}.{type(optimizer).__qualname__}, which is not "
            f"one. {MODELLED_OPTIMIZERS}"
        )
    return optimizer


def _sqrt_safe(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative is 0 (not infinite) where ``x == 0``: a coordinate whose
    gradient was always exactly zero has ``v = 0`` and no sample can change that."""
    positive = x > 0
    return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


def _preconditioned(numerator: Tensor, second: Tensor, denom: Tensor) -> Tensor:
    """``numerator / denom`` of an adaptive update, 0 (with a zero derivative) where the second
    moment ``second`` is exactly 0: a coordinate whose gradient was always exactly 0 (a weight on
    an input that is always 0, a dead unit), which no sample's removal can move. Its derivative
    ``1 / eps`` there (1e8 and more) would swamp the products' directions and cost their finite
    differences their precision."""
    return torch.where(second > 0, numerator / denom, torch.zeros_like(numerator))


def _where(condition: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.where`` that picks a whole branch when the condition is one scalar."""
    if condition.dim() == 0:
        return a if bool(condition) else b
    return torch.where(condition, a, b)


@dataclass(frozen=True)
class _Family:
    """One optimizer family: the hyperparameter columns read per step and parameter tensor,
    and the state vectors it carries between steps."""

    name: str
    hyper: tuple[str, ...]
    state: tuple[str, ...]


_SGD = _Family("sgd", ("lr", "momentum", "dampening", "weight_decay", "nesterov", "sign"), ("momentum_buffer",))
_ADAM = _Family(
    "adam",
    ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "bias_correction1", "bias_correction2", "sign", "amsgrad"),
    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
)
_RMSPROP = _Family("rmsprop", ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "sign"), ("square_avg", "momentum_buffer", "grad_avg"))
_ADAGRAD = _Family("adagrad", ("lr", "lr_decay_factor", "eps", "weight_decay", "sign"), ("sum",))
_NADAM = _Family(
    "nadam", ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "bias_correction2", "grad_coef", "avg_coef", "sign"),
    ("exp_avg", "exp_avg_sq"),
)
_RADAM = _Family(
    "radam", ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "bias_correction1", "bias_correction2", "rect", "sign"),
    ("exp_avg", "exp_avg_sq"),
)
_FAMILIES: dict[type, _Family] = {
    torch.optim.SGD: _SGD,
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.RMSprop: _RMSPROP,
    torch.optim.Adagrad: _ADAGRAD,
    torch.optim.NAdam: _NADAM,
    torch.optim.RAdam: _RADAM,
}


class StepModel:
    """The update of one optimizer over the flat parameter vector of ``params`` (in order).

    ``params`` must be the optimizer's parameters that are attributed, ``groups`` their
    optimizer-group index (one per tensor), ``numels`` their sizes. ``clip_val`` /
    ``clip_algorithm`` model Lightning's gradient clipping; with a parameter subset the norm
    of the other parameters' gradient enters as a recorded constant (``rest_norm_sq``).
    """

    def __init__(
        self,
        optimizer: Any,
        params: Sequence[Tensor],
        *,
        clip_val: float | None = None,
        clip_algorithm: ClipAlgorithm = "norm",
        second_moment: SecondMoment = "linearized",
    ) -> None:
        inner = torch_optimizer(optimizer)
        kind = type(inner)
        if kind not in _FAMILIES:
            raise UnsupportedOptimizer(f"DiffIn does not model optimizer {kind.__name__}; supported: {MODELLED_OPTIMIZERS}")
        self.family = _FAMILIES[kind]
        if clip_algorithm not in ("norm", "value"):
            raise ValueError(f"clip_algorithm must be 'norm' or 'value', got {clip_algorithm!r}")
        if second_moment not in ("linearized", "frozen"):
            raise ValueError(f"second_moment must be 'linearized' or 'frozen', got {second_moment!r}")
        self.optimizer = inner
        self.params = list(params)
        self.clip_val = float(clip_val) if clip_val else None
        self.clip_algorithm: ClipAlgorithm = clip_algorithm
        self.second_moment: SecondMoment = second_moment
        group_of = {id(p): g for g, group in enumerate(inner.param_groups) for p in group["params"]}
        missing = [i for i, p in enumerate(self.params) if id(p) not in group_of]
        if missing:
            raise ValueError("an attributed parameter is not in the optimizer: it never moves, leave it out")
        self.group_index = [group_of[id(p)] for p in self.params]
        self.numels = torch.tensor([p.numel() for p in self.params])
        for g, group in enumerate(inner.param_groups):
            _check_group(kind, g, group)
        # Only the state this optimizer really carries is recorded.
        groups = inner.param_groups
        unused: set[str] = set()
        if self.family in (_SGD, _RMSPROP) and not any(float(g.get("momentum", 0.0)) != 0.0 for g in groups):
            unused.add("momentum_buffer")
        if self.family is _ADAM and not any(g.get("amsgrad", False) for g in groups):
            unused.add("max_exp_avg_sq")
        if self.family is _RMSPROP and not any(g.get("centered", False) for g in groups):
            unused.add("grad_avg")
        self.state_names: tuple[str, ...] = tuple(n for n in self.family.state if n not in unused)
        self._expanded: tuple[Tensor, dict[str, Tensor], dict[str, float]] | None = None

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return (*self.family.hyper, "rest_norm_sq")

    @property
    def is_adaptive(self) -> bool:
        """Every family but SGD (Adam/AdamW, NAdam, RAdam, RMSprop, Adagrad): the update divides by
        ``sqrt(v) + eps``, per coordinate."""
        return self.family is not _SGD

    @property
    def second_moment_starts_at_zero(self) -> bool:
        """Adaptive, with a second moment that starts at 0 (all but Adagrad with a positive
        ``initial_accumulator_value``): where a coordinate's gradients stay near 0 the update's
        derivative approaches ``lr / eps``."""
        if not self.is_adaptive:
            return False
        return not (self.family is _ADAGRAD and float(self.optimizer.defaults.get("initial_accumulator_value", 0.0)) > 0)

    @property
    def is_stateless_sgd(self) -> bool:
        """The update is ``theta - lr * (sign * g + weight_decay * theta)``: no state, no clipping."""
        return self.family is _SGD and not self.state_names and self.clip_val is None

    def treats_missing_gradient_as_zero(self) -> bool:
        """A parameter without a gradient is skipped by ``torch.optim``; the model feeds it a zero
        gradient instead, which is the same update only for stateless SGD without weight decay."""
        return self.is_stateless_sgd and all(float(g.get("weight_decay", 0.0)) == 0.0 for g in self.optimizer.param_groups)

    # ------------------------------------------------------------------ reading the live optimizer
    def capture(self, rest_norm_sq: float = 0.0) -> tuple[Tensor, dict[str, list[Tensor | None]]]:
        """The step about to be taken: ``hyper`` (float64 ``[tensors, H]``) and the optimizer state
        before the step, per state name a list of per-tensor tensors (``None``: not yet created,
        i.e. zeros)."""
        rows: list[list[float]] = []
        state: dict[str, list[Tensor | None]] = {name: [] for name in self.state_names}
        groups = self.optimizer.param_groups
        self._check_unrecorded_state(groups)
        for p, g in zip(self.params, self.group_index, strict=True):
            group, st = groups[g], self.optimizer.state.get(p, {})
            if self.family is _SGD:
                momentum = float(group.get("momentum", 0.0))
                first = st.get("momentum_buffer") is None
                # torch.optim.SGD starts the buffer as a copy of the first gradient: no dampening then.
                dampening = 0.0 if first else float(group.get("dampening", 0.0))
                row = [float(group["lr"]), momentum, dampening, float(group.get("weight_decay", 0.0)),
                       float(bool(group.get("nesterov", False))), -1.0 if group.get("maximize", False) else 1.0]
            elif self.family is _RMSPROP:
                row = [float(group["lr"]), float(group["alpha"]), float(group["eps"]), float(group.get("weight_decay", 0.0)),
                       float(group.get("momentum", 0.0)), float(bool(group.get("centered", False))),
                       -1.0 if group.get("maximize", False) else 1.0]
            elif self.family in (_NADAM, _RADAM):
                row = [float(group["lr"]), *(float(b) for b in group["betas"]), float(group["eps"]),
                       float(group.get("weight_decay", 0.0)), float(bool(group.get("decoupled_weight_decay", False))),
                       *self._schedule_columns(group, st), -1.0 if group.get("maximize", False) else 1.0]
            elif self.family is _ADAGRAD:
                done = float(st["step"]) if "step" in st else 0.0  # steps taken before this one
                row = [float(group["lr"]), 1.0 / (1.0 + done * float(group.get("lr_decay", 0.0))), float(group["eps"]),
                       float(group.get("weight_decay", 0.0)), -1.0 if group.get("maximize", False) else 1.0]
            else:
                beta1, beta2 = (float(b) for b in group["betas"])
                step = float(st["step"]) + 1.0 if "step" in st else 1.0
                decoupled = isinstance(self.optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
                row = [float(group["lr"]), beta1, beta2, float(group["eps"]), float(group.get("weight_decay", 0.0)),
                       float(decoupled), 1.0 - beta1**step, 1.0 - beta2**step,
                       -1.0 if group.get("maximize", False) else 1.0, float(bool(group.get("amsgrad", False)))]
            rows.append([*row, float(rest_norm_sq)])
            for name in self.state_names:
                value = st.get(name)
                state[name].append(value.detach() if isinstance(value, Tensor) else None)
        return torch.tensor(rows, dtype=torch.float64), state

    def _check_unrecorded_state(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Only the state the optimizer carried at fit start is recorded (see ``__init__``): an
        option that starts a state of its own later (momentum set above 0 by a hook or a
        scheduler, amsgrad or centered switched on) would be modelled without it."""
        switches = (("momentum_buffer", "momentum", lambda v: float(v) != 0.0), ("max_exp_avg_sq", "amsgrad", bool), ("grad_avg", "centered", bool))
        for name, option, active in switches:
            if name in self.family.state and name not in self.state_names:
                turned_on = [g for g, group in enumerate(groups) if active(group.get(option, 0.0))]
                if turned_on:
                    raise UnsupportedOptimizer(
                        f"{option}={groups[turned_on[0]][option]!r} in parameter group {turned_on[0]} of "
                        f"{type(self.optimizer).__name__}, but no group had {option} when the fit started, so the state "
                        f"it needs ({name}) is not recorded and the steps would be modelled without it. Build the "
                        f"optimizer with {option} on from the start (the same value throughout, or a schedule that "
                        "starts from a non-zero value), or keep it off for the whole fit"
                    )

    # ------------------------------------------------------------------ the pure update
    def expand(self, hyper: Tensor, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Per-coordinate hyperparameters: a 0-d tensor where a column is the same for every
        parameter tensor (the common case: broadcast, no P-sized vector), else the flat
        per-coordinate vector. Cached while the hyperparameters do not change between steps."""
        return self._expand(hyper, dtype, device)[0]

    def uniform(self, hyper: Tensor, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
        """The hyperparameters that are the same for every parameter tensor, as Python numbers
        (read from the host copy: no device synchronisation)."""
        return self._expand(hyper, dtype, device)[1]

    def _expand(self, hyper: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, Tensor], dict[str, float]]:
        cached = self._expanded
        if cached is not None and torch.equal(cached[0], hyper):
            first = next(iter(cached[1].values()))
            if first.dtype == dtype and first.device == torch.device(device):
                return cached[1], cached[2]
        out: dict[str, Tensor] = {}
        uniform: dict[str, float] = {}
        for j, name in enumerate(self.hyper_names):
            column = hyper[:, j]
            if bool((column == column[0]).all()):
                uniform[name] = float(column[0])
                out[name] = torch.tensor(uniform[name], dtype=dtype, device=device)
            else:
                out[name] = column.to(device).repeat_interleave(self.numels.to(device)).to(dtype)
        self._expanded = (hyper.clone(), out, uniform)
        return out, uniform

    def clip(self, grad: Tensor, h: Mapping[str, Tensor]) -> Tensor:
        """The gradient after Lightning's clipping (``torch.nn.utils.clip_grad_norm_`` / value)."""
        if self.clip_val is None:
            return grad
        if self.clip_algorithm == "value":
            return grad.clamp(-self.clip_val, self.clip_val)
        norm = (grad.square().sum() + h["rest_norm_sq"].reshape(-1)[0]).sqrt()
        coef = torch.clamp(self.clip_val / (norm + 1e-6), max=1.0)
        return grad * coef

    def update(
        self, theta: Tensor, state: Mapping[str, Tensor], grad: Tensor, hyper: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One step: ``(theta_next, state_next)`` from flat ``theta``, ``state`` and raw gradient
        ``grad`` (all one dtype), differentiable in all three. ``out``: a buffer that stateless SGD
        writes ``theta_next`` into (no autograd through it; other updates allocate)."""
        h, uniform = self._expand(hyper, theta.dtype, theta.device)
        g = self.clip(grad, h)
        if uniform.get("sign") != 1.0:
            g = g * h["sign"]
        if self.family is _SGD:
            wd = uniform.get("weight_decay")
            # torch.optim.SGD's own operations where the hyperparameters are scalars (the same rounding)
            d = g if wd == 0.0 else (g.add(theta, alpha=wd) if wd is not None else g + h["weight_decay"] * theta)
            if not self.state_names:
                if "lr" in uniform:  # param.add_(d, alpha=-lr): one pass (into ``out`` when given)
                    return torch.add(theta, d, alpha=-uniform["lr"], out=out), {}
                if out is not None:
                    return torch.mul(d, h["lr"], out=out).neg_().add_(theta), {}
                return theta - h["lr"] * d, {}
            buf = h["momentum"] * state["momentum_buffer"] + (1.0 - h["dampening"]) * d
            step = _where(h["nesterov"] > 0, d + h["momentum"] * buf, buf)
            # A group without momentum keeps no buffer: its buffer stays zero.
            has_momentum = h["momentum"] != 0
            buf = _where(has_momentum, buf, torch.zeros_like(buf))
            step = _where(has_momentum, step, d)
            return theta - h["lr"] * step, {"momentum_buffer": buf}
        if self.family is _RMSPROP:
            return self._rmsprop(theta, state, g, h, uniform)
        if self.family is _ADAGRAD:
            return self._adagrad(theta, state, g, h, uniform)
        if self.family is _NADAM:
            return self._nadam(theta, state, g, h, uniform)
        if self.family is _RADAM:
            return self._radam(theta, state, g, h, uniform)
        # Adam / AdamW (torch.optim's single-tensor formula)
        theta, g, m, new_state = self._adam_family(theta, state, g, h, uniform)
        v = second = new_state["exp_avg_sq"]
        if "max_exp_avg_sq" in self.state_names:
            prev_max = state["max_exp_avg_sq"] if self.second_moment == "linearized" else state["max_exp_avg_sq"].detach()
            amsgrad = h["amsgrad"] > 0
            new_state["max_exp_avg_sq"] = _where(amsgrad, torch.maximum(prev_max, v), torch.zeros_like(v))
            second = _where(amsgrad, new_state["max_exp_avg_sq"], v)
        denom = _sqrt_safe(second) / h["bias_correction2"].sqrt() + h["eps"]
        return theta - (h["lr"] / h["bias_correction1"]) * _preconditioned(m, second, denom), new_state

    def _schedule_columns(self, group: Mapping[str, Any], st: Mapping[str, Any]) -> list[float]:
        """NAdam's and RAdam's per-step scalars, from the step count (and NAdam's running
        ``mu_product``) before this step, as torch computes them: NAdam ``(1 - beta2^t,
        -lr (1 - mu_t) / (1 - prod mu), -lr mu_{t+1} / (1 - prod mu * mu_{t+1}))``; RAdam
        ``(1 - beta1^t, 1 - beta2^t, rect_t)``, ``rect_t = 0`` while ``rho_t <= 5`` (the step is
        then the bias-corrected momentum alone)."""
        beta1, beta2 = (float(b) for b in group["betas"])
        step = float(st["step"]) + 1.0 if "step" in st else 1.0
        lr = float(group["lr"])
        if self.family is _NADAM:
            decay = float(group["momentum_decay"])
            mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * decay))
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1.0) * decay))
            # torch keeps the running product as a scalar tensor (float32 unless float64 is the default dtype)
            previous = st.get("mu_product")
            if not isinstance(previous, Tensor):
                previous = torch.tensor(1.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)
            product = float(previous * mu)
            return [1.0 - beta2**step, -lr * (1.0 - mu) / (1.0 - product), -lr * mu_next / (1.0 - product * mu_next)]
        bias2 = 1.0 - beta2**step
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho = rho_inf - 2.0 * step * beta2**step / bias2
        rect = math.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho)) if rho > 5.0 else 0.0
        return [1.0 - beta1**step, bias2, rect]

    def _adam_family(self, theta: Tensor, state: Mapping[str, Tensor], g: Tensor, h: Mapping[str, Tensor], uniform: Mapping[str, float]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The weight decay (coupled or decoupled) and moment updates of Adam, NAdam and RAdam:
        ``(theta after decoupled decay, the decayed gradient, m, new state)``."""
        if uniform.get("weight_decay") != 0.0:
            decoupled = h["decoupled"] > 0
            g = _where(decoupled, g, g + h["weight_decay"] * theta)
            theta = _where(decoupled, theta * (1.0 - h["lr"] * h["weight_decay"]), theta)
        m = state["exp_avg"] + (g - state["exp_avg"]) * (1.0 - h["beta1"])
        g_v, previous = self._second_moment_input(g, state["exp_avg_sq"])
        v = h["beta2"] * previous + (1.0 - h["beta2"]) * g_v * g_v
        return theta, g, m, {"exp_avg": m, "exp_avg_sq": v}

    def _nadam(self, theta: Tensor, state: Mapping[str, Tensor], g: Tensor, h: Mapping[str, Tensor], uniform: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """torch.optim.NAdam's single-tensor formula (``g``: clipped, signed)."""
        theta, g, m, new_state = self._adam_family(theta, state, g, h, uniform)
        v = new_state["exp_avg_sq"]
        denom = _sqrt_safe(v / h["bias_correction2"]) + h["eps"]
        return theta + h["grad_coef"] * _preconditioned(g, v, denom) + h["avg_coef"] * _preconditioned(m, v, denom), new_state

    def _radam(self, theta: Tensor, state: Mapping[str, Tensor], g: Tensor, h: Mapping[str, Tensor], uniform: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """torch.optim.RAdam's single-tensor formula (``g``: clipped, signed)."""
        theta, g, m, new_state = self._adam_family(theta, state, g, h, uniform)
        v = new_state["exp_avg_sq"]
        corrected = m / h["bias_correction1"]
        adaptive = _preconditioned(corrected, v, _sqrt_safe(v) + h["eps"]) * h["bias_correction2"].sqrt() * h["rect"]
        return theta - h["lr"] * _where(h["rect"] > 0, adaptive, corrected), new_state

    def _second_moment_input(self, g: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, previous)`` as the second-moment recursion sees them: detached when frozen."""
        if self.second_moment == "frozen":
            return g.detach(), previous.detach()
        return g, previous

    def _rmsprop(self, theta: Tensor, state: Mapping[str, Tensor], g: Tensor, h: Mapping[str, Tensor], uniform: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """torch.optim.RMSprop's single-tensor formula (``g``: clipped, signed)."""
        if uniform.get("weight_decay") != 0.0:
            g = g + h["weight_decay"] * theta
        g_v, previous = self._second_moment_input(g, state["square_avg"])
        square_avg = h["alpha"] * previous + (1.0 - h["alpha"]) * g_v * g_v
        new_state = {"square_avg": square_avg}
        second = square_avg
        if "grad_avg" in self.state_names:
            centered = h["centered"] > 0
            g_m, previous_mean = self._second_moment_input(g, state["grad_avg"])
            grad_avg = previous_mean + (g_m - previous_mean) * (1.0 - h["alpha"])
            new_state["grad_avg"] = _where(centered, grad_avg, torch.zeros_like(grad_avg))
            second = _where(centered, square_avg - grad_avg * grad_avg, square_avg)
        scaled = _preconditioned(g, second, _sqrt_safe(second) + h["eps"])
        if "momentum_buffer" in self.state_names:
            has_momentum = h["momentum"] > 0
            buf = h["momentum"] * state["momentum_buffer"] + scaled
            new_state["momentum_buffer"] = _where(has_momentum, buf, torch.zeros_like(buf))
            return theta - h["lr"] * _where(has_momentum, buf, scaled), new_state
        return theta - h["lr"] * scaled, new_state

    def _adagrad(self, theta: Tensor, state: Mapping[str, Tensor], g: Tensor, h: Mapping[str, Tensor], uniform: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """torch.optim.Adagrad's single-tensor formula (``g``: clipped, signed); the learning rate
        decays as ``lr / (1 + (step - 1) lr_decay)`` (``lr_decay_factor``, read per step)."""
        if uniform.get("weight_decay") != 0.0:
            g = g + h["weight_decay"] * theta
        g_v, previous = self._second_moment_input(g, state["sum"])
        total = previous + g_v * g_v
        return theta - (h["lr"] * h["lr_decay_factor"]) * _preconditioned(g, total, _sqrt_safe(total) + h["eps"]), {"sum": total}

    def step_size(self, hyper: Tensor) -> float:
        """The step's largest learning rate over the parameter tensors (Adagrad's decayed one), as
        the optimizer applies it: a step's change of the parameters, and so each sample's share in
        it, scales with this number. Read from ``hyper`` (host float64): no device read."""
        lr = hyper[:, self.hyper_names.index("lr")]
        if "lr_decay_factor" in self.hyper_names:
            lr = lr * hyper[:, self.hyper_names.index("lr_decay_factor")]
        return float(lr.abs().max()) if lr.numel() else 0.0

    def adjoint_scales(self, hyper: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[float, float] | None:
        """``(k, c)`` with ``a^theta = k * lambda`` and ``a^G = c * lambda`` when the step's transpose
        maps ``lambda`` (the adjoint of ``theta_next``) to multiples of itself: stateless SGD with
        one learning rate, sign and weight decay for every tensor (``k = 1 - lr * wd``,
        ``c = -lr * sign``: the scalar case of :meth:`vjp`'s closed form, for ``k > 0``). ``None``
        for every other step (use :meth:`vjp`)."""
        if not self.is_stateless_sgd:
            return None
        uniform = self.uniform(hyper, dtype, device)
        if not all(name in uniform for name in ("lr", "sign", "weight_decay")):
            return None
        keep = 1.0 - uniform["lr"] * uniform["weight_decay"]
        return (keep, -uniform["lr"] * uniform["sign"]) if keep > 0 else None

    def vjp(
        self,
        theta: Tensor,
        state: Mapping[str, Tensor],
        grad: Tensor,
        hyper: Tensor,
        adjoint_theta: Tensor,
        adjoint_state: Mapping[str, Tensor] | None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Adjoints of ``(theta, state, grad)`` given those of ``(theta_next, state_next)``
        (a missing ``adjoint_state`` is zero): the transpose of the linearised step."""
        if self.is_stateless_sgd:  # closed form of the common case: theta - lr * (sign * g + wd * theta)
            h = self.expand(hyper, adjoint_theta.dtype, adjoint_theta.device)
            a_grad = -(h["lr"] * h["sign"]) * adjoint_theta
            if bool(hyper[:, self.hyper_names.index("weight_decay")].any()):
                return adjoint_theta - h["lr"] * h["weight_decay"] * adjoint_theta, {}, a_grad
            return adjoint_theta, {}, a_grad
        dtype = adjoint_theta.dtype
        leaves_theta = theta.detach().to(dtype).requires_grad_(True)
        leaves_grad = grad.detach().to(dtype).requires_grad_(True)
        leaves_state = {n: state[n].detach().to(dtype).requires_grad_(True) for n in self.state_names}
        with torch.enable_grad():
            out_theta, out_state = self.update(leaves_theta, leaves_state, leaves_grad, hyper)
            outputs = [out_theta] + [out_state[n] for n in self.state_names]
            cotangents = [adjoint_theta] + [
                (adjoint_state[n] if adjoint_state is not None else torch.zeros_like(adjoint_theta)) for n in self.state_names
            ]
            live = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]  # frozen v: constant
            inputs = [leaves_theta, leaves_grad, *leaves_state.values()]
            grads = torch.autograd.grad([o for o, _ in live], inputs, [c for _, c in live], allow_unused=True)
        zero = torch.zeros_like(adjoint_theta)
        a_theta, a_grad, *a_state = (g if g is not None else zero for g in grads)
        return a_theta, dict(zip(self.state_names, a_state, strict=True)), a_grad


def _check_group(kind: type, index: int, group: Mapping[str, Any]) -> None:
    # foreach / fused / capturable implementations compute the same update; the first recorded
    # steps of every fit are checked against the real optimizer, so any mismatch is caught.
    if not math.isfinite(float(group["lr"])):
        raise ValueError(f"parameter group {index} of {kind.__name__} has a non-finite learning rate {group['lr']!r}")


def trainable_parameters(module: torch.nn.Module, optimizer: Any) -> list[tuple[str, Tensor, int]]:
    """The parameters the optimizer trains (``requires_grad``), in its order: each with its name in
    ``module`` (a tied parameter's first name) and the index of its parameter group. Refuses an
    optimizer holding a parameter the module does not own."""
    names = parameter_names(module)
    trained = []
    for g, group in enumerate(torch_optimizer(optimizer).param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not a parameter of the LightningModule")
            if p.requires_grad:
                trained.append((names[id(p)][0], p, g))
    return trained
