"""Bad input gets a clear error that says what is wrong and how to fix it, raised before training
time is spent where the problem can be seen that early; recoverable trouble (a non-finite step
the optimizer skips) is counted and the run goes on.

Cases already covered in test_diffin_callback.py (real fits): duplicate, negative and float ids,
a dict batch without ids, a per-sample loss of the wrong shape or whose mean is not the training
loss, a module without the mixin, unmodelled optimizers, precisions and clipping, and a
validation target without a loader. Their fix hints are checked here on the helpers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from conftest import quiet_trainer
from lightning_influence import DiffIn, IndexedDataset, TracIn
from lightning_influence.checks import check_ids, check_losses
from lightning_influence.callbacks.target_data import check_query_budget
from lightning_influence.callbacks.checkpoints import ParameterCheckpoints
from lightning_influence.estimators.base import Target
from lightning_influence.estimators.coreset import GraNd
from lightning_influence.estimators.outlier_gradient import OutlierGradient
from lightning_influence.data import FixedBatches
from lightning_influence.models import Classifier

BAD_INPUT = (ValueError, TypeError, KeyError)


def _model(cls=Classifier, **kwargs):
    torch.manual_seed(0)
    return cls(hidden=(8,), **kwargs).double()


def _fit(train, cb, model=None, val=None, **trainer_kwargs):
    """Fit and return the trainer (also when ``fit`` raises: see ``_refused``)."""
    model = model if model is not None else _model()
    trainer = quiet_trainer(callbacks=[cb], **trainer_kwargs)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    return trainer


def _refused(train, match, cb, model=None, val=None, **trainer_kwargs):
    """``fit`` fails with a message matching ``match``; returns the trainer to check how far it got."""
    model = model if model is not None else _model()
    trainer = quiet_trainer(callbacks=[cb], **trainer_kwargs)
    with pytest.raises(BAD_INPUT, match=match) as err:
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    trainer.error = str(err.value)
    return trainer


def _val(problem):
    return DiffIn(target="val", target_loader=problem.val)


class _Shifted(Dataset):
    """``(x, y, i + offset)``: ids that do not index the training set (e.g. 1-based ids)."""

    def __init__(self, x, y, offset):
        self.x, self.y, self.offset = x, y, offset

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i + self.offset


class _Stream(IterableDataset):
    """An iterable dataset (no ``__len__``): the number of training samples is unknown."""

    def __init__(self, x, y, offset):
        self.x, self.y, self.offset = x, y, offset

    def __iter__(self):
        for i in range(len(self.x)):
            yield self.x[i], self.y[i], i + self.offset


# ---------------------------------------------------------------------------- 1. batches without ids
def test_tensor_dataset_without_an_id_column_is_refused_before_the_first_step(small_digits):
    """A plain (x, y) TensorDataset: the default sample_ids would read the labels as ids."""
    plain = DataLoader(TensorDataset(small_digits.x, small_digits.y), batch_size=16)
    trainer = _refused(plain, r"TensorDataset.*not a column of sample ids.*IndexedDataset.*sample_ids\(batch\)", _val(small_digits))
    assert "torch.int64" in trainer.error and "labels" in trainer.error
    assert trainer.global_step == 0


def test_tensor_dataset_with_float_targets_last_is_refused(small_digits):
    """Regression-style (x, y_float) data: the last tensor is neither integer nor an id column."""

    class Regression(Classifier):
        def per_sample_loss(self, batch):
            return (self(batch[0])[:, 0] - batch[1]).square()

    data = DataLoader(TensorDataset(small_digits.x, small_digits.y.double()), batch_size=16)
    trainer = _refused(data, r"TensorDataset.*torch.float64.*IndexedDataset", _val(small_digits), model=_model(Regression))
    assert trainer.global_step == 0


def test_tensor_dataset_with_an_id_column_is_accepted(small_digits):
    ids = torch.arange(small_digits.n)
    data = DataLoader(TensorDataset(small_digits.x, small_digits.y, ids), batch_size=16, shuffle=True)
    cb = _val(small_digits)
    _fit(data, cb)
    assert cb.scores.ids.tolist() == ids.tolist() and torch.isfinite(cb.scores.values).all()


def test_dict_batches_without_the_id_key_name_the_keys_and_the_fix(small_digits):
    class Items(Dataset):
        def __len__(self):
            return small_digits.n

        def __getitem__(self, i):
            return {"x": small_digits.x[i], "y": small_digits.y[i], "id": i}

    class DictModel(Classifier):
        def per_sample_loss(self, batch):  # dict training batches, (x, y, id) validation batches
            if isinstance(batch, dict):
                return torch.nn.functional.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
            return super().per_sample_loss(batch)

    loader = DataLoader(Items(), batch_size=16)
    trainer = _refused(
        loader, r"no sample ids: dict batch keys are \['id', 'x', 'y'\], expected 'index'", _val(small_digits), model=_model(DictModel)
    )
    assert "IndexedDataset" in trainer.error and "sample_id_key" in trainer.error
    assert trainer.global_step == 0

    class KeyedModel(DictModel):
        sample_id_key = "id"  # the fix the message names

    cb = _val(small_digits)
    _fit(loader, cb, model=_model(KeyedModel))
    assert len(cb.scores) == small_digits.n


def test_id_errors_say_where_the_ids_came_from_and_how_to_fix_it():
    """The fit-level cases are in test_diffin_callback.py; here the fix each message names."""
    model = _model()
    labels = torch.tensor([3, 1, 3, 0])
    with pytest.raises(ValueError, match=r"duplicate sample ids in one batch: \[3\]") as err:
        check_ids(labels, None, model, (torch.zeros(4, 64), labels))
    assert "read the last element of this 2-element tuple batch" in str(err.value)
    assert "IndexedDataset" in str(err.value) and "override sample_ids(batch)" in str(err.value)
    with pytest.raises(ValueError, match=r"integer Tensor\[B\].*torch.float32.*IndexedDataset"):
        check_ids(torch.zeros(4), None, model, (torch.zeros(4, 64), torch.zeros(4)))
    with pytest.raises(ValueError, match=r"must be >= 0, got -2.*IndexedDataset.*sample_ids\(batch\)"):
        check_ids(torch.tensor([0, -2]), 10, model, None)

    class OwnIds(Classifier):
        def sample_ids(self, batch):
            return batch[2]

    with pytest.raises(ValueError, match=r"duplicate.*OwnIds.sample_ids\(batch\) must return"):
        check_ids(torch.tensor([1, 1]), None, _model(OwnIds), None)


def test_an_empty_training_batch_is_refused(small_digits):
    x, y, i = small_digits.train.batches[0]
    batches = FixedBatches([(x, y, i), (x[:0], y[:0], i[:0])])
    trainer = _refused(batches, r"training batch 1 has no samples.*collate_fn", _val(small_digits))
    assert trainer.global_step == 1


# ---------------------------------------------------------------------------- 2. ids outside [0, N)
@pytest.mark.parametrize("offset,first_bad", [(1, 256), (1000, 1000)])
def test_ids_outside_the_training_set_name_the_id_and_the_dataset_length(small_digits, offset, first_bad):
    loader = DataLoader(_Shifted(small_digits.x, small_digits.y, offset), batch_size=16)
    trainer = _refused(loader, rf"sample id {first_bad} is outside \[0, 256\).*of length 256", _val(small_digits))
    assert "IndexedDataset" in trainer.error and "sample_ids(batch)" in trainer.error
    # 1-based ids fail on the batch that holds id N, large offsets on the first one
    assert trainer.global_step == (15 if offset == 1 else 0)


def test_ids_of_an_iterable_loader_of_unknown_length_are_accepted_and_the_store_grows(small_digits):
    loader = DataLoader(_Stream(small_digits.x, small_digits.y, 1000), batch_size=16)
    cb = _val(small_digits)
    _fit(loader, cb)
    assert cb.scores.ids.tolist() == list(range(1000, 1000 + small_digits.n))
    assert torch.isfinite(cb.scores.values).all() and cb.scores.values.abs().sum() > 0


# ---------------------------------------------------------------------------- 3. per-sample losses
class _IntegerLoss(Classifier):
    def per_sample_loss(self, batch):
        return self(batch[0]).argmax(-1)  # predictions, not losses

    def training_step(self, batch, i):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])


class _DetachedLoss(Classifier):
    def per_sample_loss(self, batch):
        return super().per_sample_loss(batch).detach()

    def training_step(self, batch, i):
        return Classifier.per_sample_loss(self, batch).mean()


class _ElsewhereLoss(Classifier):
    """Losses on another device than the parameters (``meta`` stands in for a GPU on a CPU machine)."""

    def per_sample_loss(self, batch):
        return super().per_sample_loss(batch).to("meta")

    def training_step(self, batch, i):
        return Classifier.per_sample_loss(self, batch).mean()


@pytest.mark.parametrize(
    "cls,match",
    [
        (_IntegerLoss, r"floating-point losses, got dtype torch.int64.*reduction='none'"),
        (_DetachedLoss, r"do not depend on the trainable parameters.*detach"),
        (_ElsewhereLoss, r"losses on meta but the module's parameters are on cpu"),
    ],
)
def test_unusable_per_sample_losses_are_refused_before_the_first_step(small_digits, cls, match):
    trainer = _refused(small_digits.train, match, _val(small_digits), model=_model(cls))
    assert trainer.global_step == 0


def test_non_finite_losses_on_the_first_step_name_the_samples(small_digits):
    batches = list(small_digits.train.batches)
    x, y, ids = batches[0]
    x = x.clone()
    x[3, 5] = float("nan")
    batches[0] = (x, y, ids)
    trainer = _refused(FixedBatches(batches), rf"non-finite values for sample ids \[{int(ids[3])}\] on the first batch", _val(small_digits))
    assert "NaN/inf" in trainer.error
    assert trainer.global_step == 0


def test_loss_errors_say_how_to_fix_them():
    ids = torch.arange(4)
    with pytest.raises(ValueError, match=r"got \(\).*reduction='none'"):
        check_losses(torch.tensor(1.0), ids)
    with pytest.raises(ValueError, match=r"losses on meta but the module's parameters are on cpu.*\.cpu\(\)"):
        check_losses(torch.zeros(4, device="meta"), ids, device=torch.device("cpu"))
    check_losses(torch.zeros(4, requires_grad=True), ids, device=torch.device("cpu"), requires_grad=True)


# ---------------------------------------------------------------------------- 4. empty targets
def _empty(problem):
    x, y, i = problem.val.batches[0]
    return x[:0], y[:0], i[:0]


@pytest.mark.parametrize("target", ["val", "query"])
@pytest.mark.parametrize("kind", ["no batches", "empty DataLoader", "empty batches"])
def test_an_empty_target_loader_is_refused_before_the_first_step(small_digits, target, kind):
    loader = {
        "no batches": lambda: FixedBatches([]),
        "empty DataLoader": lambda: DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=8),
        "empty batches": lambda: FixedBatches([_empty(small_digits)] * 2),
    }[kind]()
    cb = DiffIn(target=target, target_loader=loader)
    batches = "0 batches" if kind != "empty batches" else "2 batches, all empty"
    trainer = _refused(small_digits.train, rf"target={target!r}.*target_loader yielded no samples \({batches}\)", cb)
    assert "drop_last" in trainer.error
    assert trainer.global_step == 0


def test_an_empty_validation_loader_is_refused_as_the_target(small_digits):
    empty = DataLoader(TensorDataset(torch.zeros(0, 64, dtype=torch.float64), torch.zeros(0, dtype=torch.long)), batch_size=8)
    trainer = _refused(small_digits.train, r"target='val'.*validation loader yielded no samples \(0 batches\)", DiffIn(target="val"), val=empty)
    assert trainer.global_step == 0


def test_empty_batches_inside_a_target_loader_are_skipped(small_digits):
    """They add nothing to the target; per_sample_loss never sees them (models may fail on them)."""

    class NoEmpty(Classifier):
        def per_sample_loss(self, batch):
            if batch[0].shape[0] == 0:
                raise RuntimeError("per_sample_loss called on an empty batch")
            return super().per_sample_loss(batch)

    padded = FixedBatches([_empty(small_digits), *small_digits.val.batches, _empty(small_digits)])
    with_empty, plain = DiffIn(target="val", target_loader=padded), DiffIn(target="val", target_loader=small_digits.val, name="plain")
    torch.manual_seed(0)
    quiet_trainer(callbacks=[with_empty, plain]).fit(_model(NoEmpty), train_dataloaders=small_digits.train)
    torch.testing.assert_close(with_empty.scores.values, plain.scores.values, rtol=0, atol=0)


def test_a_target_loader_that_is_empty_when_used_gets_the_same_message(small_digits):
    """A loader that only turns out empty at sweep time (here: a stream exhausted by then)."""

    class Once:
        def __init__(self, batches):
            self.batches, self.used = batches, 0

        def __iter__(self):
            self.used += 1
            return iter(self.batches if self.used == 1 else [])

    trainer = _refused(small_digits.train, r"target='val'.*target_loader yielded no samples \(0 batches\)", DiffIn(target="val", target_loader=Once(small_digits.val.batches)))
    assert trainer.global_step == len(small_digits.train)  # found at the end-of-fit sweep


# ---------------------------------------------------------------------------- 5. query memory budget
def test_a_query_target_over_the_memory_budget_is_refused_before_the_first_step(small_digits, monkeypatch):
    monkeypatch.setenv("LIGHTNING_INFLUENCE_MEMORY_BUDGET", "100000")
    query = FixedBatches(small_digits.val.batches[:1])  # 100 query samples
    train = DataLoader(TensorDataset(small_digits.x, small_digits.y, torch.arange(small_digits.n)), batch_size=16)
    trainer = _refused(train, r"target='query' with Q=100 query samples needs about", DiffIn(target="query", target_loader=query))
    # P = 64*8 + 8 + 8*10 + 10 = 610 float64 parameters, N = 256 training samples
    for part in ("P x Q = 610 x 100", "N x Q = 256 x 100", "memory budget of 97.7 KiB", "LIGHTNING_INFLUENCE_MEMORY_BUDGET", "target_samples", "params="):
        assert part in trainer.error
    assert trainer.global_step == 0
    monkeypatch.setenv("LIGHTNING_INFLUENCE_MEMORY_BUDGET", str(10**7))
    cb = DiffIn(target="query", target_loader=FixedBatches([tuple(t[:4] for t in small_digits.val.batches[0])]))
    _fit(small_digits.train, cb)
    assert cb.scores.values.shape == (small_digits.n, 4)


def test_query_budget_estimate_and_its_default(monkeypatch):
    monkeypatch.delenv("LIGHTNING_INFLUENCE_MEMORY_BUDGET", raising=False)
    # default 8 GiB: 10^6 parameters x 500 queries in float32 (2 GB) + float64 gradient (4 GB) + scores: too much
    with pytest.raises(ValueError, match=r"exceeds the memory budget of 8.00 GiB \(LIGHTNING_INFLUENCE_MEMORY_BUDGET"):
        check_query_budget(10**6, 500, 10**6, None)
    check_query_budget(10**6, 100, 10**6, None)  # 0.4 + 0.8 + 0.8 GB
    need = 10 * 3 * 4 + 10 * 3 * 8 + 7 * 3 * 8
    check_query_budget(10, 3, 7, need)
    with pytest.raises(ValueError, match="needs about"):
        check_query_budget(10, 3, 7, need - 1)
    monkeypatch.setenv("LIGHTNING_INFLUENCE_MEMORY_BUDGET", "a lot")
    with pytest.raises(ValueError, match=r"LIGHTNING_INFLUENCE_MEMORY_BUDGET must be a number of bytes, got 'a lot'"):
        check_query_budget(10, 3, 7, None)


# ---------------------------------------------------------------------------- 6. non-finite steps
class _SkipsNonFinite(Classifier):
    """Skips an optimizer step whose gradients are not finite, as a gradient scaler does: its own
    on_before_optimizer_step runs after DiffIn's, and SGD leaves parameters without .grad alone."""

    def on_before_optimizer_step(self, optimizer):
        if not all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None):
            for p in self.parameters():
                p.grad = None


def _poisoned(batches, steps, dtype=None):
    """NaN in one input of each of the given training steps' batches (corrupt data)."""
    out = []
    for k, (x, y, ids) in enumerate(batches.batches):
        x = x.clone() if dtype is None else x.to(dtype)
        if k in steps:
            x[2, 7] = float("nan")
        out.append((x, y, ids))
    return FixedBatches(out)


def _fit_counting_warnings(train, cb, model, **trainer_kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(train, cb, model=model, **trainer_kwargs)
    return trainer, [w for w in caught if "non-finite gradients" in str(w.message)]


@pytest.mark.parametrize("steps", [(5,), (5, 20, 33)])
def test_steps_with_non_finite_gradients_are_skipped_counted_and_warned_once(small_digits, steps):
    cb = _val(small_digits)
    model = _model(_SkipsNonFinite)
    trainer, warned = _fit_counting_warnings(_poisoned(small_digits.train, steps), cb, model)
    meta = cb.scores.metadata
    assert meta["skipped_steps"] == len(steps)
    assert meta["steps_seen"] == meta["steps_scored"] == len(small_digits.train) - len(steps)
    assert trainer.global_step == len(small_digits.train)  # the run went on
    assert len(warned) == 1 and "optimizer step 5" in str(warned[0].message)
    assert len(cb.scores) == small_digits.n and torch.isfinite(cb.scores.values).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_step_skipped_by_the_16_mixed_gradient_scaler(small_digits):
    from lightning.pytorch.plugins import MixedPrecision

    val = FixedBatches([(x.float(), y, i) for x, y, i in small_digits.val.batches])
    cb = DiffIn(target="val", target_loader=val)
    torch.manual_seed(0)
    model = Classifier(hidden=(8,))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # low enough that only the poisoned step overflows
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer, warned = _fit_counting_warnings(_poisoned(small_digits.train, (9,), torch.float32), cb, model, plugins=[plugin])
    assert cb.scores.metadata["skipped_steps"] == 1 and len(warned) == 1
    assert trainer.global_step == len(small_digits.train)
    assert len(cb.scores) == small_digits.n and torch.isfinite(cb.scores.values).all()


def test_the_first_step_checks_leave_the_training_run_unchanged(small_digits):
    """The first-step check calls per_sample_loss in train mode: batch-norm running statistics are
    restored, so a run with DiffIn trains exactly as one without it."""
    from torch import nn

    class WithBatchNorm(Classifier):
        def __init__(self):
            super().__init__(hidden=(8,))
            self.net = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 10))

    runs = []
    for callbacks in ([], [_val(small_digits)]):
        torch.manual_seed(0)
        model = WithBatchNorm().double()
        quiet_trainer(callbacks=callbacks).fit(model, train_dataloaders=small_digits.train)
        runs.append(model.state_dict())
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


@pytest.mark.parametrize("name", ["TracIn", "ParameterCheckpoints", "ForgettingEvents"])
def test_per_process_recorders_refuse_distributed_strategies(name):
    """Callbacks whose records are per process refuse DDP at setup instead of scoring one shard."""
    from lightning.pytorch.strategies import DDPStrategy

    import lightning_influence.callbacks as callbacks

    cls = getattr(callbacks, name)
    cb = {"TracIn": lambda: cls(target="val", target_loader=[]), "ParameterCheckpoints": lambda: cls(every=1)}.get(name, cls)()

    class Trainer:
        strategy = object.__new__(DDPStrategy)
        optimizers: list = []

    hook = cb.setup if name in ("TracIn", "ForgettingEvents") else cb.on_fit_start
    args = (Trainer(), Classifier(), "fit") if hook.__name__ == "setup" else (Trainer(), Classifier())
    with pytest.raises(ValueError, match=f"{name} does not support strategy DDPStrategy"):
        hook(*args)


class _FreezesBody(Classifier):
    """Freezes (or, with ``thaw``, unfreezes) its first layer at the second epoch."""

    def __init__(self, thaw: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.thaw = thaw
        for p in self.net[0].parameters():
            p.requires_grad_(not thaw)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            for p in self.net[0].parameters():
                p.requires_grad_(self.thaw)


@pytest.mark.parametrize("thaw", [False, True])
def test_parameters_frozen_or_unfrozen_during_fit_are_refused(small_digits, thaw):
    model = _FreezesBody(thaw=thaw, hidden=(8,), lr=0.1).double()
    match = "is trained now" if thaw else "'net.0.weight' has been frozen"
    with pytest.raises(ValueError, match=match + ".*set of trained parameters changed.*keep them frozen"):
        quiet_trainer(callbacks=[DiffIn(target="val", target_loader=small_digits.val)], max_epochs=2).fit(
            model, train_dataloaders=small_digits.train
        )


class _SparseEmbedding(Classifier):
    """Pixels quantised to tokens, embedded with sparse gradients."""

    def __init__(self) -> None:
        super().__init__(hidden=())
        self.emb = torch.nn.Embedding(17, 2, sparse=True)
        self.net = torch.nn.Linear(128, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(self.emb((x * 16).round().long().clamp(0, 16)).flatten(1))


@pytest.mark.parametrize("recorder", ["none", "first", "alone"])
def test_sparse_gradients_are_refused_before_the_first_step(small_digits, recorder):
    """By DiffIn and by the ground truth's StepRecorder, in any order."""
    from lightning_influence.evaluation import StepRecorder

    model = _SparseEmbedding().double()
    before = [p.detach().clone() for p in model.parameters()]
    diffin = [] if recorder == "alone" else [DiffIn(target="val", target_loader=small_digits.val)]
    callbacks = diffin if recorder == "none" else [StepRecorder(), *diffin]
    with pytest.raises(ValueError, match=r"'emb.weight' has a sparse gradient.*sparse=False"):
        quiet_trainer(callbacks=callbacks).fit(model, train_dataloaders=small_digits.train)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------------ losses and parameters that change outside DiffIn's model
class _EpochTemperature(Classifier):
    """Logits divided by ``1 + current_epoch``, a Python value DiffIn cannot record."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x) / (1.0 + self.current_epoch)


class _LateRegulariser(Classifier):
    """An L2 term in ``training_step`` from step 5 on: the loss training optimises changes."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = self.per_sample_loss(batch).mean()
        if self.global_step >= 5:
            loss = loss + 1e-6 * sum(p.square().sum() for p in self.parameters())
        return loss


@pytest.mark.parametrize("cls", [_EpochTemperature, _LateRegulariser], ids=["epoch-temperature", "late-regulariser"])
@pytest.mark.parametrize("options", [{}, {"finite_difference": "central"}, {"mode": "online", "window": 8}], ids=str)
def test_a_loss_that_changes_during_fit_is_refused_not_scored(small_digits, cls, options):
    from lightning_influence.estimators.diffin_sweep import LossChangedError

    cb = DiffIn(target="val", target_loader=small_digits.val, **options)
    if cls is _LateRegulariser:  # training_step's loss stops being the mean of its per-sample losses: refused at once
        refused, match = ValueError, r"training_step returned loss .* at optimizer step 5 but the per-sample losses .*regularisers into per_sample_loss"
    else:
        refused, match = LossChangedError, "differs from the gradient training computed there.*register_buffer"
    with pytest.raises(refused, match=match):
        quiet_trainer(callbacks=[cb], max_epochs=2).fit(_model(cls), train_dataloaders=small_digits.train)


def test_a_fixed_loss_passes_the_recorded_gradient_checks(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val, mode="online", window=8)
    quiet_trainer(callbacks=[cb], max_epochs=2).fit(_model(), train_dataloaders=small_digits.train)
    meta = cb.scores.metadata
    assert meta["recorded_gradient_checks"] >= 4 and meta["max_recorded_gradient_error"] < 1e-12


class _HardWiredDropout(Classifier):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net[2](torch.nn.functional.dropout(self.net[1](self.net[0](x)), 0.3, training=True))


def test_a_forward_that_stays_random_in_eval_mode_is_named_as_such(small_digits):
    _refused(small_digits.train, "needs a deterministic .*per_sample_loss.*training=self.training", _val(small_digits), _model(_HardWiredDropout))


class _MaxNormEmbedding(Classifier):
    """Pixels quantised to tokens, looked up in an embedding that renormalises its rows in place."""

    def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(in_features=64 * 4, **kwargs)
        self.embed = torch.nn.Embedding(17, 4, max_norm=1.0)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(self.embed(x.clamp(0, 16).long()).flatten(1))


def test_parameters_written_in_place_by_the_forward_are_refused(small_digits):
    trainer = _refused(small_digits.train, r"wrote the trained parameters \['embed.weight'\] in place.*max_norm", _val(small_digits), _model(_MaxNormEmbedding))
    assert trainer.global_step < 8  # on one of the first, verified steps (the first batch's checks renormalise too)


def test_a_step_on_a_single_sample_is_warned_about_and_counted(small_digits):
    batches = list(small_digits.train.batches[:6])
    x, y, i = batches[-1]
    batches[-1] = (x[:1], y[:1], i[:1])
    cb = _val(small_digits)
    with pytest.warns(UserWarning, match="trained on a single sample.*drop_last=True"):
        _fit(FixedBatches(batches), cb)
    assert cb.scores.metadata["singleton_steps"] == 1



@pytest.mark.parametrize(
    "build, name",
    [
        (lambda v: GraNd(chunk_size=v), "chunk_size"),
        (lambda v: OutlierGradient(chunk_size=v), "chunk_size"),
        (lambda v: ParameterCheckpoints(every=v), "every"),
        (lambda v: Target("train", sample_count=v), "sample_count"),
    ],
)
@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_counts_given_to_estimators_and_recorders_are_refused_with_one_message(build, name, value):
    """Every count argument (steps, samples, chunk sizes) is checked alike: a positive int, the
    value and its type named, never a raw TypeError from a comparison (a value of the wrong type
    may be refused first by the estimators' option check, which names the same)."""
    with pytest.raises((ValueError, TypeError), match=rf"{name} must be (a positive int|an integer).*got {value!r} \({type(value).__name__}\)"):
        build(value)


# ---------------------------------------------------------------------------- 7. checks one step late
def _with_batch(batches, step, change):
    out = list(batches.batches)
    x, y, ids = out[step]
    out[step] = change(x, y, ids.clone())
    return FixedBatches(out)


def _duplicate(x, y, ids):
    ids[1] = ids[0]
    return x, y, ids


def _out_of_range(x, y, ids):
    ids[3] = 10_000
    return x, y, ids


class _LateBadId(Dataset):
    """Sample ``index`` gets ``bad_id`` from its ``on_access``-th access on (a later epoch)."""

    def __init__(self, x, y, index, bad_id, on_access):
        self.x, self.y, self.index, self.bad_id, self.on_access = x, y, index, bad_id, on_access
        self.accesses = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.index:
            self.accesses += 1
            if self.accesses >= self.on_access:
                return self.x[i], self.y[i], self.bad_id
        return self.x[i], self.y[i], i


@pytest.mark.parametrize("step", [30, 47])
@pytest.mark.parametrize("duplicate,match", [(True, "duplicate sample ids in one batch"), (False, r"sample id 10000 is outside \[0, 256\)")])
def test_bad_ids_after_the_first_steps_are_refused_one_step_later(small_digits, step, duplicate, match):
    """Past the first, verified steps the ids reach the host by a non-blocking copy and are checked
    at the next step (a GPU is not made to wait each step): the same error, one step later; a bad
    last step is refused before its scores exist."""
    epoch, position = divmod(step, 16)
    bad_id = 16 * position if duplicate else 10_000  # the batch's first id, or one outside the dataset
    data = _LateBadId(small_digits.x, small_digits.y, 16 * position + 3, bad_id, epoch + 1)
    cb = _val(small_digits)
    trainer = _refused(DataLoader(data, batch_size=16), match, cb, max_epochs=3)
    assert "IndexedDataset" in trainer.error
    assert trainer.global_step == step + 1
    assert cb.scores is None


def test_non_finite_steps_checked_one_step_late_give_the_scores_of_checking_at_once(small_digits, monkeypatch):
    """A skipped step found one step late (here on checkpoint steps and between them, and the last
    step) leaves exactly the scores of the immediate check: nothing of it reaches the trajectory."""
    poisoned = _poisoned(small_digits.train, (24, 29, 32, 47))
    results = []
    for lagged in (True, False):
        if not lagged:
            monkeypatch.setattr(DiffIn, "_lagged_reads", property(lambda self: False))
        for mode in ("replay", "online"):
            cb = DiffIn(target="val", target_loader=small_digits.val, mode=mode, window=8, score_every=8)
            _, warned = _fit_counting_warnings(poisoned, cb, _model(_SkipsNonFinite))
            assert len(warned) == 1 and "optimizer step 24" in str(warned[0].message)
            assert cb.scores.metadata["skipped_steps"] == 4
            results.append(cb.scores.values)
    for lagged, eager in zip(results[:2], results[2:]):
        torch.testing.assert_close(lagged, eager, rtol=0, atol=0)


# ---------------------------------------------------------------------------- 8. training loops DiffIn cannot model
def test_an_overridden_optimizer_zero_grad_is_refused_at_setup(small_digits):
    """Hand-made accumulation (zeroing every other step) would be scored as another run."""

    class ZeroEveryOther(Classifier):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            if batch_idx % 2 == 0:
                optimizer.zero_grad()

    trainer = _refused(small_digits.train, r"overrides optimizer_zero_grad.*accumulate_grad_batches", _val(small_digits), model=_model(ZeroEveryOther))
    assert trainer.global_step == 0


@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_callbacks_are_refused_at_setup(small_digits, averaging):
    """SWA and EMA replace the trained parameters with an average: the fit ends with a model that is
    not the end of the scored trajectory (measured: scores 2x too large, in an order that depends on
    the callbacks' order)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    extra = StochasticWeightAveraging(swa_lrs=0.05) if averaging == "swa" else EMAWeightAveraging()
    trainer = quiet_trainer(callbacks=[_val(small_digits), extra])
    with pytest.raises(ValueError, match=rf"DiffIn does not model {type(extra).__name__}: it replaces the trained parameters"):
        trainer.fit(_model(), train_dataloaders=small_digits.train)
    assert trainer.global_step == 0


def test_a_custom_optimizer_step_that_skips_steps_is_refused_at_the_next_batch(small_digits):
    """Lightning's documented pattern for skipping steps (closure without optimizer.step) would merge
    the skipped batch into the next step; refused at once, naming the fix."""

    class SkipsOdd(Classifier):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            if batch_idx % 2 == 1:
                optimizer_closure()
                return
            optimizer.step(closure=optimizer_closure)

    _refused(small_digits.train, r"training batch 2 starts while 1 earlier batch\(es\) still await.*return None from training_step", _val(small_digits), model=_model(SkipsOdd))


def test_adam_on_a_parameter_that_batch_norm_cancels_is_refused_on_the_first_step(small_digits):
    """The bias of a layer feeding a batch norm has no training gradient (the batch mean removes it)
    but one in evaluation mode, where the products run: with Adam the scores blew up (1e98)."""
    from torch import nn

    class BatchNormed(Classifier):
        def __init__(self, bias, hidden, optimizer="adam", lr=3e-3, optimizer_options=None):
            super().__init__(hidden=hidden, lr=lr, optimizer=optimizer, optimizer_options=optimizer_options)
            self.net = nn.Sequential(nn.Linear(64, 8, bias=bias), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 10))

    for optimizer in ("adam", "rmsprop", "adagrad"):
        trainer = _refused(small_digits.train, r"\['net.0.bias'\] get a zero gradient in training.*bias=False", _val(small_digits),
                           model=_model(BatchNormed, bias=True, optimizer=optimizer))
        assert trainer.global_step == 0
    cb = _val(small_digits)
    _fit(small_digits.train, cb, model=_model(BatchNormed, bias=False))
    growth = cb.scores.metadata["max_adjoint_growth"]
    assert growth < 10 and torch.isfinite(cb.scores.values).all()
    # Adagrad whose accumulator starts above 0 keeps the update's derivative below lr / sqrt(start): not refused
    cb = _val(small_digits)
    _fit(small_digits.train, cb, model=_model(BatchNormed, bias=True, optimizer="adagrad", lr=0.05, optimizer_options={"initial_accumulator_value": 1.0}))
    assert torch.isfinite(cb.scores.values).all()


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_an_unwritable_save_path_is_refused_at_setup(small_digits, tmp_path, where):
    (tmp_path / "a_file").write_text("x")
    path = {"folder": tmp_path, "under_a_file": tmp_path / "a_file" / "scores.pt"}[where]
    for callback in (DiffIn(target="val", target_loader=small_digits.val, save_path=path), _tracin(save_path=path)):
        trainer = _refused(small_digits.train, "save_path .* (is a folder|which is a file)", callback)
        assert trainer.global_step == 0
    assert (tmp_path / "a_file").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _tracin(**kwargs):
    from lightning_influence.callbacks import TracIn

    return TracIn(target="train", **kwargs)


def test_sparse_ids_of_a_stream_without_length_are_refused_before_they_size_the_store(small_digits, monkeypatch):
    """Ids index the score store: a stream of row numbers in the trillions would have asked for
    terabytes; refused with the budget, and accepted under a budget that covers them."""
    loader = DataLoader(_Stream(small_digits.x, small_digits.y, 2**40), batch_size=16)
    trainer = _refused(loader, r"sample id 1099511627791 would size the score store.*dense positions", _val(small_digits))
    assert trainer.global_step == 0
    monkeypatch.setenv("LIGHTNING_INFLUENCE_MEMORY_BUDGET", str(2**20))
    _refused(DataLoader(_Stream(small_digits.x, small_digits.y, 200_000), batch_size=16), "would size the score store", _val(small_digits))
    cb = _val(small_digits)
    _fit(DataLoader(_Stream(small_digits.x, small_digits.y, 1000), batch_size=16), cb)
    assert len(cb.scores) == small_digits.n


@pytest.mark.parametrize("step", [5, 20])  # within the first, verified steps (parameter-write checks) and after
def test_a_run_diverged_by_a_nan_input_is_refused_at_the_end_naming_the_first_bad_step(small_digits, step):
    """Without a gradient scaler, SGD applies the NaN step: the parameters stay NaN, every later
    step is skipped, and the end of fit names the cause (not the forward pass writing parameters,
    not the propagation)."""
    cb = _val(small_digits)
    model = _model()
    with pytest.raises(FloatingPointError, match=rf"final parameters are not finite.*optimizer step {step}, sample ids"):
        _fit_counting_warnings(_poisoned(small_digits.train, (step,)), cb, model)
    assert cb.skipped_steps == len(small_digits.train) - step and cb.scores is None


# ---------------------------------------------------------------------------- found by using it on other models
def test_a_target_loader_the_loss_cannot_read_is_refused_before_the_first_step(small_digits):
    """``(x, y)`` validation batches where the loss unpacks ``(x, y, ids)``: refused at the first
    batch naming the target loader, not after the whole fit with a bare unpacking error."""
    pairs = FixedBatches([(x, y) for x, y, _ in small_digits.val.batches])
    for mode in ("replay", "online"):
        trainer = _refused(small_digits.train, r"per_sample_loss fails on the first batch of the target_loader \(ValueError: not enough values to unpack",
                           DiffIn(target="val", target_loader=pairs, mode=mode), model=_model(_Unpacks3))
        assert trainer.global_step == 0


class _Unpacks3(Classifier):
    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y, reduction="none")


class _MeanOfSums(Classifier):
    """Per-sample losses summed over the classes, training loss their mean over classes too: 10x apart."""

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return torch.nn.functional.mse_loss(self(x), torch.nn.functional.one_hot(y, 10).to(x.dtype), reduction="none").sum(1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return torch.nn.functional.mse_loss(self(x), torch.nn.functional.one_hot(y, 10).to(x.dtype))


@pytest.mark.parametrize("owner", ["DiffIn", "TracIn"])
def test_a_reduction_mismatch_is_refused_at_the_first_step_however_small_the_losses(small_digits, owner):
    """The first-step check is relative to the losses' size: losses of ~1e-6 that differ 10-fold
    are refused (an absolute tolerance let them through, to fail after fit with another diagnosis).
    TracIn checks it too (it scored such runs, off by the loss's factor, as calibrated)."""
    model = _model(_MeanOfSums, lr=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-4)
    tiny = FixedBatches([(x * 1e-3, y, i) for x, y, i in small_digits.train.batches])
    cb = _val(small_digits) if owner == "DiffIn" else TracIn(target="val", target_loader=small_digits.val)
    trainer = _refused(tiny, r"per_sample_loss\(batch\).mean\(\) = .* but training_step returned loss .* on the first step", cb, model=model)
    assert trainer.global_step <= 1


class _DropoutClassifier(Classifier):
    """Dropout in training: training_step's losses are the mean of per_sample_loss under the same mask."""

    def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return super().forward(self.drop(x))


def test_tracin_accepts_a_first_loss_under_training_steps_own_dropout_mask(small_digits):
    cb = TracIn(target="val", target_loader=small_digits.val)
    torch.manual_seed(0)
    quiet_trainer(callbacks=[cb]).fit(_model(_DropoutClassifier), train_dataloaders=small_digits.train)
    assert cb.scores.metadata["steps_seen"] == 48


class _SmoothedInTraining(Classifier):
    """Label smoothing in training mode only: a loss that reads ``self.training``."""

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y, reduction="none", label_smoothing=0.3 if self.training else 0.0)


def test_a_loss_that_reads_self_training_is_refused_at_the_first_step(small_digits):
    trainer = _refused(small_digits.train, r"differs between training and evaluation mode on the first step .*reads self.training",
                       _val(small_digits), model=_model(_SmoothedInTraining))
    assert trainer.global_step == 0


class _BatchStream(IterableDataset):
    def __init__(self, problem):
        self.batches = problem.train.batches

    def __iter__(self):
        for x, y, i in self.batches:
            yield from zip(x, y, i)


@pytest.mark.parametrize("mode", ["replay", "online"])
def test_a_train_target_over_a_stream_is_refused_before_the_first_step(small_digits, mode):
    """An IterableDataset may never end (the target read would hang) and reading it may move what
    training sees next: refused, pointing to a finite target loader."""
    stream = DataLoader(_BatchStream(small_digits), batch_size=16)
    trainer = _refused(stream, r"DiffIn\(target='train'\) reads the training set again .* a stream \(_BatchStream, an IterableDataset\).*target='val', target_loader=",
                       DiffIn(target="train", mode=mode), max_steps=5)
    assert trainer.global_step == 0


def test_a_failed_fit_leaves_no_spilled_files(small_digits, tmp_path):
    class FailsAtStep5(Classifier):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.global_step == 5:
                raise RuntimeError("failed at step 5")
            return super().training_step(batch, batch_idx)

    cb = DiffIn(target="val", target_loader=small_digits.val, storage="disk", spill_dir=tmp_path)
    with pytest.raises(RuntimeError, match="failed at step 5"):
        _fit(small_digits.train, cb, model=_model(FailsAtStep5))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_spill_dir_that_cannot_be_a_folder_is_refused_naming_it(small_digits, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for spill_dir in (blocker, blocker / "below"):
        cb = DiffIn(target="val", target_loader=small_digits.val, storage="disk", spill_dir=spill_dir)
        trainer = _refused(small_digits.train, rf"storage='disk' spills .* inside spill_dir='{spill_dir}', which cannot be created", cb)
        assert trainer.global_step == 0
    assert blocker.read_text() == "not a folder"


class _BatchPositions(Classifier):
    """Ids that are positions within the batch (0..b-1), not in the dataset: every batch reuses them."""

    def sample_ids(self, batch):
        return torch.arange(len(batch[-1]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_ids_that_come_back_within_an_epoch_of_a_once_per_epoch_sampler_are_warned_about(shuffle):
    """Ids 0..b-1 in every batch pass every per-batch check (in range, unique in the batch) and used
    to merge 40 samples into 8 scores without a word. A sampler that yields each sample once an
    epoch cannot repeat one, so a repeat within an epoch is warned about, once; real dataset
    positions, a later epoch and a weighted sampler's repeats are not."""
    g = torch.Generator().manual_seed(0)
    data = IndexedDataset(TensorDataset(torch.randn(40, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)))
    loader = DataLoader(data, batch_size=8, shuffle=shuffle)
    with pytest.warns(UserWarning, match=r"32 sample id\(s\) came back within epoch 0 \(8 distinct ids\) although the training sampler \((Sequential|Random)Sampler\)") as record:
        quiet_trainer(max_epochs=3, callbacks=[DiffIn(target="train"), TracIn(target="train")]).fit(_BatchPositions(hidden=(8,)).double(), train_dataloaders=loader)
    warned = [str(w.message).split(":")[0] for w in record if "came back within epoch" in str(w.message)]
    assert sorted(warned) == ["DiffIn", "TracIn"], "each callback warns once"
    weighted = DataLoader(data, batch_size=8, sampler=torch.utils.data.WeightedRandomSampler(torch.ones(40), 40, generator=g))
    for train in (loader, weighted):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_epochs=2, callbacks=[DiffIn(target="train")]).fit(Classifier(hidden=(8,)).double(), train_dataloaders=train)
        assert not any("came back within epoch" in str(w.message) for w in caught)


class _DoubledAfterALeftOutBatch(Classifier):
    """Leaves the first batch out (returns None), then trains on twice the mean loss."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return None if batch_idx == 0 else 2 * self.per_sample_loss(batch).mean()


@pytest.mark.parametrize("owner", ["TracIn", "StepRecorder"])
def test_the_first_loss_check_moves_past_batches_that_training_step_leaves_out(small_digits, owner):
    """QA: a first batch returning None used the check up, and TracIn scored the doubled loss as
    calibrated (every score half the true one)."""
    from lightning_influence.evaluation import StepRecorder

    cb = TracIn(target="val", target_loader=small_digits.val) if owner == "TracIn" else StepRecorder()
    _refused(small_digits.train, r"per_sample_loss\(batch\).mean\(\) = .* but training_step returned loss .* on the first step", cb, model=_model(_DoubledAfterALeftOutBatch))


class _OverBatchPlusOne(Classifier):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        losses = self.per_sample_loss(batch)
        return losses.sum() / (losses.numel() + 1)  # 6% below the mean for batches of 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_wrong_loss_on_a_half_precision_module_is_still_refused(small_digits, dtype):
    model = _OverBatchPlusOne(hidden=(16,), lr=0.1).to(dtype)
    train = FixedBatches([(x.to(dtype), y, i) for x, y, i in small_digits.train.batches])
    cb = DiffIn(target="val", target_loader=FixedBatches([(x.to(dtype), y, i) for x, y, i in small_digits.val.batches]))
    _refused(train, r"training_step returned loss", cb, model=model)


def test_adaptive_optimizers_on_half_precision_parameters_are_refused_with_the_reason(small_digits):
    model = Classifier(hidden=(16,), optimizer="adam", lr=1e-3).to(torch.bfloat16)
    train = FixedBatches([(x.to(torch.bfloat16), y, i) for x, y, i in small_digits.train.batches])
    cb = DiffIn(target="val", target_loader=FixedBatches([(x.to(torch.bfloat16), y, i) for x, y, i in small_digits.val.batches]))
    _refused(train, r"parameters are torch.bfloat16 and the optimizer is Adam.*precision='bf16-mixed'", cb, model=model)
