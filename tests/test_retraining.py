"""The retraining ground truth against independent references: a real ``Trainer.fit`` run and
a plain Python SGD loop with autograd on a module copy (no vmap, no functional calls)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch
from torch import Tensor, nn

from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.evaluation import (
    SGDStep,
    StepRecorder,
    leave_one_out,
    optimizer_lrs,
    pearson,
    retrain,
    sgd_param_groups,
    spearman,
    target_loss,
)
from lightning_influence.models import Classifier

Batch = tuple[Tensor, Tensor, Tensor]


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    x, y = load_digits_tensors(torch.float64)
    return x[:320], y[:320]


def fixed_batches(x: Tensor, y: Tensor, size: int = 16) -> list[Batch]:
    return [(x[i : i + size], y[i : i + size], torch.arange(i, i + size)) for i in range(0, len(x), size)]


def initial_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def reference_sgd(
    module: nn.Module,
    initial: dict[str, Tensor],
    steps: Sequence[SGDStep],
    groups: Sequence[Sequence[str]],
    removed: Collection[int] = (),
) -> dict[str, Tensor]:
    """Plain loop on a module copy: slice the removed samples out of each batch, mean loss,
    ``loss.backward()``, ``p -= lr * p.grad``; an empty batch is skipped."""
    model = copy.deepcopy(module)
    model.load_state_dict(initial, strict=False)
    params = dict(model.named_parameters())
    removed_t = torch.tensor(sorted(removed), dtype=torch.long)
    for step in steps:
        x, y, idx = step.batch
        keep = ~torch.isin(idx, removed_t)
        if not bool(keep.any()):
            continue
        model.zero_grad(set_to_none=True)
        model.per_sample_loss((x[keep], y[keep], idx[keep])).mean().backward()
        with torch.no_grad():
            for lr, names in zip(step.lrs, groups, strict=True):
                for n in names:
                    params[n] -= lr * params[n].grad
    return {n: p.detach().clone() for n, p in params.items()}


def reference_target(module: nn.Module, params: dict[str, Tensor], target: Sequence[Batch]) -> float:
    model = copy.deepcopy(module).eval()
    model.load_state_dict(params, strict=False)
    x = torch.cat([b[0] for b in target])
    y = torch.cat([b[1] for b in target])
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y, reduction="mean"))


def schedule(x: Tensor, y: Tensor, n_steps: int = 14, pool: int = 48, size: int = 10, seed: int = 1) -> list[SGDStep]:
    """Random batches drawn from a small pool (samples recur across steps) and two per-step
    varying learning rates (group 0: hidden layer, group 1: output layer)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for t in range(n_steps):
        idx = torch.randperm(pool, generator=g)[:size]
        lrs = (0.3 * (1.0 + 0.5 * math.sin(t)), 0.05 + 0.02 * t)
        steps.append(SGDStep(batch=(x[idx], y[idx], idx), lrs=lrs))
    return steps


@pytest.fixture()
def small_mlp() -> tuple[Classifier, list[list[str]]]:
    torch.manual_seed(3)
    module = Classifier(hidden=(8,)).double()
    return module, [["net.0.weight", "net.0.bias"], ["net.2.weight", "net.2.bias"]]


def assert_params_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-10) -> None:
    for n, a in actual.items():
        torch.testing.assert_close(a, expected[n], atol=atol, rtol=0.0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("hidden", [(16,), ()], ids=["mlp", "logreg"])
def test_no_removal_reproduces_lightning_fit(digits: tuple[Tensor, Tensor], hidden: tuple[int, ...]) -> None:
    x, y = digits
    batches = fixed_batches(x, y)
    torch.manual_seed(0)
    module = Classifier(hidden=hidden).double()
    initial = initial_of(module)
    recorder = StepRecorder()
    trainer = L.Trainer(
        max_epochs=2,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[recorder],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=FixedBatches(batches))
    assert len(recorder.steps) == 2 * len(batches) == trainer.global_step
    final = initial_of(module)
    groups = sgd_param_groups(module, trainer.optimizers[0])
    assert sorted(n for g in groups for n in g) == sorted(final)

    # runs 0 and 2 remove nothing; run 1 removes a sample, so the vmapped runs really differ
    out = retrain(module, initial, recorder.steps, groups, [(), (5,), ()])
    assert all(t.shape == (3, *final[n].shape) for n, t in out.items())
    for run in (0, 2):
        assert_params_close({n: t[run] for n, t in out.items()}, final)
    assert max(float((out[n][1] - final[n]).abs().max()) for n in final) > 1e-6
    for n, p in module.named_parameters():  # the module itself is untouched
        assert torch.equal(p.detach(), final[n])


def test_removal_matches_plain_sgd_loop(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, groups = small_mlp
    x, y = digits
    steps = schedule(x, y)
    initial = initial_of(module)
    removals: list[tuple[int, ...]] = [(0,), (7,), (), (13, 21), (40,)]
    # chunk_size 2: three chunks, the last one of a single run
    out = retrain(module, initial, steps, groups, removals, chunk_size=2)
    for k, removed in enumerate(removals):
        expected = reference_sgd(module, initial, steps, groups, removed)
        assert_params_close({n: t[k] for n, t in out.items()}, expected)


def test_emptied_batch_does_not_move_parameters(
    digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]
) -> None:
    module, groups = small_mlp
    x, y = digits
    initial = initial_of(module)
    only_z = SGDStep(batch=(x[[30]], y[[30]], torch.tensor([30])), lrs=(0.5, 0.5))
    pair = SGDStep(batch=(x[[31, 32]], y[[31, 32]], torch.tensor([31, 32])), lrs=(0.5, 0.5))

    alone = retrain(module, initial, [only_z], groups, [(30,), ()])
    for n in alone:
        assert torch.equal(alone[n][0], initial[n])  # the emptied step is an exact no-op
        assert not torch.equal(alone[n][1], initial[n])  # while the full step moves

    steps = schedule(x, y, n_steps=6)
    with_empty = [steps[0], only_z, steps[1], pair, *steps[2:]]
    out = retrain(module, initial, with_empty, groups, [(30, 31, 32)])
    with pytest.warns(UserWarning, match="occur in no batch"):  # 31 and 32 were only in the emptied pair
        skipped = retrain(module, initial, [steps[0], steps[1], *steps[2:]], groups, [(30, 31, 32)])
    for n in out:
        assert torch.isfinite(out[n]).all()
        torch.testing.assert_close(out[n], skipped[n], atol=1e-12, rtol=0.0)
    assert_params_close({n: t[0] for n, t in out.items()}, reference_sgd(module, initial, with_empty, groups, (30, 31, 32)))


def test_leave_one_out_is_target_change_of_plain_retraining(
    digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]
) -> None:
    module, groups = small_mlp
    x, y = digits
    steps = schedule(x, y, n_steps=10)
    initial = initial_of(module)
    target = [(x[200:207], y[200:207], torch.arange(200, 207)), (x[250:263], y[250:263], torch.arange(250, 263))]
    ids = [2, 9, 17, 33]
    scores = leave_one_out(module, initial, steps, groups, ids, iter(target), chunk_size=3)
    assert scores.dtype == torch.float64 and scores.shape == (len(ids),)

    base = reference_target(module, reference_sgd(module, initial, steps, groups), target)
    expected = [reference_target(module, reference_sgd(module, initial, steps, groups, (z,)), target) - base for z in ids]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0.0)
    assert float(scores.abs().min()) > 1e-8  # every one of these samples was trained on

    # a sample that never occurs changes nothing, and the caller is told
    with pytest.warns(UserWarning, match="occur in no batch"):
        unseen = leave_one_out(module, initial, steps, groups, torch.tensor([319]), target)
    assert float(unseen.abs().max()) < 1e-14


def test_target_loss_stacked_and_single(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, _ = small_mlp
    x, y = digits
    target = [(x[:5], y[:5], torch.arange(5)), (x[5:16], y[5:16], torch.arange(5, 16))]
    params = initial_of(module)
    stacked = {n: torch.stack([p, p + 0.01, p - 0.02]) for n, p in params.items()}
    values = target_loss(module, stacked, target, chunk_size=2)
    assert values.dtype == torch.float64 and values.shape == (3,)
    for k in range(3):
        single = {n: t[k] for n, t in stacked.items()}
        assert target_loss(module, single, target).shape == ()
        assert float(target_loss(module, single, target)) == pytest.approx(reference_target(module, single, target), abs=1e-13)
        assert float(values[k]) == pytest.approx(reference_target(module, single, target), abs=1e-13)


def test_retrain_rejects_what_it_cannot_reproduce(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, groups = small_mlp
    x, y = digits
    steps = schedule(x, y, n_steps=2)
    initial = initial_of(module)
    with pytest.raises(ValueError, match="2 learning rates for 1 parameter groups"):
        retrain(module, initial, steps, [groups[0] + groups[1]], [()])
    with pytest.raises(ValueError, match="not a parameter"):
        retrain(module, initial, steps, [["net.9.weight"], groups[1]], [()])
    with pytest.raises(ValueError, match="more than one parameter group"):
        retrain(module, initial, steps, [groups[0], groups[0]], [()])

    dropout = Classifier(hidden=(8,)).double()
    dropout.net.insert(1, nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        retrain(dropout, initial_of(dropout), steps, [["net.0.weight", "net.0.bias"], ["net.3.weight", "net.3.bias"]], [()])

    with pytest.raises(ValueError, match="momentum"):
        sgd_param_groups(module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="plain torch.optim.SGD"):
        sgd_param_groups(module, torch.optim.Adam(module.parameters()))
    opt = torch.optim.SGD([{"params": module.net[0].parameters(), "lr": 0.2}, {"params": module.net[2].parameters()}], lr=0.1)
    assert sgd_param_groups(module, opt) == groups
    assert optimizer_lrs(opt) == (0.2, 0.1)


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_metrics_match_scipy(ties: bool) -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=60)
    scores = 0.6 * truth + rng.normal(size=60)
    if ties:
        truth, scores = np.round(truth, 1), np.round(scores)
    assert spearman(torch.from_numpy(scores), torch.from_numpy(truth)) == pytest.approx(
        scipy.stats.spearmanr(scores, truth).statistic, abs=1e-6
    )
    assert pearson(scores.tolist(), truth.tolist()) == pytest.approx(scipy.stats.pearsonr(scores, truth).statistic, abs=1e-12)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("scores", "truth", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([1.0, 2.0], [2.0, 1.0], "at least 3"),
        ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "non-finite"),
        ([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0], "non-finite"),
        ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], "constant"),
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], "1-D"),
    ],
)
@pytest.mark.parametrize("metric", [spearman, pearson])
def test_metrics_reject_bad_input(metric: Any, scores: Any, truth: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metric(scores, truth)
