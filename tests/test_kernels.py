"""Math kernels against independent references: per-sample autograd gradients and exact Hessians."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from lightning_influence.batches import batch_chunks
from lightning_influence.kernels import (
    ParameterSpace,
    all_finite,
    batch_gradient,
    difference_derivatives,
    directional_derivatives,
    finite_difference_step,
    evaluation_mode,
    has_mode_dependent_layers,
    hessian_vector_product,
    kinked_operations,
    losses_and_gradient,
    per_sample_gradients,
    per_sample_loss_function,
)
from lightning_influence.models import Classifier


def _setup(hidden=(16, 8), activation="tanh", b=12, seed=0):
    torch.manual_seed(seed)
    module = Classifier(in_features=6, num_classes=4, hidden=hidden, activation=activation).double()
    batch = (torch.randn(b, 6, dtype=torch.float64), torch.randint(0, 4, (b,)), torch.arange(b))
    space = ParameterSpace.from_parameters(list(module.named_parameters()))
    return module, batch, space


def _per_sample_gradients(module, batch, space):
    rows = []
    for i in range(batch[0].shape[0]):
        module.zero_grad()
        module.per_sample_loss((batch[0][i : i + 1], batch[1][i : i + 1])).sum().backward()
        rows.append(space.flatten([p.grad for p in module.parameters()]))
    return torch.stack(rows)


class _NoForwardMode(torch.autograd.Function):
    """``tanh`` with a backward but no ``jvp``: an operation forward-mode AD cannot go through."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _WithoutForwardMode(Classifier):
    def __init__(self, operation: str) -> None:
        super().__init__(in_features=6, num_classes=4, hidden=(8,))
        self.operation = operation
        self.bag = nn.EmbeddingBag(10, 6, mode="mean", padding_idx=0)

    def forward(self, x):
        if self.operation == "embedding-bag":  # the first three features as token ids, 0 for padding
            x = x + self.bag((x[:, :3].abs() * 3).long().clamp(max=9))
        hidden = _NoForwardMode.apply(self.net[0](x)) if self.operation == "custom" else self.net[1](self.net[0](x))
        return self.net[2](hidden)


@pytest.mark.parametrize("operation", ["embedding-bag", "custom"])
def test_directional_derivatives_without_a_forward_mode_formula_come_from_reverse_mode(monkeypatch, operation):
    """An operation without a forward-mode formula (``nn.EmbeddingBag``, a custom ``autograd.Function``
    without ``jvp``, as inductor's graphs are): the derivatives come from reverse mode, equal to
    brute-force per-sample gradients dotted with the tangent, with one warning per operation."""
    from lightning_influence import kernels

    monkeypatch.setattr(kernels, "_REVERSE_MODE_WARNED", set())
    torch.manual_seed(0)
    module = _WithoutForwardMode(operation).double()
    batch = (torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 4, (12,)), torch.arange(12))
    space = ParameterSpace.from_parameters(list(module.named_parameters()))
    tangent = torch.randn(space.size, dtype=torch.float64)
    for attempt in range(2):
        with pytest.warns(RuntimeWarning, match="computed in reverse mode") if attempt == 0 else contextlib.nullcontext():
            losses, derivs = directional_derivatives(per_sample_loss_function(module), dict(module.named_parameters()), batch, space.unflatten(tangent))
        torch.testing.assert_close(derivs, _per_sample_gradients(module, batch, space) @ tangent, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(losses, module.per_sample_loss(batch).detach())
    monkeypatch.setattr(kernels, "REVERSE_MODE_BYTES", 1)  # one output per batched backward pass
    _, derivs = directional_derivatives(per_sample_loss_function(module), dict(module.named_parameters()), batch, space.unflatten(tangent))
    torch.testing.assert_close(derivs, _per_sample_gradients(module, batch, space) @ tangent, rtol=1e-10, atol=1e-12)


def _exact_hessian(module, batch, space):
    loss_fn = per_sample_loss_function(module)
    theta = space.flatten(dict(module.named_parameters()))
    return torch.autograd.functional.hessian(lambda t: loss_fn(space.unflatten(t), batch).mean(), theta)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_directional_derivatives_equal_per_sample_gradients_dot_tangent(activation):
    module, batch, space = _setup(activation=activation)
    tangent = torch.randn(space.size, dtype=torch.float64)
    losses, derivs = directional_derivatives(
        per_sample_loss_function(module), dict(module.named_parameters()), batch, space.unflatten(tangent)
    )
    expected = _per_sample_gradients(module, batch, space) @ tangent
    torch.testing.assert_close(derivs, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, module.per_sample_loss(batch).detach())


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 3e-3)])
def test_difference_derivatives_equal_per_sample_gradients_dot_tangent(dtype, rtol):
    module, batch, space = _setup()
    expected_module = module
    module = Classifier(in_features=6, num_classes=4, hidden=(16, 8)).to(dtype)
    module.load_state_dict(expected_module.state_dict())
    batch = (batch[0].to(dtype), batch[1], batch[2])
    space = ParameterSpace.from_parameters(list(module.named_parameters()))
    loss_fn = per_sample_loss_function(module)
    theta = space.flatten(dict(module.named_parameters()))
    tangent = torch.randn(space.size, dtype=dtype, generator=torch.Generator().manual_seed(3))
    eps = finite_difference_step(theta, tangent, "central")
    got = difference_derivatives(loss_fn, space, theta, batch, tangent, eps)
    expected = _per_sample_gradients(expected_module, (batch[0].double(), batch[1], batch[2]), ParameterSpace.from_parameters(
        list(expected_module.named_parameters()))) @ tangent.double()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))
    # Losses already evaluated at the two points (e.g. by a Hessian product's gradient passes) are used as given.
    plus, grad_plus = losses_and_gradient(loss_fn, space, theta + eps * tangent, batch)
    torch.testing.assert_close(grad_plus, batch_gradient(loss_fn, space, theta + eps * tangent, batch))
    reused = difference_derivatives(loss_fn, space, theta, batch, tangent, eps, plus=plus)
    torch.testing.assert_close(reused, got, rtol=1e-12, atol=0.0)
    shifted = difference_derivatives(loss_fn, space, theta, batch, tangent, eps, plus=plus + 1.0)
    torch.testing.assert_close(shifted - got, torch.full_like(got, 0.5 / eps), rtol=1e-6, atol=0.0)


def test_chunked_passes_equal_whole_batch_passes():
    module, batch, space = _setup(b=13)
    loss_fn = per_sample_loss_function(module)
    theta = space.flatten(dict(module.named_parameters()))
    tangent = torch.randn(space.size, dtype=torch.float64)
    chunks = batch_chunks(batch, 5)
    assert [n for _, n in chunks] == [5, 5, 3]
    torch.testing.assert_close(torch.cat([c[2] for c, _ in chunks]), batch[2])
    assert batch_chunks(batch, None)[0][0] is batch and batch_chunks(batch, 13)[0][0] is batch
    as_dict = {"x": batch[0], "y": batch[1], "tag": "shared", "scalar": torch.tensor(2.0)}
    first = batch_chunks(as_dict, 4)[0][0]
    assert first["x"].shape[0] == 4 and first["tag"] == "shared" and first["scalar"].dim() == 0
    params, direction = dict(module.named_parameters()), space.unflatten(tangent)
    whole = directional_derivatives(loss_fn, params, batch, direction)
    chunked = directional_derivatives(loss_fn, params, batch, direction, chunk_size=5)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    losses, grad = losses_and_gradient(loss_fn, space, theta, batch)
    losses_c, grad_c = losses_and_gradient(loss_fn, space, theta, batch, chunk_size=5)
    torch.testing.assert_close(losses_c, losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_c, grad, rtol=1e-12, atol=1e-14)
    for chunk_size in (None, 5):  # per-parameter pieces: the flat gradient, unflattened
        _, pieces = losses_and_gradient(loss_fn, space, theta, batch, chunk_size, flat=False)
        assert [tuple(p.shape) for p in pieces] == [tuple(s) for s in space.shapes]
        torch.testing.assert_close(space.flatten(pieces), grad, rtol=1e-12, atol=1e-14)
    eps = finite_difference_step(theta, tangent, "central")
    torch.testing.assert_close(
        difference_derivatives(loss_fn, space, theta, batch, tangent, eps, chunk_size=5),
        difference_derivatives(loss_fn, space, theta, batch, tangent, eps),
        rtol=1e-9, atol=1e-12,
    )
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        batch_chunks(batch, 0)


def test_hessian_product_added_in_place_equals_the_returned_product():
    module, batch, space = _setup()
    loss_fn = per_sample_loss_function(module)
    theta = space.flatten(dict(module.named_parameters()))
    v = torch.randn(space.size, dtype=torch.float64)
    grad = lambda th: batch_gradient(loss_fn, space, th, batch)  # noqa: E731
    for scheme in ("forward", "central"):
        start = torch.randn(space.size, dtype=torch.float64)
        into = start.clone()
        out = hessian_vector_product(grad, theta, v, scheme=scheme, add_to=into)
        assert out is into
        product = hessian_vector_product(grad, theta, v, scheme=scheme)
        torch.testing.assert_close(into - start, product, rtol=1e-10, atol=1e-12)
        # The gradient as per-parameter pieces, a base gradient, a scale and a negative step: the same product.
        pieces = lambda th: losses_and_gradient(loss_fn, space, th, batch, flat=False)[1]  # noqa: E731
        eps = -finite_difference_step(theta, v, scheme)
        base = grad(theta) if scheme == "forward" else None
        into = start.clone()
        hessian_vector_product(pieces, theta, v, scheme=scheme, base_gradient=base, eps=eps, add_to=into, alpha=-0.5)
        torch.testing.assert_close(into - start, -0.5 * product, rtol=1e-5 if scheme == "forward" else 1e-8, atol=1e-10)
        torch.testing.assert_close(hessian_vector_product(pieces, theta, v, scheme=scheme, eps=eps), product, rtol=1e-5, atol=1e-10)
        column = torch.zeros(space.size, 2, dtype=torch.float64)[:, 1]  # a strided column of a score matrix
        hessian_vector_product(pieces, theta, v, scheme=scheme, add_to=column)
        torch.testing.assert_close(column, product, rtol=1e-10, atol=1e-12)


def test_batch_gradient_matches_autograd():
    module, batch, space = _setup()
    theta = space.flatten(dict(module.named_parameters()))
    got = batch_gradient(per_sample_loss_function(module), space, theta, batch)
    expected = _per_sample_gradients(module, batch, space).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheme,rtol", [("forward", 1e-5), ("central", 1e-7)])
def test_finite_difference_hessian_products_match_exact_hessian(scheme, rtol):
    module, batch, space = _setup()
    loss_fn = per_sample_loss_function(module)
    theta = space.flatten(dict(module.named_parameters()))
    H = _exact_hessian(module, batch, space)
    for seed in range(3):
        v = torch.randn(space.size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        got = hessian_vector_product(lambda th: batch_gradient(loss_fn, space, th, batch), theta, v, scheme=scheme)
        expected = H @ v
        assert (got - expected).norm() / expected.norm() < rtol


def test_forward_difference_reuses_the_given_base_gradient():
    module, batch, space = _setup()
    loss_fn = per_sample_loss_function(module)
    theta = space.flatten(dict(module.named_parameters()))
    v = torch.randn(space.size, dtype=torch.float64)
    base = batch_gradient(loss_fn, space, theta, batch)
    with_base = hessian_vector_product(lambda th: batch_gradient(loss_fn, space, th, batch), theta, v, scheme="forward", base_gradient=base)
    without = hessian_vector_product(lambda th: batch_gradient(loss_fn, space, th, batch), theta, v, scheme="forward")
    torch.testing.assert_close(with_base, without, rtol=0, atol=0)
    # A wrong base point shows up in the product: the base really is used.
    wrong = hessian_vector_product(lambda th: batch_gradient(loss_fn, space, th, batch), theta, v, scheme="forward", base_gradient=base * 1.001)
    assert not torch.allclose(wrong, with_base)


def test_float32_products_are_accurate_enough():
    module, batch, space = _setup()
    H = _exact_hessian(module, batch, space)
    module32 = module.float()
    space32 = ParameterSpace.from_parameters(list(module32.named_parameters()))
    batch32 = (batch[0].float(), batch[1], batch[2])
    theta = space32.flatten(dict(module32.named_parameters()))
    v = torch.randn(space.size, dtype=torch.float64)
    got = hessian_vector_product(lambda th: batch_gradient(per_sample_loss_function(module32), space32, th, batch32), theta, v, scheme="central")
    assert (got - H @ v).norm() / (H @ v).norm() < 2e-3


def test_parameter_space_round_trip_and_expand():
    module, _, space = _setup()
    params = dict(module.named_parameters())
    flat = space.flatten(params)
    assert flat.shape == (sum(p.numel() for p in module.parameters()),)
    back = space.unflatten(flat)
    for n, p in params.items():
        assert torch.equal(back[n], p.detach())
    scales = torch.arange(len(space.names), dtype=torch.float64)
    expanded = space.expand(scales)
    assert torch.equal(expanded, torch.cat([torch.full((p.numel(),), float(i), dtype=torch.float64) for i, p in enumerate(params.values())]))
    with pytest.raises(ValueError, match="flat vector"):
        space.unflatten(flat[:-1])


def test_evaluation_mode_restores_each_submodule_flag():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    net.train()
    net[2].eval()  # a user may freeze one submodule on purpose
    with evaluation_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[1].training and not net[2].training
    assert has_mode_dependent_layers(net)
    assert not has_mode_dependent_layers(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))


def test_recorded_vectors_are_standalone_allocations():
    """Forward-mode AD allocates tangents of a view's whole base: pooled records must not be views."""
    from lightning_influence.trajectory import Trajectory

    traj = Trajectory()
    params = [torch.randn(3, 4), torch.randn(5)]
    a = traj.flat_copy(params)
    assert a._base is None and torch.equal(a, torch.cat([p.reshape(-1) for p in params]))
    traj.release(a)
    b = traj.flat_copy([2 * p for p in params])
    assert b.data_ptr() == a.data_ptr()  # released memory is reused


def test_all_finite_over_one_or_several_tensors():
    big = torch.full((4,), 3e38, dtype=torch.float32)  # finite, but its sum overflows: the full check decides
    half = torch.full((8,), 6e4, dtype=torch.float16)
    assert all_finite(big) and all_finite([big, big, half]) and all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = torch.ones(5, dtype=torch.float64)
        broken[3] = bad
        assert not all_finite(broken)
        assert not all_finite([big, broken, half])
        assert not all_finite([torch.ones(3), broken.half()])


class _Functional(nn.Module):
    """Kinks written as function calls, where no layer type shows them."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = self.a(x.clamp(-1.0, 1.0))  # clamping the data is no kink in the parameters
        if self.kind == "relu":
            h = torch.nn.functional.relu(h)
        elif self.kind == "clamp":
            h = h.clamp(min=0.0)
        elif self.kind == "mask":
            h = h * (h > 0)
        elif self.kind == "maxpool":
            h = torch.nn.functional.max_pool1d(h.unsqueeze(1), 2).repeat(1, 1, 2).squeeze(1)
        elif self.kind == "normalize":  # its clamp_min(eps) of the norm never binds
            h = torch.nn.functional.normalize(torch.tanh(h), dim=-1)
        return self.b(h)


@pytest.mark.parametrize(
    "kind, loss, expected",
    [
        ("tanh", "ce", []),
        ("normalize", "ce", []),
        ("relu", "ce", ["relu"]),
        ("clamp", "ce", ["clamp"]),
        ("mask", "ce", ["gt"]),
        ("maxpool", "ce", ["max_pool2d_with_indices"]),
        ("tanh", "l1", ["abs"]),
        ("tanh", "mse", []),
        ("tanh", "huber", []),
        ("tanh", "hinge", ["multi_margin_loss"]),
    ],
)
def test_kinked_operations_are_found_however_they_are_written(kind, loss, expected):
    torch.manual_seed(0)
    module = _Functional(kind).double()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    losses = {
        "ce": lambda out: torch.nn.functional.cross_entropy(out, y, reduction="none"),
        "l1": lambda out: torch.nn.functional.l1_loss(out[:, 0], y.double(), reduction="none"),
        "mse": lambda out: torch.nn.functional.mse_loss(out[:, 0], y.double(), reduction="none"),
        "huber": lambda out: torch.nn.functional.huber_loss(out[:, 0], y.double(), reduction="none"),
        "hinge": lambda out: torch.nn.functional.multi_margin_loss(out, y, reduction="none"),
    }

    def loss_fn(params, batch):  # type: ignore[no-untyped-def]
        return losses[loss](torch.func.functional_call(module, params, (batch,)))

    params = dict(module.named_parameters())
    assert kinked_operations(loss_fn, params, x) == expected
    # kinks before the attributed parameters are no kinks in them: a ReLU below a head-only subset
    if kind == "relu" and loss == "ce":
        head = {n: p for n, p in params.items() if n.startswith("b.")}
        assert kinked_operations(loss_fn, head, x) == []


@pytest.mark.parametrize(
    "layers, expected",
    [
        (lambda: [nn.ReLU()], ["relu"]),
        (lambda: [nn.LeakyReLU()], ["leaky_relu"]),
        (lambda: [nn.Hardswish()], ["hardswish"]),
        (lambda: [nn.ReLU6()], ["hardtanh"]),
        (lambda: [nn.SELU()], ["elu"]),
        (lambda: [nn.ELU()], []),  # alpha = 1: continuous slope
        (lambda: [nn.GELU()], []),
        (lambda: [nn.SiLU()], []),
    ],
)
def test_kinked_layers_are_found(layers, expected):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), *layers(), nn.Linear(8, 4)).double()
    x, y = torch.randn(12, 6, dtype=torch.float64) * 4, torch.randint(0, 4, (12,))

    def loss_fn(params, batch):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(torch.func.functional_call(module, params, (batch,)), y, reduction="none")

    assert kinked_operations(loss_fn, dict(module.named_parameters()), x) == expected


def test_a_transformer_layer_is_traced_through_its_unfused_path():
    # Without autograd, TransformerEncoderLayer takes a fused kernel that hides its ReLU; the trace
    # runs with gradients on, as the sweep's gradient passes do.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 8)

    def loss_fn(params, batch):  # type: ignore[no-untyped-def]
        return torch.func.functional_call(layer, params, (batch,)).square().mean(dim=(1, 2))

    with torch.no_grad():
        assert kinked_operations(loss_fn, dict(layer.named_parameters()), x) == ["relu"]


def test_forward_mode_goes_through_fused_transformer_kernels():
    """In eval mode without autograd TransformerEncoderLayer takes a fused kernel, and attention a
    fused one, neither with forward-mode formulas: the pass is retried on their plain operations."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    x = torch.randn(4, 5, 8, dtype=torch.float64)

    def loss_fn(params, batch):  # type: ignore[no-untyped-def]
        return torch.func.functional_call(layer, params, (batch,)).square().mean(dim=(1, 2))

    params = {n: p.detach() for n, p in layer.named_parameters()}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    losses, derivatives = directional_derivatives(loss_fn, params, x, tangent)
    expected = []
    for i in range(x.shape[0]):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves, x[i : i + 1]).sum(), list(leaves.values()))
        expected.append(sum((g * tangent[n]).sum() for g, n in zip(grads, leaves)))
    torch.testing.assert_close(derivatives, torch.stack(expected), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, loss_fn(params, x))


class _CountingLoss:
    """A per-sample loss function that counts its calls (one per vectorised chunk on the vmap path,
    one per sample on the fallback path)."""

    def __init__(self, module):
        self.fn, self.calls = per_sample_loss_function(module), 0

    def __call__(self, params, batch):
        self.calls += 1
        return self.fn(params, batch)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_per_sample_gradients_take_the_vectorised_path_for_x_label_id_batches_and_equal_an_autograd_loop(chunk_size):
    module, batch, space = _setup(b=12)
    theta = space.flatten(dict(module.named_parameters()))
    loss_fn = _CountingLoss(module)
    G = per_sample_gradients(loss_fn, space, theta, batch, chunk_size)
    torch.testing.assert_close(G, _per_sample_gradients(module, batch, space), rtol=1e-10, atol=1e-12)
    # one call per vectorised chunk, not one per sample (the labels are 0-d inside vmap: they are split too)
    assert loss_fn.calls == (1 if chunk_size is None else 3)


def test_per_sample_gradients_of_a_non_finite_sample_leave_the_other_rows_exact():
    module, batch, space = _setup(b=7)
    x = batch[0].clone()
    x[3, 0] = float("nan")
    x[5, 1] = float("inf")
    bad = (x, batch[1], batch[2])
    theta = space.flatten(dict(module.named_parameters()))
    G = per_sample_gradients(per_sample_loss_function(module), space, theta, bad)
    finite = torch.isfinite(G).all(1)
    assert finite.tolist() == [True, True, True, False, True, False, True]
    torch.testing.assert_close(G[finite], _per_sample_gradients(module, bad, space)[finite], rtol=1e-10, atol=1e-12)


class _ItemLoss(Classifier):
    """A loss with data-dependent control flow (``.item()``), which ``vmap`` cannot run."""

    def per_sample_loss(self, batch):
        losses = super().per_sample_loss(batch)
        return losses * 2 if batch[0].sum().item() > 1e9 else losses


def test_per_sample_gradients_fall_back_to_one_isolated_backward_pass_per_sample():
    torch.manual_seed(0)
    module = _ItemLoss(in_features=6, num_classes=4, hidden=(8,), activation="tanh").double()
    space = ParameterSpace.from_parameters(list(module.named_parameters()))
    x = torch.randn(6, 6, dtype=torch.float64)
    x[2, 0] = float("nan")
    batch = (x, torch.randint(0, 4, (6,)), torch.arange(6))
    theta = space.flatten(dict(module.named_parameters()))
    loss_fn = _CountingLoss(module)
    G = per_sample_gradients(loss_fn, space, theta, batch)
    assert loss_fn.calls >= 6  # the fallback: one pass per sample
    finite = torch.isfinite(G).all(1)
    assert finite.tolist() == [True, True, False, True, True, True]
    torch.testing.assert_close(G[finite], _per_sample_gradients(module, batch, space)[finite], rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_split_dict_batches_and_keep_shared_leaves_whole():
    module, (x, y, ids), space = _setup(b=5)
    theta = space.flatten(dict(module.named_parameters()))
    shared = torch.tensor(2.0, dtype=torch.float64)

    def loss_fn(params, batch):
        out = torch.func.functional_call(module, params, (batch["x"],))
        return torch.nn.functional.cross_entropy(out, batch["y"], reduction="none") * batch["w"]

    G = per_sample_gradients(loss_fn, space, theta, {"x": x, "y": y, "w": shared, "names": [f"s{i}" for i in range(5)]})
    torch.testing.assert_close(G, 2.0 * _per_sample_gradients(module, (x, y, ids), space), rtol=1e-10, atol=1e-12)
