"""Bad inputs to the ground-truth helpers (metrics, LDS, random removals, subset and leave-one-out
retraining) are refused with what is wrong and how to fix it, never used silently: mismatched
lengths, repeated or non-integer ids, complex or non-numeric scores, empty removal sets."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_influence.evaluation import (
    OptimizerSpec,
    SubsetRetraining,
    TrainingStep,
    detection_auroc,
    fraction_found,
    leave_one_out,
    linear_datamodeling_score,
    pearson,
    random_removals,
    retrain,
    spearman,
    subset_retraining,
)
from lightning_influence.models import Classifier


@pytest.fixture()
def subsets() -> SubsetRetraining:
    return SubsetRetraining(((0, 1), (1, 2), (0, 2), (2, 3)), torch.tensor([3.0, 5.0, 4.0, 7.5], dtype=torch.float64))


@pytest.fixture(scope="module")
def run():  # type: ignore[no-untyped-def]
    """A two-step logistic-regression run, built by hand (no Trainer)."""
    torch.manual_seed(0)
    model = Classifier(in_features=3, num_classes=2, hidden=()).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.tensor([0, 1] * 4)
    steps = [TrainingStep(((x[i : i + 4], y[i : i + 4], torch.arange(i, i + 4)),), (0.5,)) for i in (0, 4)]
    spec = OptimizerSpec.from_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.5))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, initial, steps, spec, [(x, y, torch.arange(8))]


# ---------------------------------------------------------------- LDS: ids and scores
def test_lds_accepts_lists_and_numpy_and_matches_the_tensor_result(subsets) -> None:  # type: ignore[no-untyped-def]
    ids, scores = torch.tensor([3, 0, 1, 2]), torch.tensor([4.0, 1.0, 2.0, 3.5], dtype=torch.float64)
    expected = linear_datamodeling_score(subsets, ids, scores)
    assert linear_datamodeling_score(subsets, ids.tolist(), scores.tolist()) == expected
    assert linear_datamodeling_score(subsets, ids.numpy(), scores.numpy()) == expected
    torch.testing.assert_close(subsets.predicted(ids.tolist(), scores.tolist()), torch.tensor([3.0, 5.5, 4.5, 7.5], dtype=torch.float64))


@pytest.mark.parametrize(
    ("ids", "scores", "match"),
    [
        ([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0, 5.0], r"ids and scores must have the same length.*4 and 5"),
        ([0, 1, 2, 3], [1.0, 2.0], r"same length.*4 and 2"),
        ([0, 1, 2, 3, 0], [1.0, 2.0, 3.0, 4.0, 9.0], r"must not repeat a sample id.*\(0\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), [1.0, 2.0, 3.0, 4.0], r"integer sample ids.*float32"),
        ([0, 1, 2.5, 3], [1.0, 2.0, 3.0, 4.0], r"position 2 holds 2.5"),
        ([0, 1, 2, 3], torch.tensor([1 + 1j, 2, 3, 4]), r"scores is complex"),
        ([0, 1, 2, 3], ["a", "b", "c", "d"], r"scores must be a 1-D sequence of numbers"),
        ([0, 1, 2, 3], [1.0, float("nan"), 3.0, 4.0], r"removed sample id\(s\) have a NaN or infinite score \(1\)"),
    ],
)
def test_lds_refuses_mismatched_ids_and_scores(subsets, ids, scores, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        linear_datamodeling_score(subsets, ids, scores)


def test_lds_names_every_removed_id_without_a_score(subsets) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyError, match=r"2 sample id\(s\) of the removal sets are without a score: ids lacks 2, 3"):
        linear_datamodeling_score(subsets, [0, 1, 7], [1.0, 2.0, 3.0])
    # a score for an id no removal set holds is fine, and so is a NaN score there
    assert linear_datamodeling_score(subsets, [0, 1, 2, 3, 9], [1.0, 2.0, 3.0, 4.5, float("nan")]) == pytest.approx(1.0, abs=1e-5)


def test_subset_results_refuse_repeated_ids_empty_sets_and_a_wrong_number_of_changes() -> None:
    with pytest.raises(ValueError, match=r"removal set 0 must not repeat a sample id.*\(1\)"):
        SubsetRetraining(((1, 1), (2,), (3,)), torch.zeros(3))
    with pytest.raises(ValueError, match=r"removal set 1 is empty: removing nothing measures nothing"):
        SubsetRetraining(((1,), (), (3,)), torch.zeros(3))
    with pytest.raises(ValueError, match=r"removal set 0 must hold integer sample ids"):
        SubsetRetraining(((0.5,), (2,), (3,)), torch.zeros(3))
    with pytest.raises(ValueError, match=r"one change per removal set, got 2 changes for 3"):
        SubsetRetraining(((1,), (2,), (3,)), torch.zeros(2))


def test_subset_retraining_refuses_bad_removal_sets_before_retraining(run) -> None:  # type: ignore[no-untyped-def]
    model, initial, steps, spec, target = run
    with pytest.raises(ValueError, match=r"removal set 1 must not repeat a sample id"):
        subset_retraining(model, initial, steps, spec, [(0,), (1, 1), (2,)], target)
    with pytest.raises(ValueError, match=r"removal set 2 is empty"):
        subset_retraining(model, initial, steps, spec, [(0,), (1,), ()], target)
    retrained = subset_retraining(model, initial, steps, spec, [torch.tensor([0, 5]), np.array([1]), {2, 3}], target)
    assert retrained.removals == ((0, 5), (1,), (2, 3)) and retrained.changes.shape == (3,)


# ---------------------------------------------------------------- random removal sets
def test_random_removals_refuse_a_keep_fraction_that_removes_nothing_and_say_what_works() -> None:
    with pytest.raises(ValueError, match=r"keeps all 10 ids.*keep_fraction <= 9/10.*at least 51 ids"):
        random_removals(range(10), 3, keep_fraction=0.99)
    assert all(len(r) == 1 for r in random_removals(range(10), 3, keep_fraction=9 / 10))
    assert all(len(r) == 1 for r in random_removals(range(51), 3, keep_fraction=0.99))
    with pytest.raises(ValueError, match=r"keeps none of the 10 ids.*keep_fraction >= 1/10"):
        random_removals(range(10), 3, keep_fraction=0.01)
    assert all(len(r) == 9 for r in random_removals(range(10), 3, keep_fraction=1 / 10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": [1, 1, 1, 2]}, r"ids must not repeat a sample id.*\(1\)"),
        ({"ids": [0.5, 1.5, 2.0, 3.0]}, r"position 0 holds 0.5"),
        ({"ids": torch.tensor([True, False, True])}, r"integer sample ids, got a torch.bool"),
        ({"ids": [4]}, r"at least 2 distinct ids"),
        ({"count": 3.5}, r"count must be an int >= 3"),
        ({"count": True}, r"count must be an int >= 3"),
        ({"keep_fraction": "0.5"}, r"keep_fraction must be a number in \(0, 1\)"),
        ({"keep_fraction": float("nan")}, r"keep_fraction must be in \(0, 1\)"),
        ({"seed": 1.5}, r"seed must be an int"),
    ],
)
def test_random_removals_refuse_bad_arguments(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    arguments = {"ids": range(10), "count": 4, "keep_fraction": 0.5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        random_removals(**arguments)


# ---------------------------------------------------------------- retraining ids
@pytest.mark.parametrize("limit,held", [(None, r"the 4 recorded steps hold the sample ids 0\.\.15"), (2, r"the 2 recorded steps hold 8 distinct sample ids between \d+ and \d+")])
def test_removed_ids_that_no_recorded_step_holds_are_refused(limit, held) -> None:  # type: ignore[no-untyped-def]
    """An id that no recorded step holds (an offset, another numbering, a sample the fit never drew)
    would read as a ground truth of 0: leave_one_out and subset_retraining refuse it, naming it and
    the ids the steps hold, before any retraining; retrain itself warns (removing it is a no-op)."""
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import quiet_trainer
    from lightning_influence import IndexedDataset
    from lightning_influence.evaluation import StepRecorder, check_recorded_ids

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=True, generator=g)
    torch.manual_seed(0)
    model, recorder = Classifier(hidden=(4,)).double(), StepRecorder()
    quiet_trainer(callbacks=[recorder], limit_train_batches=limit).fit(model, train_dataloaders=loader)
    held_ids = sorted({int(i) for step in recorder.steps for b in step.batches for i in b[2]})
    unheld = next(i for i in range(16) if i not in held_ids) if limit else 16
    target = [(x[:4], y[:4], torch.arange(4))]
    args = (model, recorder.initial_params, recorder.steps, recorder.optimizer)
    for ids in ([unheld, 1000], torch.tensor([held_ids[0], unheld, 1000])):
        with pytest.raises(ValueError, match=rf"2 removed sample id\(s\) occur in no recorded step \({unheld}, 1000\): {held}\. Check that the ids"):
            leave_one_out(*args, ids, target)
    with pytest.raises(ValueError, match=rf"1 removed sample id\(s\) occur in no recorded step \({unheld}\): {held}"):
        subset_retraining(*args, [(held_ids[0], held_ids[1]), (held_ids[2], unheld)], target)
    with pytest.raises(ValueError, match=r"occur in no recorded step \(500, 501\)"):
        check_recorded_ids(model, recorder.steps, [500, 501])
    # the ids the steps hold are retrained as before
    assert leave_one_out(*args, held_ids[:2], target).shape == (2,)
    assert subset_retraining(*args, [tuple(held_ids[:2])], target).changes.shape == (1,)
    with pytest.warns(UserWarning, match=rf"occur in no recorded step \({unheld}\): {held}.*; removing them changes nothing"):
        retrain(*args, [(unheld,)])


def test_leave_one_out_and_retrain_refuse_non_integer_ids(run) -> None:  # type: ignore[no-untyped-def]
    model, initial, steps, spec, target = run
    with pytest.raises(ValueError, match=r"sample_ids must hold integer sample ids, got a torch.float32 Tensor"):
        leave_one_out(model, initial, steps, spec, torch.tensor([0.7]), target)
    with pytest.raises(ValueError, match=r"position 1 holds 1.0"):
        leave_one_out(model, initial, steps, spec, [0, 1.0], target)
    with pytest.raises(ValueError, match=r"removal set 1 must hold integer sample ids"):
        retrain(model, initial, steps, spec, [(0,), (0.5,)])
    with pytest.raises(ValueError, match=r"removal set 0 must be a sequence of integer sample ids, got int"):
        retrain(model, initial, steps, spec, [3, 4])  # ids where removal sets belong
    # integer ids of any integer kind, as before
    loo = leave_one_out(model, initial, steps, spec, np.array([0, 5], dtype=np.int32), target)
    torch.testing.assert_close(loo, leave_one_out(model, initial, steps, spec, torch.tensor([0, 5]), target), rtol=0, atol=0)


# ---------------------------------------------------------------- correlations and detection
def test_pearson_does_not_overflow_or_underflow_on_extreme_magnitudes() -> None:
    base = np.array([1.0, 2.0, 3.5, 2.5])
    truth = np.array([1.0, 2.5, 3.0, 2.0])
    expected = scipy.stats.pearsonr(base, truth).statistic
    for scale in (1e200, 1e-200, 1e307, 1e-310):
        assert pearson((base * scale).tolist(), truth.tolist()) == pytest.approx(expected, abs=1e-12), scale
    assert pearson([1e308, -1e308, 1.7e308], [1.0, -1.0, 1.7]) == pytest.approx(1.0, abs=1e-12)
    assert spearman((base * 1e200).tolist(), truth.tolist()) == pytest.approx(spearman(base.tolist(), truth.tolist()))


@pytest.mark.parametrize("metric", [spearman, pearson])
def test_correlations_refuse_complex_boolean_and_2d_inputs(metric) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="scores is complex"):
        metric(torch.tensor([1 + 1j, 2, 3]), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="truth holds booleans"):
        metric([1.0, 2.0, 3.0], [True, False, True])
    with pytest.raises(ValueError, match=r"scores must be 1-D.*\(3, 1\)"):
        metric(torch.ones(3, 1), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="same length"):
        metric([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("metric", [detection_auroc, lambda s, p: fraction_found(s, p, 0.5)])
def test_detection_metrics_refuse_bad_scores_and_flags(metric) -> None:  # type: ignore[no-untyped-def]
    flags = [True, False, False, True]
    with pytest.raises(ValueError, match="scores is complex"):
        metric(torch.tensor([1 + 1j, 2, 3, 4]), flags)
    with pytest.raises(ValueError, match=r"scores has 1 non-finite value\(s\).*position 1"):
        metric([1.0, float("nan"), 3.0, 4.0], flags)
    with pytest.raises(ValueError, match=r"positives must be booleans \(or 0/1\), but position 0 holds 0.5"):
        metric([1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"scores must be 1-D.*\(2, 2\)"):
        metric(torch.ones(2, 2), torch.tensor([[True, False], [False, True]]))
    with pytest.raises(ValueError, match="scores and positives must have the same length"):
        metric([1.0, 2.0, 3.0], flags)
    # 0/1 integers and lists are accepted, with the same result as booleans
    assert metric([1.0, 2.0, 3.0, 4.0], [1, 0, 0, 1]) == metric(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(flags))


def test_fraction_found_refuses_a_fraction_that_is_not_a_number() -> None:
    for bad, match in (("0.3", r"must be a number in \(0, 1\]"), (True, "must be a number"), (0.0, r"must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            fraction_found([1.0, 2.0, 3.0], [True, False, False], bad)


def test_a_single_batch_passed_as_the_target_batches_is_refused_with_the_fix():
    from lightning_influence.evaluation.retraining import target_batch_list

    batch = (torch.zeros(4, 64), torch.zeros(4).long(), torch.arange(4))
    with pytest.raises(TypeError, match=r"a single batch \(a tuple of 3 tensors\).*wrap it in a list, \[batch\]"):
        target_batch_list(batch)
    assert target_batch_list([batch]) == [batch]
