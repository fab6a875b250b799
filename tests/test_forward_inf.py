"""Forward-INF: first-order calibration against brute-force gradient dot products, the user's
module left untouched, query columns, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import digits_problem
from lightning_influence.data import FixedBatches
from lightning_influence.estimators.base import Target, build
from lightning_influence.estimators.forward_inf import ForwardInf
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.models import Classifier

import lightning as L
import torch.nn.functional as F


def _flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _brute_force(model, train_batches, target_batches):
    """Per-sample training gradients (one autograd call per sample, by id order) and the
    target gradients: the mean loss over all target samples, and each target sample's."""
    rows: dict[int, torch.Tensor] = {}
    for x, y, ids in train_batches:
        for i in range(len(ids)):
            rows.setdefault(int(ids[i]), _flat_grad(model, F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])))
    train = torch.stack([rows[k] for k in sorted(rows)])
    xs = torch.cat([b[0] for b in target_batches])
    ys = torch.cat([b[1] for b in target_batches])
    mean = _flat_grad(model, F.cross_entropy(model(xs), ys))
    each = torch.stack([_flat_grad(model, F.cross_entropy(model(xs[j : j + 1]), ys[j : j + 1])) for j in range(len(ys))], dim=1)
    return train, mean, each


@pytest.fixture(scope="module")
def problem():
    p = digits_problem(n=64, batch_size=32, epochs=1, val_size=100)
    torch.manual_seed(0)
    model = Classifier(hidden=(8,)).double()
    query = FixedBatches([(p.val.batches[0][0][:3], p.val.batches[0][1][:3], torch.arange(3))])
    train, mean, each = _brute_force(model, p.train.batches, query.batches)
    return p, model, query, train, mean, each


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("direction", ["descent", "ascent"])
def test_one_small_sgd_step_is_the_gradient_dot_product_to_first_order(problem, direction):
    p, model, query, train, mean, each = problem
    n = p.n
    group_ref = train @ mean / n
    query_ref = train @ each / n
    errors = []
    for lr in (4e-2, 1e-2):
        est = ForwardInf(direction=direction, lr=lr, progress=False)
        group = est.scores(model, p.train, Target("val", query))
        per_query = est.scores(model, p.train, Target("query", query))
        assert group.values.shape == (n,) and per_query.values.shape == (n, 3)
        errors.append((_relative_error(group.values, group_ref), _relative_error(per_query.values, query_ref)))
    (g_big, q_big), (g_small, q_small) = errors
    assert g_small < 0.02 and q_small < 0.02
    # The error is first order in lr: 4x smaller step, ~4x smaller error.
    assert 3.0 < g_big / g_small < 5.0
    assert 3.0 < q_big / q_small < 5.0


def test_steps_and_learning_rate_sum_calibrate_units(problem):
    p, model, query, train, mean, _ = problem
    ref = train @ mean / p.n
    k_steps = ForwardInf(lr=2.5e-3, steps=4, progress=False).scores(model, p.train, Target("val", query))
    assert _relative_error(k_steps.values, ref) < 0.02  # k steps of lr/k ~ one step of lr
    scaled = ForwardInf(lr=2.5e-3, learning_rate_sum=7.0, progress=False).scores(model, p.train, Target("val", query))
    plain = ForwardInf(lr=2.5e-3, progress=False).scores(model, p.train, Target("val", query))
    torch.testing.assert_close(scaled.values, 7.0 * plain.values)
    assert "target-loss change when the sample is removed" in scaled.metadata["units"]
    magnitude = ForwardInf(lr=2.5e-3, signed=False, progress=False).scores(model, p.train, Target("val", query))
    torch.testing.assert_close(magnitude.values, plain.values.abs())
    assert "either sign" in magnitude.metadata["higher_means"]


def test_query_columns_train_target_and_repeated_ids(problem):
    p, model, _, train, _, _ = problem
    est = build("forward_inf", lr=1e-3, progress=False)
    scores = est.scores(model, p.train, Target("query", p.val, sample_count=4))
    assert scores.values.shape == (p.n, 4) and scores.metadata["columns"] == "each"
    group = ForwardInf(lr=1e-3, columns="group", progress=False).scores(model, p.train, Target("query", p.val, sample_count=4))
    assert group.values.shape == (p.n,) and group.metadata["column_positions"] is None
    positions = scores.metadata["column_positions"]  # the query loader positions of the 4 columns' samples
    assert len(positions) == 4 and positions == sorted(set(positions)) and max(positions) < sum(len(b[0]) for b in p.val)
    # The train target is the mean training loss; a loader that repeats every sample (2 epochs)
    # scores each sample once, with the same values.
    twice = FixedBatches(p.train.batches * 2)
    once = ForwardInf(lr=1e-3, progress=False).scores(model, p.train, "train")
    again = ForwardInf(lr=1e-3, progress=False).scores(model, twice, "train")
    torch.testing.assert_close(once.values, again.values)
    ref = train @ train.mean(dim=0) / p.n
    assert _relative_error(once.values, ref) < 0.02


class _NormNet(InfluenceMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 10))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("options", [dict(), dict(train_mode=True, optimizer="adam", steps=3), dict(optimizer=torch.optim.RMSprop, direction="ascent")])
def test_module_parameters_buffers_and_flags_untouched(options):
    p = digits_problem(n=64, batch_size=32, epochs=1, val_size=100)
    torch.manual_seed(0)
    model = _NormNet().double()
    with torch.no_grad():  # non-trivial running statistics
        model.net[1].running_mean.uniform_(-0.1, 0.1)
    model.train()
    model.net[2].eval()  # a submodule with its own flag
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    est = ForwardInf(lr=1e-2, progress=False, **options)
    torch.manual_seed(1)  # dropout draws when the fit runs in training mode
    first = est.scores(model, p.train, Target("val", p.val))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert [m.training for m in model.modules()] == flags
    # Nothing carried over between calls: a second call gives the same scores.
    torch.manual_seed(1)
    torch.testing.assert_close(est.scores(model, p.train, Target("val", p.val)).values, first.values, rtol=0, atol=0)
    assert first.metadata["train_mode"] == bool(options.get("train_mode", False))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(direction="sideways"), "direction"),
        (dict(steps=0), "steps"),
        (dict(steps=1.5), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(optimizer="lbfgs-ish"), "optimizer"),
        (dict(optimizer_options={"momentum_typo": 0.9}), "options"),
        (dict(columns="all"), "columns"),
        (dict(learning_rate_sum=0.0), "learning_rate_sum"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ForwardInf(**options)


def test_missing_target_loader_is_refused(problem):
    p, model, *_ = problem
    with pytest.raises(ValueError, match="loader"):
        ForwardInf(progress=False).scores(model, p.train, "val")


def test_a_target_subset_is_recorded_in_the_metadata():
    p = digits_problem(n=64, batch_size=32, epochs=1, val_size=100)
    torch.manual_seed(0)
    model = Classifier(64, 10, hidden=()).double()
    whole = ForwardInf(lr=1e-3, progress=False).scores(model, p.train, Target("val", p.val))
    subset = ForwardInf(lr=1e-3, progress=False).scores(model, p.train, Target("val", p.val, sample_count=3, seed=5))
    assert (whole.metadata["target_samples"], whole.metadata["target_seed"]) == (None, None)
    assert (subset.metadata["target_samples"], subset.metadata["target_seed"]) == (3, 5)
