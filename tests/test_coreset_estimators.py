"""Coreset and cleaning baselines (EL2N, GraNd, forgetting events, random, final loss) and
outlier gradients: brute-force references, a real Trainer run, checkpoint resume, mislabel
detection on digits, and bad input."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from conftest import digits_problem, quiet_trainer
from lightning_influence.callbacks.forgetting import ForgettingEvents
from lightning_influence.data import DigitsDataModule, FixedBatches
from lightning_influence.estimators.base import Target, build
from lightning_influence.estimators.coreset import EL2N, FinalLoss, Forgetting, GraNd, RandomScores, uniform_hash
from lightning_influence.estimators.outlier_gradient import OutlierGradient, last_module_parameters
from lightning_influence.models import Classifier


class OutputsClassifier(Classifier):
    """The digits classifier with the class-score hook that EL2N and forgetting events read;
    records its own training-step predictions (an independent reference for the callback)."""

    def per_sample_outputs(self, batch):
        return self(batch[0]), batch[1]

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        with torch.no_grad():
            self.seen = getattr(self, "seen", [])
            self.seen.append((ids.tolist(), (self(x).argmax(-1) == y).tolist()))
        return super().training_step(batch, batch_idx)


class NoOutputs(Classifier):
    """A classifier without the class-score hook."""

    per_sample_outputs = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def small():
    p = digits_problem(n=96, batch_size=32, epochs=1, val_size=100)
    torch.manual_seed(0)
    return p, OutputsClassifier(hidden=(8,)).double()


def test_el2n_equals_a_per_sample_loop(small):
    p, model = small
    scores = EL2N(progress=False).scores(model, p.train)
    ref = torch.stack([(torch.softmax(model(p.x[i : i + 1]), -1)[0] - F.one_hot(p.y[i], 10).double()).norm() for i in range(p.n)])
    torch.testing.assert_close(scores.values, ref)
    assert scores.ids.tolist() == list(range(p.n))
    # The outputs= function gives the same; soft labels equal to one-hot too.
    plain = NoOutputs(hidden=(8,)).double()
    plain.load_state_dict(model.state_dict())
    via_fn = build("el2n", outputs=lambda m, b: (m(b[0]), F.one_hot(b[1], 10).double()), progress=False).scores(plain, p.train)
    torch.testing.assert_close(via_fn.values, ref)
    assert {"units", "higher_means"} <= set(scores.metadata)


def test_grand_equals_a_per_sample_autograd_loop(small):
    p, model = small
    scores = GraNd(chunk_size=7, progress=False).scores(model, p.train)
    params = list(model.parameters())
    ref = []
    for i in range(p.n):
        grads = torch.autograd.grad(F.cross_entropy(model(p.x[i : i + 1]), p.y[i : i + 1]), params)
        ref.append(torch.cat([g.reshape(-1) for g in grads]).norm())
    torch.testing.assert_close(scores.values, torch.stack(ref))
    head = GraNd(params=["net.2.*"], progress=False).scores(model, p.train)
    assert head.metadata["parameters"] == 8 * 10 + 10
    assert bool((head.values <= scores.values + 1e-12).all())  # a sub-vector's norm


def test_missing_class_score_hook_is_explained(small):
    p, model = small
    plain = NoOutputs(hidden=(8,)).double()
    with pytest.raises(TypeError, match="per_sample_outputs"):
        EL2N(progress=False).scores(plain, p.train)
    with pytest.raises(TypeError, match="per_sample_outputs"):
        quiet_trainer(callbacks=[Forgetting().callback()], max_steps=1).fit(plain, train_dataloaders=p.train)
    with pytest.raises(ValueError, match="labels of shape"):
        EL2N(outputs=lambda m, b: (m(b[0]), b[1][:1]), progress=False).scores(model, p.train)
    with pytest.raises(RuntimeError, match="callback"):
        Forgetting().scores(model, p.train)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (lambda m, b: (m(b[0]), F.one_hot(b[1], 10).double() + F.one_hot((b[1] + 1) % 10, 10)), "not distributions"),  # multi-label 0/1
        (lambda m, b: (m(b[0])[:, :1], b[0][:, :1].double()), "one class score per sample"),  # a regression output
        (lambda m, b: (m(b[0]), b[1].double()), "must be integers"),
        (lambda m, b: (m(b[0]), b[1] + 10), r"class indices in \[10, 19\] for 10 classes"),
    ],
)
def test_class_score_estimators_refuse_outputs_that_are_not_class_labels(small, outputs, message):
    """Multi-label or regression outputs used to be scored: EL2N's softmax distance exceeded its
    documented range (up to 1.73 > sqrt(2)) or, for one output column, was just |1 - y|."""
    p, model = small
    with pytest.raises(ValueError, match=message):
        EL2N(outputs=outputs, progress=False).scores(model, p.train)
    with pytest.raises(ValueError, match=message):
        quiet_trainer(callbacks=[Forgetting(outputs=outputs).callback()], max_steps=1).fit(model, train_dataloaders=p.train)


def test_forgetting_events_on_a_hand_made_sequence():
    # Presentations (id: correct?) in order. 0: C W C W -> 2 events; 1: never correct;
    # 2: C C C -> 0; 3: W C W -> 1; 4: presented twice within one update call: C then W -> 1.
    events = ForgettingEvents()
    sequence = [([0, 1, 2, 3], [1, 0, 1, 0]), ([0, 1, 2], [0, 0, 1]), ([0, 3, 2, 1], [1, 1, 1, 0]), ([3, 0], [0, 0]), ([4, 4], [1, 0])]
    halfway = None
    for k, (ids, correct) in enumerate(sequence):
        events.update(torch.tensor(ids), torch.tensor(correct, dtype=torch.bool))
        if k == 1:
            halfway = events.state_dict()
    ids, counts, learned, presentations = events.counts()
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert counts.tolist() == [2, 0, 0, 1, 1]
    assert learned.tolist() == [True, False, True, True, True]
    assert presentations.tolist() == [4, 3, 3, 3, 2]
    # Resume from the saved state (through a weights-only file) and replay the rest.
    buffer = io.BytesIO()
    torch.save(halfway, buffer)
    buffer.seek(0)
    resumed = ForgettingEvents()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for ids_, correct in sequence[2:]:
        resumed.update(torch.tensor(ids_), torch.tensor(correct, dtype=torch.bool))
    for a, b in zip(resumed.counts(), events.counts(), strict=True):
        assert torch.equal(a, b)
    # The estimator: never-learned samples get the largest number of presentations (4).
    est = Forgetting()
    est._callback = events
    scores = est.scores(None, None)  # type: ignore[arg-type]
    assert scores.values.tolist() == [2.0, 4.0, 0.0, 1.0, 1.0]
    assert scores.metadata["never_learned_value"] == 4


def _count_by_hand(seen):
    previous, counts, learned = {}, {}, set()
    for ids, correct in seen:
        for i, c in zip(ids, correct, strict=True):
            counts.setdefault(i, 0)
            if previous.get(i) is True and not c:
                counts[i] += 1
            if c:
                learned.add(i)
            previous[i] = c
    return counts, learned


def test_forgetting_inside_a_trainer_run_and_across_a_checkpoint_resume(tmp_path):
    p = digits_problem(n=128, batch_size=16, epochs=1, val_size=100)
    est = Forgetting()
    torch.manual_seed(0)
    model = OutputsClassifier(hidden=(8,), lr=0.5).double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    quiet_trainer(callbacks=[est.callback()], max_epochs=4).fit(model, train_dataloaders=p.train)
    counts, learned = _count_by_hand(model.seen)
    ids, events, learned_t, _ = est.callback().counts()
    assert ids.tolist() == sorted(counts)
    assert events.tolist() == [counts[i] for i in sorted(counts)]
    assert learned_t.tolist() == [i in learned for i in sorted(counts)]
    assert events.sum() > 0  # the run did forget something: the check is not vacuous
    scores = est.scores(model, p.train)
    assert set(scores.ids.tolist()) == set(range(p.n))

    # Two epochs, a checkpoint, two more epochs resumed: the same counts.
    first = Forgetting()
    torch.manual_seed(0)
    resumed_model = OutputsClassifier(hidden=(8,), lr=0.5).double()
    resumed_model.load_state_dict(initial)
    trainer = quiet_trainer(callbacks=[first.callback()], max_epochs=2)
    trainer.fit(resumed_model, train_dataloaders=p.train)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    second = Forgetting()
    again = OutputsClassifier(hidden=(8,), lr=0.5).double()
    quiet_trainer(callbacks=[second.callback()], max_epochs=4).fit(again, train_dataloaders=p.train, ckpt_path=tmp_path / "half.ckpt")
    for a, b in zip(second.callback().counts(), est.callback().counts(), strict=True):
        assert torch.equal(a, b)


def test_random_scores_are_seeded_and_independent_of_order(small):
    p, model = small
    a = RandomScores(seed=3).scores(model, p.train)
    reversed_loader = FixedBatches(list(reversed(p.train.batches)))
    b = build("random", seed=3).scores(model, reversed_loader)
    c = RandomScores(seed=4).scores(model, p.train)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    assert not torch.equal(a.values, c.values)
    assert bool(((a.values >= 0) & (a.values < 1)).all())
    with pytest.raises(TypeError, match="seed"):
        RandomScores(seed="three")  # type: ignore[arg-type]


def test_random_draws_depend_on_seed_and_id_only_and_take_any_id():
    """Ids as large as 2**62 cost nothing (no table indexed by id); a draw is the same whatever
    the other ids; the draws are uniform (Kolmogorov-Smirnov distance of 200,000 draws)."""
    ids = torch.tensor([2**62, 10**12, 5, 0])
    draws = uniform_hash(ids, 3)
    assert torch.equal(draws[2:], uniform_hash(torch.tensor([5, 0]), 3))
    assert not torch.equal(draws, uniform_hash(ids, 4))
    many = uniform_hash(torch.arange(200_000), 0).sort().values
    grid = (torch.arange(1, 200_001, dtype=torch.float64)) / 200_000
    assert float((many - grid).abs().max()) < 0.005 and bool(((many >= 0) & (many < 1)).all())


def test_final_loss_is_minus_the_per_sample_loss(small):
    p, model = small
    scores = FinalLoss(progress=False).scores(model, p.train, Target("val", p.val))  # target ignored
    torch.testing.assert_close(scores.values, -F.cross_entropy(model(p.x), p.y, reduction="none"))


@pytest.fixture(scope="module")
def noisy():
    dm = DigitsDataModule(batch_size=32, label_noise=0.1, seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = Classifier(hidden=(32,), lr=0.1)
    quiet_trainer(max_epochs=10).fit(model, datamodule=dm)
    return dm, model


def _auc(scores, flipped_ids):
    flipped = torch.isin(scores.ids, flipped_ids).numpy()
    return roc_auc_score(flipped, -scores.values.numpy())  # low score = suspicious


@pytest.mark.parametrize(
    "name, options",
    [("loss", {}), ("outlier_gradient", {}), ("outlier_gradient", {"method": "norm"}), ("outlier_gradient", {"method": "isolation_forest"})],
)
def test_mislabelled_samples_are_detected(noisy, name, options):
    dm, model = noisy
    scores = build(name, progress=False, **options).scores(model, dm.train_dataloader())
    auc = _auc(scores, dm.flipped_ids)
    print(f"{name} {options}: ROC-AUC {auc:.3f}")
    assert auc > 0.9  # measured 0.99-1.0
    assert {"units", "higher_means"} <= set(scores.metadata)


def test_outlier_gradient_uses_the_last_layer_by_default_and_refuses_bad_options(small):
    p, model = small
    assert last_module_parameters(model) == ["net.2.weight", "net.2.bias"]
    scores = OutlierGradient(progress=False).scores(model, p.train)
    head = GraNd(params=["net.2.*"], progress=False).scores(model, p.train)
    torch.testing.assert_close(scores.values, -head.values.pow(2))
    with pytest.raises(ValueError, match="method"):
        OutlierGradient(method="lof")
    with pytest.raises(ValueError, match="detector_options"):
        OutlierGradient(detector_options={"n_estimators": 10})
    with pytest.raises(ValueError, match="IsolationForest"):
        OutlierGradient(method="isolation_forest", detector_options={"trees": 10})
    with pytest.raises(ValueError, match="chunk_size"):
        GraNd(chunk_size=0)


class _SparseEmbedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x).mean(1)))


@pytest.mark.parametrize("estimator", [GraNd(progress=False), OutlierGradient(params=["net.emb.*"], progress=False)], ids=["grand", "outlier_gradient"])
def test_a_sparse_embedding_is_refused_before_any_gradient_naming_the_layer_and_the_fix(estimator):
    """Before: 'reshape is not implemented for sparse tensors' from deep in the parameter space."""
    from lightning_influence.mixin import InfluenceMixin

    class Model(InfluenceMixin, torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _SparseEmbedding()

        def per_sample_loss(self, batch):
            return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    torch.manual_seed(0)
    model = Model().double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (40, 3), generator=g), torch.randint(0, 3, (40,), generator=g)
    train = FixedBatches([(x[i : i + 16], y[i : i + 16], torch.arange(i, min(i + 16, 40))) for i in range(0, 40, 16)])
    message = r"embedding 'net\.emb' \(Embedding\) has sparse=True.*`model\.net\.emb\.sparse = False`"
    with pytest.raises(ValueError, match=message):
        estimator.check_module(model)
    with pytest.raises(ValueError, match=message):
        estimator.scores(model, train)
    model.net.emb.sparse = False  # the fix named in the message
    assert torch.isfinite(estimator.scores(model, train).values).all()
