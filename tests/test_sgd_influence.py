"""Trajectory SGD-influence: DiffIn with ``batch_removal="drop"`` (the sample's term dropped, the
batch's 1/b kept) against retraining with the same counterfactual."""

from __future__ import annotations

import pytest
import torch

from conftest import digits_problem, quiet_trainer
from lightning_influence import DiffIn
from lightning_influence.data import FixedBatches
from lightning_influence.estimators import build
from lightning_influence.evaluation import StepRecorder, leave_one_out, retrain, spearman
from lightning_influence.models import Classifier


def test_retraining_with_a_dropped_term_keeps_the_batch_size_as_divisor():
    """One SGD step without sample z: theta - lr * sum_{i != z} grad l_i / b (drop) against
    theta - lr * mean_{i != z} grad l_i (reaverage), from per-sample autograd gradients."""
    problem = digits_problem(n=32, batch_size=8, epochs=1)
    torch.manual_seed(0)
    model = Classifier(hidden=(), lr=0.5).double()
    recorder = StepRecorder()
    batches = problem.train.batches[:1]
    quiet_trainer(callbacks=[recorder], max_steps=1).fit(model, train_dataloaders=FixedBatches(batches))
    x, y, ids = batches[0]
    initial = {n: t.clone() for n, t in recorder.initial_params.items()}
    per_sample = []
    for i in range(len(ids)):
        probe = Classifier(hidden=(), lr=0.5).double()
        probe.load_state_dict(initial, strict=False)
        probe.per_sample_loss((x[i : i + 1], y[i : i + 1], ids[i : i + 1])).sum().backward()
        per_sample.append({n: p.grad.clone() for n, p in probe.named_parameters()})
    z = 3
    for removal, divisor in (("drop", len(ids)), ("reaverage", len(ids) - 1)):
        final = retrain(model, initial, recorder.steps, recorder.optimizer, [(int(ids[z]),)], batch_removal=removal)
        for name, start in initial.items():
            if name not in final:
                continue
            expected = start - 0.5 * sum(g[name] for k, g in enumerate(per_sample) if k != z) / divisor
            torch.testing.assert_close(final[name][0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hidden", [(), (16,)], ids=["logreg", "mlp"])
def test_sgd_influence_ranks_dropped_term_retraining_and_equals_diffin_with_that_removal(hidden):
    problem = digits_problem(n=256, batch_size=16, epochs=4)
    estimator = build("sgd_influence", target="val", target_loader=problem.val)
    drop = DiffIn(target="val", target_loader=problem.val, batch_removal="drop", name="drop")
    reaverage = DiffIn(target="val", target_loader=problem.val)
    torch.manual_seed(0)
    model = Classifier(hidden=hidden, lr=0.1).double()
    recorder = StepRecorder()
    quiet_trainer(callbacks=[recorder, estimator.callback(), drop, reaverage]).fit(model, train_dataloaders=problem.train)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:100]
    args = (model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    truth_drop = leave_one_out(*args, batch_removal="drop")
    truth_reaverage = leave_one_out(*args)
    scores = estimator.scores(model, problem.train, problem.val)
    assert scores.metadata["estimator"] == "sgd_influence" and scores.metadata["batch_removal"] == "drop" and scores.metadata["mode"] == "replay"
    assert estimator.callback().scores is scores  # the callback's own scores say sgd_influence too
    torch.testing.assert_close(scores.values, drop.scores.values, rtol=0, atol=0)
    sgd = scores.values_for(ids)
    rho = spearman(sgd, truth_drop)
    print(f"{hidden}: sgd_influence vs drop retraining {rho:.4f}; vs reaverage retraining {spearman(sgd, truth_reaverage):.4f}; "
          f"DiffIn vs reaverage {spearman(reaverage.scores.values_for(ids), truth_reaverage):.4f}")
    assert rho >= 0.97
    # the two counterfactuals differ (a per-step offset): each estimator matches its own in magnitude
    assert float((sgd - truth_drop).abs().max()) < 0.1 * float(truth_drop.abs().max())
    assert float((reaverage.scores.values_for(ids) - truth_reaverage).abs().max()) < 0.1 * float(truth_reaverage.abs().max())
    assert float((truth_drop - truth_reaverage).abs().max()) > 0.1 * float(truth_reaverage.abs().max())


def test_dropping_a_term_is_refused_for_coupled_losses():
    with pytest.raises(ValueError, match="batch_removal='drop' is defined for losses that are a sum of per-sample terms"):
        DiffIn(target="val", coupled=True, batch_removal="drop")
    with pytest.raises(ValueError, match="batch_removal must be 'reaverage'"):
        DiffIn(target="val", batch_removal="mean")
    with pytest.raises(ValueError, match="sgd_influence is DiffIn with batch_removal='drop'.*use the diffin estimator"):
        build("sgd_influence", target="val", batch_removal="reaverage")
