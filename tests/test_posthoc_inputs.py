"""What every post-hoc estimator checks about the training loader and the loss before scoring
(``estimators.base.posthoc_training``): a loader whose passes hold different samples is refused
at the first sample that differs (the estimators read it several times), and a per-sample loss
that autograd cannot differentiate is refused with the DiffIn callback's message, before any
gradient is taken."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from lightning_influence import IndexedDataset
from lightning_influence.data import load_digits_tensors
from lightning_influence.estimators.base import Target, build, estimator_class
from lightning_influence.models import Classifier

N = 60
#: the estimators that read the training loader more than once, and their recording callbacks
MULTI_PASS = ["influence_function", "datainf", "forward_inf", "tracin_checkpoints", "diffin_checkpoints"]


def _data():
    x, y = load_digits_tensors(torch.float64)
    return IndexedDataset(TensorDataset(x[:N], y[:N])), IndexedDataset(TensorDataset(x[N : N + 40], y[N : N + 40]))


def _estimator(name):
    options = {"progress": False} if "progress" in inspect.signature(estimator_class(name)).parameters else {}
    return build(name, **options)


def _fit(train_loader, estimators=(), model_class=Classifier):
    torch.manual_seed(0)
    model = model_class(hidden=(8,)).double()
    callbacks = [c for e in estimators if (c := e.callback()) is not None]
    quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model, train_loader)
    return model


class CountingLoader:
    """A loader that counts how often it is read (to show that a refusal comes before any work)."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


@pytest.mark.parametrize("name", MULTI_PASS)
def test_a_loader_that_draws_another_subset_each_pass_is_refused(name):
    train_set, val_set = _data()
    # shuffle + drop_last: each pass drops another 12 of the 60 samples
    drawing = DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=40)
    estimator = _estimator(name)
    model = _fit(drawing, [estimator])
    with pytest.raises(ValueError, match=rf"different samples on two passes: estimator '{name}' reads it more than once .*drop_last=True"):
        estimator.scores(model, drawing, Target("val", val))


def test_the_same_samples_in_another_order_score_the_same_and_partial_passes_are_compared_too():
    train_set, val_set = _data()
    ordered = DataLoader(train_set, batch_size=16)
    shuffled = DataLoader(train_set, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    val = DataLoader(val_set, batch_size=40)
    model = _fit(ordered)
    for name in ("influence_function", "datainf"):
        a = _estimator(name).scores(model, ordered, Target("val", val))
        b = _estimator(name).scores(model, shuffled, Target("val", val))
        assert sorted(a.ids.tolist()) == sorted(b.ids.tolist()) == list(range(N))
        torch.testing.assert_close(torch.stack([b[i] for i in range(N)]), torch.stack([a[i] for i in range(N)]), rtol=1e-9, atol=1e-12)
    # the curvature of hessian_batches=2 must come from the same two batches on every pass: a
    # shuffling loader changes them from pass to pass (CG would solve with a changing operator)
    with pytest.raises(ValueError, match="the first 2 batches of the training loader yielded different samples on two passes"):
        build("influence_function", solver="cg", hessian_batches=2).scores(model, shuffled, Target("val", val))
    fixed = build("influence_function", solver="cg", hessian_batches=2).scores(model, ordered, Target("val", val))
    assert sorted(fixed.ids.tolist()) == list(range(N))


def test_a_one_shot_iterator_is_refused_at_its_second_pass():
    train_set, val_set = _data()
    loader = DataLoader(train_set, batch_size=16)
    model = _fit(loader)
    with pytest.raises(ValueError, match="this pass yielded no batch at all .*one-shot iterator"):
        build("datainf").scores(model, (b for b in loader), Target("val", DataLoader(val_set, batch_size=40)))


class DetachedLoss(Classifier):
    """A user's mistake: the per-sample losses are cut from the graph (training itself is fine)."""

    def per_sample_loss(self, batch):
        return super().per_sample_loss(batch).detach()

    def training_step(self, batch, batch_idx):
        return Classifier.per_sample_loss(self, batch).mean()


class IntegerLoss(DetachedLoss):
    """Another: the 'losses' are correctness flags."""

    def per_sample_loss(self, batch):
        return (self(batch[0]).argmax(-1) != batch[1]).long()


@pytest.mark.parametrize("name", ["influence_function", "datainf", "forward_inf", "grand", "outlier_gradient", "tracin_checkpoints", "diffin_checkpoints"])
def test_a_loss_that_autograd_cannot_differentiate_is_refused_before_any_work(name):
    train_set, val_set = _data()
    loader = DataLoader(train_set, batch_size=16)
    estimator = _estimator(name)
    model = _fit(loader, [estimator], model_class=DetachedLoss)
    val = CountingLoader(DataLoader(val_set, batch_size=40))
    with pytest.raises(ValueError, match=rf"do not depend on the trainable parameters \(requires_grad is False\): estimator '{name}' differentiates them.*without \.detach\(\)"):
        estimator.scores(model, loader, Target("val", val))
    assert val.passes == 0  # refused before the target gradient
    integer = IntegerLoss(hidden=(8,)).double()
    integer.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="must return floating-point losses, got dtype torch.int64"):
        estimator.scores(integer, loader, Target("val", val))
    short_ids = ShortIds(hidden=(8,)).double()
    short_ids.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"sample_ids\(batch\) returned 15 ids for a batch of 16 samples"):
        estimator.scores(short_ids, loader, Target("val", val))
    assert val.passes == 0


class ShortIds(Classifier):
    """A sample_ids with one id missing: the refusal used to blame per_sample_loss."""

    def sample_ids(self, batch):
        return batch[-1][:-1]


# ------------------------------------------------------------------ model contracts, before any work
class _NoClassScores(Classifier):
    per_sample_outputs = None  # a module without per-sample class scores


class _SmoothedLoss(Classifier):
    """Its per-sample loss is not the default output split's plain cross-entropy."""

    def per_sample_loss(self, batch):
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y, reduction="none", label_smoothing=0.2)


class _NormedHead(Classifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = torch.nn.LayerNorm(10)

    def forward(self, x):
        return self.norm(super().forward(x))


@pytest.mark.parametrize(
    ("name", "options", "module_class", "with_batch", "error", "message"),
    [
        ("el2n", {}, _NoClassScores, False, TypeError, r"_NoClassScores does not provide per-sample class scores: define a method per_sample_outputs"),
        ("forgetting", {}, _NoClassScores, False, TypeError, r"does not provide per-sample class scores"),
        ("el2n", {"outputs": lambda m, b: (m(b[0]), b[1][:3])}, Classifier, True, ValueError, r"labels of shape \(3,\) for logits of shape \(16, 10\)"),
        ("influence_function", {"solver": "ekfac"}, _NormedHead, False, ValueError, r"K-FAC/EK-FAC attributes only nn.Linear .*not covered: \['norm.weight', 'norm.bias'\]"),
        ("influence_function", {}, _SmoothedLoss, True, ValueError, r"the default split .* does not reproduce module.per_sample_loss\(batch\)"),
        ("influence_function", {"solver": "kfac"}, _SmoothedLoss, True, ValueError, r"does not reproduce module.per_sample_loss"),
    ],
)
def test_check_module_refuses_what_scores_would_refuse_after_its_work(name, options, module_class, with_batch, error, message):
    """``Estimator.check_module`` (run by the recipes on their trial model) refuses, from the
    module and one batch, what ``scores`` would refuse only after reading the data; the same
    module without the fault passes."""
    train_set, _ = _data()
    batch = next(iter(DataLoader(train_set, batch_size=16)))
    torch.manual_seed(0)
    module = module_class(hidden=(8,)).double()
    estimator = build(name, **options)
    with pytest.raises(error, match=message):
        estimator.check_module(module, batch if with_batch else None)
    build(name).check_module(Classifier(hidden=(8,)).double(), batch)
    if module_class is _SmoothedLoss:  # Hessian curvature needs no output split: nothing to refuse
        build(name, curvature="hessian", solver="cg").check_module(module, batch)


def test_the_forgetting_callback_refuses_a_module_without_class_scores_at_setup():
    train_set, _ = _data()
    estimator = build("forgetting")
    with pytest.raises(TypeError, match="does not provide per-sample class scores"):
        quiet_trainer(max_epochs=1, callbacks=[estimator.callback()]).fit(_NoClassScores(hidden=(8,)).double(), DataLoader(train_set, batch_size=16))


# ------------------------------------------------------------------ batches without sample ids
POST_HOC = ["influence_function", "datainf", "forward_inf", "grand", "el2n", "loss", "random", "outlier_gradient"]


@pytest.mark.parametrize("name", POST_HOC)
def test_a_training_set_without_id_column_is_refused_by_every_post_hoc_estimator(name):
    """``TensorDataset(x, y)``: the default ``sample_ids`` would read the labels as ids (10 "samples"
    scored for 60, each the first one seen with its label)."""
    x, y = load_digits_tensors(torch.float64)
    _, val_set = _data()
    model = _fit(DataLoader(_data()[0], batch_size=16))
    with pytest.raises(ValueError, match=r"TensorDataset of 2 tensors whose last one .* is not a column of sample ids"):
        _estimator(name).scores(model, DataLoader(TensorDataset(x[:N], y[:N]), batch_size=16), Target("val", DataLoader(val_set, batch_size=40)))


@pytest.mark.parametrize("name", ["el2n", "loss", "grand", "influence_function"])
def test_batches_whose_ids_repeat_in_one_batch_are_refused(name):
    """A dataset of (x, y) pairs that is not a TensorDataset: the labels read as ids repeat."""
    x, y = load_digits_tensors(torch.float64)
    pairs = [(x[i], y[i]) for i in range(N)]
    _, val_set = _data()
    model = _fit(DataLoader(_data()[0], batch_size=16))
    with pytest.raises(ValueError, match=r"a training batch holds sample id \d+ more than once .*reads their last element \(the labels\?\) as ids"):
        _estimator(name).scores(model, DataLoader(pairs, batch_size=16), Target("val", DataLoader(val_set, batch_size=40)))


def test_the_forgetting_callback_refuses_batches_without_ids():
    x, y = load_digits_tensors(torch.float64)
    with pytest.raises(ValueError, match="is not a column of sample ids"):
        quiet_trainer(max_epochs=1, callbacks=[build("forgetting").callback()]).fit(Classifier(hidden=(8,)).double(), DataLoader(TensorDataset(x[:N], y[:N]), batch_size=16))
    pairs = [(x[i], y[i]) for i in range(N)]
    with pytest.raises(ValueError, match=r"duplicate sample ids in one batch"):
        quiet_trainer(max_epochs=1, callbacks=[build("forgetting").callback()]).fit(Classifier(hidden=(8,)).double(), DataLoader(pairs, batch_size=16))


# ------------------------------------------------------------------ layers K-FAC cannot factor, unused heads
class _SharedLayer(Classifier):
    """One hidden layer applied twice (weight sharing)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mid = torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.mid(torch.tanh(self.mid(super().forward(x))))


class _AuxiliaryHead(Classifier):
    """A head registered last that the loss never calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.aux = torch.nn.Linear(64, 3)


@pytest.mark.parametrize("solver", ["ekfac", "kfac"])
def test_kfac_refuses_a_shared_layer_and_an_unused_one(solver):
    train_set, val_set = _data()
    train, val = DataLoader(train_set, batch_size=16), Target("val", DataLoader(val_set, batch_size=40))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"layer 'mid' is called more than once in one forward pass"):
        build("influence_function", solver=solver, progress=False).scores(_SharedLayer(hidden=(8,)).double(), train, val)
    with pytest.raises(ValueError, match=r"the attributed layers \['aux'\] are not called when the model computes its outputs"):
        build("influence_function", solver=solver, progress=False).scores(_AuxiliaryHead(hidden=(8,)).double(), train, val)


def test_outlier_gradient_refuses_parameters_with_zero_gradients_everywhere():
    train_set, _ = _data()
    model = _AuxiliaryHead(hidden=(8,)).double()
    with pytest.raises(ValueError, match=r"per-sample gradients of \['aux.weight', 'aux.bias'\] \(the default .*\) are zero on every training sample"):
        build("outlier_gradient", progress=False).scores(model, DataLoader(train_set, batch_size=16))
    assert build("outlier_gradient", params=["net.*"], progress=False).scores(model, DataLoader(train_set, batch_size=16)).values.ne(0).all()


# ------------------------------------------------------------------ non-finite training or target data
NON_FINITE_CASES = [
    ("influence_function", {"solver": "exact"}),
    ("influence_function", {"solver": "exact", "curvature": "hessian"}),
    ("influence_function", {"solver": "cg"}),
    ("influence_function", {"solver": "lissa", "lissa_depth": 20}),
    ("influence_function", {"solver": "lissa", "lissa_depth": 20, "lissa_scale": 10.0, "damping_scale": "absolute", "curvature": "hessian"}),
    ("influence_function", {"solver": "arnoldi", "arnoldi_iterations": 10, "arnoldi_rank": 5}),
    ("influence_function", {"solver": "ekfac"}),
    ("influence_function", {"solver": "kfac"}),
    ("influence_function", {"solver": "kfac", "fisher": "empirical"}),
    ("influence_function", {"solver": "cg", "hessian_batches": 1}),  # the bad batch is outside the curvature's
    ("datainf", {}),
    ("grand", {"progress": False}),
    ("outlier_gradient", {"progress": False}),
    ("el2n", {"progress": False}),
    ("loss", {"progress": False}),
]


def _with_nan(dataset, index):
    x, y = dataset.dataset.tensors
    x = x.clone()
    x[index, 5] = float("nan")
    return IndexedDataset(TensorDataset(x, y))


@pytest.mark.parametrize("name,options", NON_FINITE_CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in NON_FINITE_CASES])
def test_a_nan_sample_in_a_later_training_batch_is_refused_naming_its_id_and_batch(name, options):
    """Only the first batch's losses are checked up front: a NaN sample further on must still be
    refused with its id and batch, never give NaN (or all-zero) scores or a solver's misleading error."""
    train_set, val_set = _data()
    model = Classifier(hidden=(8,)).double().eval()
    if name in ("influence_function", "datainf"):
        options = {"progress": False, **options}
    train = DataLoader(_with_nan(train_set, 50), batch_size=16)  # sample 50: batch 3 (counted from 0)
    with pytest.raises(ValueError, match=r"training sample id \[50\] \(training batch 3, counted from 0\) is not finite .*Check these samples for NaN/inf"):
        build(name, **options).scores(model, train, Target("val", DataLoader(val_set, batch_size=40)))
    # the same estimator scores the clean data with finite numbers
    clean = build(name, **options).scores(model, DataLoader(train_set, batch_size=16), Target("val", DataLoader(val_set, batch_size=40)))
    assert bool(torch.isfinite(clean.values).all())


def test_a_nan_sample_is_refused_when_the_target_is_the_training_loss():
    train_set, _ = _data()
    model = Classifier(hidden=(8,)).double().eval()
    with pytest.raises(ValueError, match=r"training sample id \[50\] \(training batch 3, counted from 0\) is not finite \(NaN or inf\) \(detected because the target loss/gradient is not finite"):
        build("influence_function", progress=False).scores(model, DataLoader(_with_nan(train_set, 50), batch_size=16), "train")


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa", "arnoldi", "ekfac", "datainf"])
def test_a_nan_target_sample_is_refused_before_any_solver_runs(solver):
    """A NaN target gradient made CG return all-zero scores and LiSSA report a divergence."""
    train_set, val_set = _data()
    model = Classifier(hidden=(8,)).double().eval()
    estimator = build("datainf", progress=False) if solver == "datainf" else build("influence_function", solver=solver, lissa_depth=20, progress=False)
    train = CountingLoader(DataLoader(train_set, batch_size=16))
    with pytest.raises(ValueError, match=r"the target loss/gradient is not finite: check the target/validation data for NaN/inf \(non-finite losses in target batch 1, rows \[2\]"):
        estimator.scores(model, train, Target("val", DataLoader(_with_nan(val_set, 22), batch_size=20)))
    assert train.passes <= 1  # the first-batch check only: no curvature pass


# ------------------------------------------------------------------ the same inputs on every pass (no random augmentation)
class FlippingDigits(torch.utils.data.Dataset):
    """Digits images (8 x 8) with the commonest augmentation: a random horizontal flip, drawn again
    on every read (as torchvision's ``RandomHorizontalFlip`` in ``__getitem__``). A flip permutes
    pixels, so a batch's sum and sum of squares do not see it. ``augment=False``: the evaluation
    transforms (the image as it is)."""

    def __init__(self, x, y, augment=True):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        image = self.x[index].reshape(8, 8)
        if self.augment and bool(torch.rand(()) < 0.5):
            image = image.flip(1)
        return image.reshape(64), self.y[index], index


def _flipping(augment=True):
    x, y = load_digits_tensors(torch.float64)
    return FlippingDigits(x[:N], y[:N], augment), IndexedDataset(TensorDataset(x[N : N + 40], y[N : N + 40]))


def _forward_inf_reference(model, train_set, val_set, lr):
    """Forward-INF with one plain SGD step, by hand: ``-(l_i(theta - lr grad F) - l_i(theta)) / (n lr)``,
    ``F`` the mean validation loss (autograd on the module itself, no library code)."""
    x = torch.stack([train_set[i][0] for i in range(len(train_set))])
    y = torch.stack([torch.as_tensor(train_set[i][1]) for i in range(len(train_set))])
    xv, yv = val_set.dataset.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xv), yv), params)
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        for p, g in zip(params, grads):
            p.sub_(lr * g)
        moved = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        for p, g in zip(params, grads):
            p.add_(lr * g)
    return -(moved - base) / (len(y) * lr)


@pytest.mark.parametrize("name", ["forward_inf", "influence_function"])
def test_a_training_set_that_augments_on_every_read_is_refused_in_order_and_shuffled(name):
    """Forward-INF subtracts the losses of two passes: with a fresh flip per read, its scores were
    mostly augmentation noise (about 100x the real ones, 130% apart between two identical calls),
    accepted silently; the other post-hoc estimators mixed gradients of different inputs (4-9%)."""
    augmented, val_set = _flipping()
    val = DataLoader(val_set, batch_size=40)
    model = _fit(DataLoader(_flipping(augment=False)[0], batch_size=16))
    torch.manual_seed(1)
    in_order = DataLoader(augmented, batch_size=16)
    with pytest.raises(
        ValueError,
        match=rf"served different inputs on two passes: training batch \d+ \(counted from 0\) holds the same sample ids in the "
        rf"same order as on the first pass, but its tensor batch\[0\] \(float64 \[16, 64\]\) holds other values.*estimator '{name}' "
        r"reads the training loader more than once.*random augmentation.*Score with a loader without augmentation",
    ):
        _estimator(name).scores(model, in_order, Target("val", val))
    shuffled = DataLoader(augmented, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"served different inputs on two passes: over the whole pass, the per-sample rows of batch\[0\] \(float64 \[B, 64\]\)"):
        _estimator(name).scores(model, shuffled, Target("val", val))


def test_without_augmentation_forward_inf_matches_its_formula_in_order_and_shuffled():
    """The same dataset with its evaluation transforms is accepted, in order and shuffled (each
    pass batching the samples differently), and Forward-INF gives the hand-computed step, identically
    on every call."""
    plain, val_set = _flipping(augment=False)
    val = DataLoader(val_set, batch_size=40)
    model = _fit(DataLoader(plain, batch_size=16))
    reference = _forward_inf_reference(model, plain, val_set, lr=1e-3)
    for loader in (DataLoader(plain, batch_size=16), DataLoader(plain, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))):
        runs = [build("forward_inf", progress=False).scores(model, loader, Target("val", val)).values_for(list(range(N))) for _ in range(2)]
        torch.testing.assert_close(runs[0], reference, rtol=1e-9, atol=1e-12)
        assert torch.equal(runs[0], runs[1])


def _pad_collate(samples):
    """Batches ``(x, y, tokens, ids)`` whose ``tokens`` are padded with a non-zero id to the longest
    sample of the batch (dynamic padding): a sample's row depends on what it is batched with."""
    x, y, ids = (torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in (0, 1, 2))
    tokens = torch.nn.utils.rnn.pad_sequence([torch.arange(1, 2 + int(i) % 7) for i in ids], batch_first=True, padding_value=99)
    return x, y, tokens, ids


def test_shuffled_dynamically_padded_batches_are_not_taken_for_augmentation():
    """A shuffling loader that pads each batch to its longest sample serves the same samples
    with rows of other lengths on each pass: not an augmentation, and accepted."""
    plain, val_set = _flipping(augment=False)
    val = DataLoader(val_set, batch_size=40)
    model = _fit(DataLoader(plain, batch_size=16))
    padded = DataLoader(plain, batch_size=8, shuffle=True, collate_fn=_pad_collate, generator=torch.Generator().manual_seed(0))
    scores = build("forward_inf", progress=False).scores(model, padded, Target("val", val))
    torch.testing.assert_close(scores.values_for(list(range(N))), _forward_inf_reference(model, plain, val_set, lr=1e-3), rtol=1e-9, atol=1e-12)


def test_batch_fingerprints_see_every_bit_and_position_and_nothing_else():
    """Equal tensors (any dtype, device copies included) give equal fingerprints, NaN too (a NaN
    input is refused elsewhere, by its own message); a changed element, a flip or a swap of two
    samples' rows changes them, although a flip keeps the sum and the sum of squares."""
    from lightning_influence.estimators.base import batch_fingerprint

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    x[2, 0, 0] = float("nan")
    ids = torch.arange(10, 16)
    batch = {
        "x": x,
        "half": x.to(torch.float16),
        "bf16": x.to(torch.bfloat16),
        "mask": x > 0,
        "labels": torch.arange(6) % 3,
        "complex": torch.complex(x, -x).to(torch.complex64),
        "scale": torch.tensor(0.5),
        "ids": ids,
    }
    prints = batch_fingerprint(batch, ids)
    assert [p.path for p in prints] == [f"batch[{k!r}]" for k in batch]
    assert prints == batch_fingerprint({k: v.clone() for k, v in batch.items()}, ids.clone())
    assert [p.by_sample is None for p in prints] == [False] * 6 + [True, False]
    flipped = x.flip(2)
    torch.testing.assert_close((flipped.nansum(), (flipped**2).nansum()), (x.nansum(), (x**2).nansum()), rtol=1e-14, atol=0)  # up to rounding
    for key, changed in [("x", flipped), ("half", batch["half"].flip(2)), ("mask", ~batch["mask"]), ("labels", batch["labels"] + 1), ("scale", torch.tensor(0.25))]:
        other = batch_fingerprint({**batch, key: changed}, ids)
        assert [p.path for p in prints if p not in other] == [f"batch[{key!r}]"]
    swapped = x[[1, 0, 2, 3, 4, 5]]
    assert batch_fingerprint({**batch, "x": swapped}, ids)[0] != prints[0]
    # the order-free sum of a whole pass: the same samples in another order, in other batches, give the same sum
    permutation = torch.randperm(6, generator=g)
    rows = batch_fingerprint({"x": x[permutation[:4]]}, ids[permutation[:4]])[0].by_sample + batch_fingerprint({"x": x[permutation[4:]]}, ids[permutation[4:]])[0].by_sample
    assert rows % (2**31 - 1) == prints[0].by_sample
