"""The pure optimizer steps of :mod:`lightning_influence.optimizers` against the real
``torch.optim`` classes, and their vector-Jacobian products against forward-mode JVPs."""

from __future__ import annotations

import pytest
import torch

from lightning_influence.optimizers import StepModel, UnsupportedOptimizer

CONFIGS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd-wd": (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.05}),
    "heavy-ball": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    "nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "sgd-maximize": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "maximize": True}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam-l2": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "adamw-amsgrad": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    "adam-foreach": (torch.optim.Adam, {"lr": 0.01, "foreach": True}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01}),
    "rmsprop-centered-momentum-l2": (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9, "momentum": 0.8, "centered": True, "weight_decay": 0.05}),
    "rmsprop-maximize-foreach": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "maximize": True, "foreach": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
    "adagrad-decay-l2": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1, "weight_decay": 0.05}),
    "adagrad-maximize-foreach": (torch.optim.Adagrad, {"lr": 0.1, "maximize": True, "foreach": True}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01}),
    "nadam-decoupled-maximize": (torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "momentum_decay": 0.01, "maximize": True}),
    "nadam-l2-foreach": (torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.05, "foreach": True}),
    "radam": (torch.optim.RAdam, {"lr": 0.01}),
    "radam-fast-rectification-l2": (torch.optim.RAdam, {"lr": 0.01, "betas": (0.9, 0.9), "weight_decay": 0.05}),
    "radam-decoupled-maximize-foreach": (torch.optim.RAdam, {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True, "foreach": True}),
}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_(True),
            torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(True),
            torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)]


def _flat(tensors, like):
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)])


@pytest.mark.parametrize("clip", [None, ("norm", 0.5), ("value", 0.3)], ids=["noclip", "norm", "value"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_reproduces_torch_optim_over_steps(name, clip):
    kind, options = CONFIGS[name]
    params = _params()
    # two groups, the second with its own learning rate
    optimizer = kind([{"params": params[:2]}, {"params": params[2:], "lr": options["lr"] * 3}], **options)
    model = StepModel(optimizer, params, clip_val=clip[1] if clip else None, clip_algorithm=clip[0] if clip else "norm")
    g = torch.Generator().manual_seed(1)
    for step in range(12):  # RAdam's rectification starts after its first steps (step 6 at betas (0.9, 0.9))
        for group in optimizer.param_groups:
            group["lr"] *= 0.9  # a scheduler
        raw = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        if step == 2:
            raw[1].zero_()  # a coordinate block with an exactly zero gradient
        hyper, state = model.capture()
        theta = _flat([p.detach() for p in params], params)
        flat_state = {n: _flat(v, params) for n, v in state.items()}
        grad = _flat(raw, params)
        predicted, _ = model.update(theta, flat_state, grad, hyper)
        for p, r in zip(params, raw):
            p.grad = r.clone()
        if clip and clip[0] == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip[1])
        elif clip:
            torch.nn.utils.clip_grad_value_(params, clip[1])
        optimizer.step()
        actual = _flat([p.detach() for p in params], params)
        torch.testing.assert_close(predicted, actual, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clip", [None, ("norm", 0.7), ("norm", 1e3), ("value", 0.5)], ids=["noclip", "norm", "inactive", "value"])
@pytest.mark.parametrize("second_moment", ["linearized", "frozen"])
@pytest.mark.parametrize(
    "name",
    ["sgd-wd", "sgd-maximize", "heavy-ball", "nesterov", "adam", "adam-l2", "adamw-amsgrad", "rmsprop",
     "rmsprop-centered-momentum-l2", "adagrad-decay-l2", "nadam-decoupled-maximize", "radam-fast-rectification-l2"],
)
def test_vjp_is_the_transpose_of_the_jvp(name, second_moment, clip):
    kind, options = CONFIGS[name]
    params = _params()
    optimizer = kind(params, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # non-trivial state
    model = StepModel(
        optimizer, params, clip_val=clip[1] if clip else None, clip_algorithm=clip[0] if clip else "norm", second_moment=second_moment
    )
    hyper, state = model.capture()
    theta = _flat([p.detach() for p in params], params)
    flat_state = {n: _flat(v, params) for n, v in state.items()}
    grad = torch.randn_like(theta)
    gen = torch.Generator().manual_seed(3)
    tangents = [torch.randn(theta.shape, generator=gen, dtype=theta.dtype) for _ in range(2 + len(flat_state))]
    cot_theta = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    cot_state = {n: torch.randn(theta.shape, generator=gen, dtype=theta.dtype) for n in flat_state}

    def f(th, gr, *st):
        out_theta, out_state = model.update(th, dict(zip(flat_state, st)), gr, hyper)
        return (out_theta, *(out_state[n] for n in flat_state))

    _, jv = torch.func.jvp(f, (theta, grad, *flat_state.values()), tuple(tangents))
    lhs = (cot_theta * jv[0]).sum() + sum((cot_state[n] * jv[1 + i]).sum() for i, n in enumerate(flat_state))
    a_theta, a_state, a_grad = model.vjp(theta, flat_state, grad, hyper, cot_theta, cot_state)
    rhs = (a_theta * tangents[0]).sum() + (a_grad * tangents[1]).sum()
    rhs = rhs + sum((a_state[n] * tangents[2 + i]).sum() for i, n in enumerate(flat_state))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


def test_plain_sgd_vjp_closed_form_matches_autograd():
    params = _params()
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.2}, {"params": params[1:], "lr": 0.05}])
    model = StepModel(optimizer, params)
    assert model.is_stateless_sgd
    hyper, _ = model.capture()
    theta = _flat([p.detach() for p in params], params)
    cot = torch.randn_like(theta)
    a_theta, _, a_grad = model.vjp(theta, {}, torch.randn_like(theta), hyper, cot, None)
    lr = torch.cat([torch.full((15,), 0.2), torch.full((7,), 0.05)]).double()
    torch.testing.assert_close(a_theta, cot)
    torch.testing.assert_close(a_grad, -lr * cot)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_plain_sgd_rebuild_is_torch_optim_sgd_bit_for_bit(weight_decay):
    """The steps between checkpoints are rebuilt with SGD's own operations (``add(d, alpha=-lr)``):
    float32 parameters of odd sizes come out exactly as torch.optim.SGD leaves them, into the
    pooled ``out`` buffer as without one; the scale factors of the in-place transpose match."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=g).requires_grad_(True) for shape in [(33, 17), (17,), (10, 33), (10,)]]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    optimizer = torch.optim.SGD(params, lr=0.05, weight_decay=weight_decay)
    model = StepModel(optimizer, params)
    hyper, _ = model.capture()
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.cat([x.reshape(-1) for x in grads])
    for p, x in zip(params, grads):
        p.grad = x.clone()
    optimizer.step()
    stepped = torch.cat([p.detach().reshape(-1) for p in params])
    out = torch.empty_like(theta)
    rebuilt, _ = model.update(theta, {}, grad, hyper, out=out)
    assert rebuilt.data_ptr() == out.data_ptr() and torch.equal(rebuilt, stepped)
    assert torch.equal(model.update(theta, {}, grad, hyper)[0], stepped)
    keep, scale = model.adjoint_scales(hyper, torch.float32, theta.device)
    assert (keep, scale) == pytest.approx((1 - 0.05 * weight_decay, -0.05))
    cot = torch.randn(theta.shape, generator=g)
    a_theta, _, a_grad = model.vjp(theta, {}, grad, hyper, cot, None)  # the general closed form agrees
    torch.testing.assert_close(a_theta, keep * cot)
    torch.testing.assert_close(a_grad, scale * cot)


@pytest.mark.parametrize("kind", [torch.optim.LBFGS, torch.optim.Adamax, torch.optim.ASGD])
def test_unmodelled_optimizers_are_refused(kind):
    params = _params()
    with pytest.raises(UnsupportedOptimizer, match="does not model optimizer .*supported: torch.optim.SGD"):
        StepModel(kind(params), params)
