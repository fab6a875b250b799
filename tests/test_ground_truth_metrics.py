"""Subset retraining, the linear datamodeling score and the detection metrics against
independent references (leave-one-out retraining, scikit-learn's ROC-AUC, hand counts)."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import digits_problem, quiet_trainer
from lightning_influence.evaluation import (
    StepRecorder,
    detection_auroc,
    fraction_found,
    leave_one_out,
    linear_datamodeling_score,
    random_removals,
    spearman,
    subset_retraining,
)
from lightning_influence.models import Classifier


@pytest.fixture(scope="module")
def recorded():  # type: ignore[no-untyped-def]
    problem = digits_problem(n=128, batch_size=16, epochs=2)
    torch.manual_seed(0)
    model = Classifier(hidden=(), lr=0.2).double()
    recorder = StepRecorder()
    quiet_trainer(callbacks=[recorder]).fit(model, train_dataloaders=problem.train)
    return problem, model, recorder


def test_singleton_subsets_equal_leave_one_out(recorded) -> None:  # type: ignore[no-untyped-def]
    problem, model, rec = recorded
    ids = [3, 17, 40, 99]
    loo = leave_one_out(model, rec.initial_params, rec.steps, rec.optimizer, ids, problem.val)
    subsets = subset_retraining(model, rec.initial_params, rec.steps, rec.optimizer, [(i,) for i in ids], problem.val)
    torch.testing.assert_close(subsets.changes, loo, rtol=0, atol=1e-14)


def test_lds_of_the_realised_effects_is_one_and_of_noise_is_small(recorded) -> None:  # type: ignore[no-untyped-def]
    problem, model, rec = recorded
    removals = random_removals(range(problem.n), count=24, keep_fraction=0.5, seed=3)
    assert all(len(r) == 64 for r in removals) and len(set(removals)) == 24
    retrained = subset_retraining(model, rec.initial_params, rec.steps, rec.optimizer, removals, problem.val)
    ids = torch.arange(problem.n)
    # Scores that are exactly additive in the realised changes: least squares on the subsets.
    design = torch.zeros(len(removals), problem.n, dtype=torch.float64)
    for m, r in enumerate(removals):
        design[m, list(r)] = 1.0
    fitted = torch.linalg.lstsq(design, retrained.changes.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    torch.testing.assert_close(retrained.predicted(ids, fitted), retrained.changes, rtol=0, atol=1e-10)
    assert linear_datamodeling_score(retrained, ids, fitted) == pytest.approx(1.0)
    noise = torch.randn(problem.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(linear_datamodeling_score(retrained, ids, noise)) < 0.6
    with pytest.raises(KeyError, match="without a score"):
        retrained.predicted(ids[:10], noise[:10])


def test_random_removals_validate() -> None:
    with pytest.raises(ValueError, match="keep_fraction"):
        random_removals(range(10), 5, keep_fraction=1.0)
    with pytest.raises(ValueError, match="at least 3"):
        random_removals(range(10), 2)
    assert random_removals(range(10), 4, seed=1) == random_removals(range(10), 4, seed=1)


def test_detection_metrics_match_references() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=g, dtype=torch.float64)
    flipped = torch.rand(200, generator=g) < 0.1
    scores[flipped] -= 1.0  # flipped samples tend to be harmful (low scores)
    assert detection_auroc(scores, flipped) == pytest.approx(roc_auc_score(flipped.numpy(), -scores.numpy()))
    order = torch.argsort(scores)
    assert fraction_found(scores, flipped, 0.1) == int(flipped[order[:20]].sum()) / int(flipped.sum())
    assert fraction_found(-torch.arange(10.0), torch.arange(10) < 3, 0.3) == 0.0
    assert fraction_found(torch.arange(10.0), torch.arange(10) < 3, 0.3) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        detection_auroc(scores, torch.ones(200, dtype=torch.bool))
    with pytest.raises(ValueError, match="same length"):
        fraction_found(scores, flipped[:10], 0.1)


@pytest.mark.parametrize("n, tied", [(50, 0), (50, 30), (100_000, 50_000), (100_000, 99_000)])
def test_rank_metrics_match_scipy_and_sklearn_with_ties_at_any_length(n: int, tied: int) -> None:
    """Average ranks in float64: exact with large tie groups (a rank sum beyond 2**31 once broke a
    Spearman over 100k scores with half of them tied: -0.63 against scipy's 0.89)."""
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(n + tied)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    x[torch.argsort(x)[n - tied:]] = 3.0  # the top `tied` scores equal
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    flags = y > y.median()
    assert detection_auroc(x, flags) == pytest.approx(roc_auc_score(flags.numpy(), -x.numpy()), abs=1e-12)
