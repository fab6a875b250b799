"""The one interface: every registered estimator builds by name, runs through a real Trainer
fit (with its callback when it watches training) and returns scores for every training sample,
finite, in the common format."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import digits_problem, quiet_trainer
from lightning_influence.data import FixedBatches
from lightning_influence.estimators import REGISTRY, Estimator, Target, available, build, estimator_class
from lightning_influence.models import Classifier
from lightning_influence.scores import SIGN_CONVENTION


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    return digits_problem(n=96, batch_size=16, epochs=2, val_size=50)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_estimator_scores_every_training_sample(name: str, problem) -> None:  # type: ignore[no-untyped-def]
    cls = estimator_class(name)
    assert issubclass(cls, Estimator) and cls.name == name
    # Estimators that watch training take their target when built (their callback needs it during fit).
    options = {"target": "val", "target_loader": problem.val} if cls.options_from is not None else {}
    estimator = build(name, **options)
    callback = estimator.callback()
    assert (callback is not None) == cls.records_training
    torch.manual_seed(0)
    model = Classifier(hidden=(8,), lr=0.1).double()
    quiet_trainer(callbacks=[callback] if callback is not None else []).fit(model, train_dataloaders=problem.train)
    one_epoch = FixedBatches(problem.train.batches[: len(problem.train.batches) // 2])
    scores = estimator.scores(model, one_epoch, Target("val", problem.val))
    assert sorted(scores.ids.tolist()) == list(range(problem.n))
    assert scores.values.shape == (problem.n,) and scores.values.dtype == torch.float64
    assert bool(torch.isfinite(scores.values).all())
    if name in ("el2n", "grand", "forgetting", "random", "loss", "outlier_gradient"):  # rankings, not removal effects
        assert scores.metadata["sign_convention"].startswith("a ranking, not a target-loss change")
        assert scores.metadata["calibrated"] is False
    else:
        assert scores.metadata["sign_convention"] == SIGN_CONVENTION
    assert scores.metadata.get("estimator") is not None


@pytest.mark.parametrize("name", ["diffin", "sgd_influence", "tracin"])
def test_recording_estimators_refuse_a_target_they_did_not_record(name: str, problem) -> None:  # type: ignore[no-untyped-def]
    """Their scores answer the target their callback saw during fit: another loader, sample
    count or kind asked of scores() is refused, not silently answered with the recorded one."""
    estimator = build(name, target="val", target_loader=problem.val)
    torch.manual_seed(0)
    model = Classifier(hidden=(8,), lr=0.1).double()
    quiet_trainer(callbacks=[estimator.callback()]).fit(model, train_dataloaders=problem.train)
    other = FixedBatches(list(problem.val.batches))
    with pytest.raises(ValueError, match="not against the loader passed to scores"):
        estimator.scores(model, problem.train, Target("val", other))
    with pytest.raises(ValueError, match="target_samples=None but sample_count=5"):
        estimator.scores(model, problem.train, Target("val", problem.val, sample_count=5))
    with pytest.raises(ValueError, match="target='val' but 'train' was asked for"):
        estimator.scores(model, problem.train, "train")
    assert len(estimator.scores(model, problem.train, Target("val", problem.val))) == problem.n


@pytest.mark.parametrize("name", ["diffin", "tracin"])
def test_recording_estimators_refuse_another_seed_of_the_target_subset(name: str, problem) -> None:  # type: ignore[no-untyped-def]
    """A target subset is its size and the seed that drew it: a subset of the recorded size drawn
    with another seed is another question, refused like another size."""
    estimator = build(name, target="val", target_loader=problem.val, target_samples=3, seed=5)
    torch.manual_seed(0)
    model = Classifier(hidden=(8,), lr=0.1).double()
    quiet_trainer(callbacks=[estimator.callback()]).fit(model, train_dataloaders=problem.train)
    recorded = estimator.scores(model, problem.train, Target("val", problem.val, sample_count=3, seed=5))
    assert len(recorded) == problem.n
    for seed in (0, 7):
        with pytest.raises(ValueError, match=rf"target_samples=3 drawn with seed=5 but seed={seed} was asked for .*build the estimator with seed={seed}"):
            estimator.scores(model, problem.train, Target("val", problem.val, sample_count=3, seed=seed))
    with pytest.raises(ValueError, match=r"subset of target_samples=3 target samples, but the whole target was asked for.*sample_count=3, seed=5"):
        estimator.scores(model, problem.train, Target("val", problem.val))


def test_unknown_names_are_refused_with_the_list() -> None:
    with pytest.raises(KeyError, match="available: .*diffin"):
        build("no_such_estimator")
    assert "tracin" in available() and "influence_function" in available()


def test_targets_validate() -> None:
    with pytest.raises(ValueError, match="needs a loader"):
        Target("val")
    with pytest.raises(ValueError, match="one of"):
        Target("test", loader=[])
    with pytest.raises(ValueError, match="sample_count"):
        Target("train", sample_count=0)


class _NotInfluenceAware(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 10)


@pytest.mark.parametrize("name", [n for n in available() if not estimator_class(n).records_training])
def test_post_hoc_estimators_refuse_a_module_without_the_mixin(name, small_digits):
    with pytest.raises(TypeError, match="_NotInfluenceAware is not influence-aware: add lightning_influence.InfluenceMixin"):
        build(name).scores(_NotInfluenceAware().double(), small_digits.train, Target("val", small_digits.val))


class _ReducedLoss(Classifier):
    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        return super().per_sample_loss(batch).mean()


@pytest.mark.parametrize("name", [n for n in available() if not estimator_class(n).records_training and n not in ("el2n", "random")])
def test_post_hoc_estimators_refuse_a_reduced_per_sample_loss(name, small_digits):
    """(EL2N reads per_sample_outputs and the random baseline no loss at all.)"""
    with pytest.raises(ValueError, match=r"must return an unreduced Tensor\[B\]|per_sample_loss returned shape \(\)"):
        build(name).scores(_ReducedLoss(hidden=(8,)).double(), small_digits.train, Target("val", small_digits.val))


def test_options_are_checked_against_their_annotations_for_every_estimator() -> None:
    """Hydra gives strings: a boolean option must be a bool, and params as one string is one pattern."""
    assert build("influence_function", params="net.2.*").params == ["net.2.*"]
    assert build("datainf", params="net.2.*").params == ["net.2.*"]
    with pytest.raises(TypeError, match="option signed must be True or False, got 'off'"):
        build("forward_inf", signed="off")
    with pytest.raises(TypeError, match="option centered must be True or False"):
        build("influence_function", centered=1)
    with pytest.raises(TypeError, match="params must be parameter-name patterns"):
        build("grand", params=[0])
    for name in ("influence_function", "grand", "forward_inf", "outlier_gradient"):  # not silently "all parameters"
        with pytest.raises(ValueError, match=r"params=\[\] selects no parameter"):
            build(name, params=[])
    from lightning_influence import DiffIn

    assert DiffIn(params="net.2.*").params == ["net.2.*"]


def test_scalar_options_and_option_names_are_checked_when_the_estimator_is_built() -> None:
    """Numbers, strings and flags are checked against their annotations (``True`` is not a learning
    rate, ``"3"`` is not a seed); the recording estimators check their callback's options (names,
    with the closest ones, and values) when built, not at ``callback()``."""
    for name, options, message in [
        ("diffin", {"log_summary": "off"}, r"option log_summary must be True or False, got 'off' \(str\)"),
        ("diffin", {"windw": 3}, r"estimator 'diffin' has no option 'windw': did you mean window\?"),
        ("diffin", {"coupled": "false"}, r"option coupled must be True or False or None"),
        ("tracin", {"target_evry": 2}, r"estimator 'tracin' has no option 'target_evry': did you mean target_every"),
        ("forward_inf", {"lr": True}, r"option lr must be a number, got True \(bool\)"),
        ("forward_inf", {"learning_rate_sum": "2"}, r"option learning_rate_sum must be a number or None, got '2'"),
        ("influence_function", {"seed": "3"}, r"option seed must be an integer, got '3'"),
        ("influence_function", {"hessian_batches": True}, r"option hessian_batches must be an integer or None, got True"),
        ("outlier_gradient", {"sed": 1}, r"has no option 'sed': did you mean seed\?"),
    ]:
        with pytest.raises(TypeError, match=message):
            build(name, **options)
    with pytest.raises(ValueError, match="mode must be 'replay' or 'online'"):
        build("diffin", mode="bogus")
    assert build("diffin", fd_rel_step=1e-3, window=16, mode="online").callback().window == 16  # an int where a float goes is fine
    assert build("influence_function", damping=1).damping == 1
    from lightning_influence import DiffIn

    with pytest.raises(ValueError, match="log_summary must be True or False, got 'off'"):
        DiffIn(log_summary="off")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["influence_function", "outlier_gradient", "random", "tracin_checkpoints", "diffin_checkpoints"])
@pytest.mark.parametrize("seed", [-1, 2**40])
def test_every_seeded_estimator_refuses_a_seed_out_of_range(name: str, seed: int) -> None:
    with pytest.raises(ValueError, match=r"seed=.* is out of range"):
        build(name, seed=seed)


def test_parameter_checkpoints_refuse_a_seed_out_of_range() -> None:
    from lightning_influence.callbacks.checkpoints import ParameterCheckpoints

    with pytest.raises(ValueError, match=r"seed=-1 is out of range"):
        ParameterCheckpoints(every=2, seed=-1)
