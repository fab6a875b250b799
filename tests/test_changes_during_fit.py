"""DiffIn with things that change during fit, or differ between its steps: hyperparameters set after
its hook, training losses that stop matching per_sample_loss, losses that differ between training and
evaluation mode, random dropout outside nn.Dropout, lazy modules, refits and growing datasets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import quiet_trainer
from lightning_influence import DiffIn
from lightning_influence.models import Classifier


def _model(kind=None, **options):
    torch.manual_seed(0)  # the same initial weights in every run
    return (kind or Classifier)(**{"hidden": (16,), "lr": 0.1, **options}).double()


def _fit(problem, *callbacks, model, **trainer_kwargs):
    torch.manual_seed(0)
    quiet_trainer(callbacks=list(callbacks), **trainer_kwargs).fit(model, train_dataloaders=problem.train)
    return model


# ---------------------------------------------------------------- 1: hyperparameters set after DiffIn's hook
class _LrInModuleHook(Classifier):
    """Halves the learning rate from step 20 on in its own on_before_optimizer_step, which Lightning
    calls after every callback's."""

    def on_before_optimizer_step(self, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 if self.trainer.global_step >= 20 else 0.1


class _LrAtBatchStart(Classifier):
    """The same schedule, set where the README says to (before the step's hooks)."""

    def on_train_batch_start(self, batch, batch_idx):
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = 0.05 if self.trainer.global_step >= 20 else 0.1


class _LrPoke(Callback):
    """A callback listed after DiffIn that sets the learning rate in on_before_optimizer_step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for group in optimizer.param_groups:
            group["lr"] = 0.25 if trainer.global_step in (20, 21) else 0.1


class _LrPokeAtBatchStart(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 0.25 if trainer.global_step in (20, 21) else 0.1


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_learning_rate_set_in_the_modules_on_before_optimizer_step_is_the_one_recorded(small_digits, storage, tmp_path):
    """The module's on_before_optimizer_step runs after DiffIn's: the learning rate it sets is read
    where optimizer.step starts. Scores equal those of the same schedule set in on_train_batch_start
    (before, the steps rebuilt between checkpoints used the old rate: scores 1e14 too large)."""
    options = dict(target="val", target_loader=small_digits.val, log_summary=False, storage=storage, spill_dir=tmp_path)
    late, early = DiffIn(**options), DiffIn(**options)
    _fit(small_digits, late, model=_model(_LrInModuleHook))
    _fit(small_digits, early, model=_model(_LrAtBatchStart))
    torch.testing.assert_close(late.scores.values, early.scores.values, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("mode", ["replay", "online"])
def test_learning_rate_set_by_a_later_callback_in_on_before_optimizer_step_is_the_one_recorded(small_digits, mode):
    options = dict(target="val", target_loader=small_digits.val, log_summary=False, mode=mode, window=8, score_every=8)
    late, early = DiffIn(**options), DiffIn(**options)
    _fit(small_digits, late, _LrPoke(), model=_model())
    _fit(small_digits, early, _LrPokeAtBatchStart(), model=_model())
    torch.testing.assert_close(late.scores.values, early.scores.values, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- 2: the verification's message
class _GradientsScaledInModuleHook(Classifier):
    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            p.grad.mul_(0.5)


def test_a_changed_update_names_gradients_learning_rates_and_where_to_change_them(small_digits):
    with pytest.raises(RuntimeError, match="disagrees with the real update at step 0") as raised:
        _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), model=_model(_GradientsScaledInModuleHook))
    message = str(raised.value)
    for words in ("learning rates", "hyperparameters", "scheduler", "on_train_batch_start", "after optimizer.step", "p.grad"):
        assert words in message, words


# ---------------------------------------------------------------- 3: training_step's loss at every step
class _SumOverNominalBatch(Classifier):
    """Divides the summed losses by the nominal batch size: the mean on full batches, not on a smaller one."""

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).sum() / 16


class _WeightedOneBatch(Classifier):
    """Weights the samples of one later batch unequally in training_step only."""

    def training_step(self, batch, batch_idx):
        losses = self.per_sample_loss(batch)
        if self.trainer.global_step != 20:
            return losses.mean()
        weights = torch.linspace(0.5, 1.5, len(losses), dtype=losses.dtype)
        return (weights * losses).sum() / weights.sum()


def _with_a_short_batch(problem, position):
    from lightning_influence.data import FixedBatches

    batches = list(problem.train.batches)
    batches[position] = tuple(t[:8] for t in batches[position])
    return FixedBatches(batches)


@pytest.mark.parametrize("position", [5, 30])  # one of the first, immediately checked, steps; one checked a step later
def test_a_training_loss_over_the_nominal_batch_size_is_refused_at_its_short_batch(small_digits, position):
    from dataclasses import replace

    problem = replace(small_digits, train=_with_a_short_batch(small_digits, position))
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    with pytest.raises(ValueError, match=rf"returned loss .* at optimizer step {position} but the per-sample losses") as raised:
        _fit(problem, cb, model=_model(_SumOverNominalBatch))
    assert "sum() / BATCH_SIZE" in str(raised.value) and "per_sample_loss(batch).mean()" in str(raised.value)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_applied_in_training_step_at_one_later_step_are_refused(small_digits, accumulate):
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    with pytest.raises(ValueError, match="at optimizer step 20.* but the per-sample losses"):
        _fit(small_digits, cb, model=_model(_WeightedOneBatch), accumulate_grad_batches=accumulate)


def test_the_per_step_loss_check_accepts_an_equal_loss_with_accumulation(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    _fit(small_digits, cb, model=_model(), accumulate_grad_batches=3)
    assert cb.scores is not None and cb.steps_seen == 16


class _ClassWeightedMean(Classifier):
    """training_step returns torch's class-weighted mean (divided by the batch's sum of weights) without
    calling per_sample_loss, whose mean is the plain mean of the weighted losses: equal on a batch of one
    weight only."""

    def per_sample_loss(self, batch):
        x, y, _ = batch
        return F.cross_entropy(self(x), y, weight=self.class_weights, reduction="none")

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y, weight=self.class_weights)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_a_training_loss_that_differs_at_unchecked_steps_is_refused_by_the_sweeps_spread_checks(small_digits, scheme):
    """Batches sorted by class (no shuffling), and weights equal for the classes of the first batch, where the
    first step's check finds the losses equal, and of the sweep's newest and oldest stored steps; the batches
    between hold the other classes, where the two losses differ. The sweep's recorded-gradient checks spread over the run find it (before, with
    central differences, it was scored silently: 2x too large scores on a QA probe)."""
    from lightning_influence.data import FixedBatches
    from lightning_influence.estimators.diffin_sweep import LossChangedError

    x, y, ids = (torch.cat(t) for t in zip(*small_digits.train.batches[:16]))
    order = torch.argsort(y, stable=True)
    x, y, ids = x[order], y[order], ids[order]
    batches = [(x[i : i + 16], y[i : i + 16], ids[i : i + 16]) for i in range(0, 256, 16)]
    model = _model(_ClassWeightedMean)
    # weight 1 for the classes of the steps that the first step's check and the newest and oldest stored steps see
    seen = torch.cat([batches[k][1] for k in (0, 8, 15)]).unique()
    model.register_buffer("class_weights", torch.where(torch.isin(torch.arange(10), seen), 1.0, 3.0).double())
    cb = DiffIn(target="val", target_loader=small_digits.val, finite_difference=scheme, checkpoint_every=8, log_summary=False)
    with pytest.raises(LossChangedError, match="F.cross_entropy\\(weight=\\.\\.\\.\\) divides by the batch's sum of weights"):
        quiet_trainer(callbacks=[cb]).fit(model, train_dataloaders=FixedBatches(batches))


class _SmoothedFromStep20(Classifier):
    """training_step adds label smoothing from optimizer step 20 on, without calling per_sample_loss."""

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.2 if self.global_step >= 20 else 0.0)


class _ScaledEveryFourthStep(Classifier):
    """training_step scales the loss by 1.5 at every fourth optimizer step, without calling per_sample_loss."""

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y) * (1.5 if self.global_step % 4 == 1 else 1.0)


@pytest.mark.parametrize(
    ("kind", "options"),
    [(_SmoothedFromStep20, {"checkpoint_every": 1, "finite_difference": "central"}), (_ScaledEveryFourthStep, {})],
    ids=["every-step-stored-central", "every-fourth-step"],
)
def test_a_training_loss_changed_where_a_fixed_grid_of_checks_would_not_look_is_refused(small_digits, kind, options):
    """Central differences with every step stored need no recorded gradient, so training keeps one every 8th
    step for the checks (before: none, and a loss changed from step 20 on was scored silently); a loss that
    differs at every fourth step is found by checks at random positions within 8 strata (a fixed stride of 4
    had missed it)."""
    from lightning_influence.estimators.diffin_sweep import LossChangedError

    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False, **options)
    with pytest.raises(LossChangedError, match="differs from the gradient training computed"):
        _fit(small_digits, cb, model=_model(kind))


def test_the_sweeps_spread_checks_are_at_most_eight_distinct_inner_positions():
    from lightning_influence.estimators.diffin_sweep import RECORDED_CHECKS_PER_SWEEP, DiffInSweep

    sweep = DiffInSweep.__new__(DiffInSweep)
    sweep.verify_recorded, sweep.target_gradients = True, 3
    for size in (3, 5, 10, 17, 18, 35, 36, 100, 768):
        positions = sweep._spread_checks(size)
        assert positions == sorted(set(positions), reverse=True)
        assert len(positions) == min(RECORDED_CHECKS_PER_SWEEP, size - 2) and all(1 <= p <= size - 2 for p in positions)


# ---------------------------------------------------------------- 4: a loss that differs in training at one step
class _TrainingOnlyLossAtOneStep(Classifier):
    """per_sample_loss reads self.training at one optimizer step (between parameter checkpoints)."""

    def per_sample_loss(self, batch):
        x, y, _ = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return losses * (1.5 if self.training and self.trainer.global_step == 21 else 1.0)


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_a_loss_that_differs_in_training_at_one_step_is_refused_where_the_propagation_blows_up(small_digits, checkpoint_every):
    """Forward differences against the recorded gradient turn the step's (g_train - g_eval) into a
    product of size 1/eps: the propagated gradient blows up, and the recorded gradients of the steps
    where it did are recomputed and compared (before, a warning that blamed kinks or the learning rate)."""
    from lightning_influence.estimators.diffin_sweep import LossChangedError

    cb = DiffIn(target="val", target_loader=small_digits.val, finite_difference="forward", checkpoint_every=checkpoint_every)
    with pytest.raises(LossChangedError, match="at optimizer step 21, the gradient of per_sample_loss recomputed"):
        with pytest.warns(RuntimeWarning, match=r"grew .*recorded steps that disagree with their recomputation.*self.training"):
            _fit(small_digits, cb, model=_model(_TrainingOnlyLossAtOneStep))


# ---------------------------------------------------------------- 5: dropout that is not an nn.Dropout module
class _Dropped(Classifier):
    """An MLP with dropout on its hidden layer: an nn.Dropout module, or F.dropout(training=self.training)."""

    def __init__(self, functional: bool, **options):
        super().__init__(**options)
        self.functional = functional
        self.drop = nn.Dropout(0.2) if not functional else None

    def per_sample_loss(self, batch):
        x, y, _ = batch
        layers = list(self.net)
        h = layers[1](layers[0](x))  # the first linear layer and its activation
        h = F.dropout(h, 0.2, training=self.training) if self.functional else self.drop(h)
        for layer in layers[2:]:
            h = layer(h)
        return F.cross_entropy(h, y, reduction="none")


def test_functional_dropout_is_scored_like_an_nn_dropout_module(small_digits):
    """F.dropout(h, p, training=self.training) draws the same masks as nn.Dropout(p): the same run, scored
    alike (before, refused as 'the loss reads self.training')."""
    functional, module = (DiffIn(target="val", target_loader=small_digits.val, log_summary=False) for _ in range(2))
    _fit(small_digits, functional, model=_model(_Dropped, functional=True))
    _fit(small_digits, module, model=_model(_Dropped, functional=False))
    assert functional.scores.metadata["finite_difference"] == module.scores.metadata["finite_difference"] == "central"
    torch.testing.assert_close(functional.scores.values, module.scores.values, rtol=0, atol=0)


class _LayerDrop(Classifier):
    """The hidden layer's output is dropped as a whole with probability 1/2, one coin per batch, in
    training mode only (LayerDrop): a redraw repeats the first batch's coin half of the time."""

    def per_sample_loss(self, batch):
        x, y, _ = batch
        layers = list(self.net)
        h = layers[1](layers[0](x))
        if self.training and bool(torch.rand(()) < 0.5):
            h = torch.zeros_like(h)
        for layer in layers[2:]:
            h = layer(h)
        return F.cross_entropy(h, y, reduction="none")


def test_randomness_drawn_once_per_batch_is_told_from_a_deterministic_difference(small_digits):
    """One redraw under another random state repeated the first batch's coin and the loss was refused
    as 'reads self.training' (seeds 0, 2, 5, 6 here); several redraws find it random and score it
    like dropout. Where the first batch's coin kept the layer, training and evaluation agree there;
    the steps that dropped it are then caught by the recorded-gradient check, whose message names
    such randomness."""
    from lightning_influence.estimators.diffin_sweep import LossChangedError

    for seed in (0, 2, 5, 6):
        callback = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
        torch.manual_seed(seed)
        quiet_trainer(callbacks=[callback], max_steps=4).fit(_LayerDrop(hidden=(16,), lr=0.1).double(), train_dataloaders=small_digits.train)
        assert callback.scores.metadata["finite_difference"] == "central"
    torch.manual_seed(1)
    with pytest.raises(LossChangedError, match="randomness in training mode that the first batch did not show"):
        quiet_trainer(callbacks=[DiffIn(target="val", target_loader=small_digits.val, log_summary=False)], max_steps=4).fit(
            _LayerDrop(hidden=(16,), lr=0.1).double(), train_dataloaders=small_digits.train
        )


class _LabelSmoothedInTraining(Classifier):
    def per_sample_loss(self, batch):
        x, y, _ = batch
        return F.cross_entropy(self(x), y, reduction="none", label_smoothing=0.1 if self.training else 0.0)


def test_a_deterministic_training_only_loss_is_still_refused(small_digits):
    with pytest.raises(ValueError, match="differs between training and evaluation mode on the first step"):
        _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), model=_model(_LabelSmoothedInTraining))


def test_functional_dropout_with_recomputed_gradients_is_refused(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val, recompute="gradients")
    with pytest.raises(ValueError, match="random in training mode .* recompute='gradients'"):
        _fit(small_digits, cb, model=_model(_Dropped, functional=True))


def test_dropout_inside_attention_and_recurrent_layers_counts_as_a_mode_dependent_layer():
    from lightning_influence.kernels import has_mode_dependent_layers

    assert has_mode_dependent_layers(nn.MultiheadAttention(8, 2, dropout=0.1))
    assert not has_mode_dependent_layers(nn.MultiheadAttention(8, 2))
    assert has_mode_dependent_layers(nn.GRU(8, 8, num_layers=2, dropout=0.2))
    assert has_mode_dependent_layers(nn.LSTM(8, 8, num_layers=2, dropout=0.2))
    assert not has_mode_dependent_layers(nn.LSTM(8, 8, num_layers=2))


# ---------------------------------------------------------------- 6: lazy modules not initialised before fit
class _Lazy(Classifier):
    def __init__(self, initialise: bool, **options):
        super().__init__(**options)
        self.net[0] = nn.LazyLinear(16)  # in place of the first linear layer
        self.initialise = initialise

    def setup(self, stage):
        if self.initialise:  # the fix the message gives: one forward on an example batch before fit
            self(torch.zeros(1, 64, dtype=torch.float64))


def test_an_uninitialised_lazy_module_is_refused_with_the_fix(small_digits):
    from lightning_influence.kernels import ParameterSpace

    with pytest.raises(ValueError, match=r"parameter 'net.0.weight' \(and 1 more\) is still uninitialised .*forward pass on an example batch"):
        _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), model=_model(_Lazy, initialise=False))
    with pytest.raises(ValueError, match="'w' is still uninitialised"):
        ParameterSpace.from_parameters([("w", nn.parameter.UninitializedParameter())])
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    _fit(small_digits, cb, model=_model(_Lazy, initialise=True))
    assert torch.isfinite(cb.scores.values).all()


# ---------------------------------------------------------------- 7: a failed second fit leaves no scores behind
class _FailsAtStep5(Classifier):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 5:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_failed_second_fit_leaves_no_scores_of_the_first(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    _fit(small_digits, cb, model=_model())
    assert cb.scores is not None
    with pytest.raises(RuntimeError, match="boom"):
        _fit(small_digits, cb, model=_model(_FailsAtStep5))
    assert cb.scores is None
    # A refusal at setup, and the launching process of a ddp_spawn fit (where only on_exception runs), alike.
    _fit(small_digits, cb, model=_model())
    with pytest.raises(ValueError, match="manual optimization"):
        model = _model()
        model.automatic_optimization = False
        _fit(small_digits, cb, model=model)
    assert cb.scores is None
    launcher_side = DiffIn(target="val", target_loader=small_digits.val)
    launcher_side.scores = cb.scores if cb.scores is not None else object()
    launcher_side.on_exception(None, _model(), RuntimeError("a worker failed"))
    assert launcher_side.scores is None


# ---------------------------------------------------------------- 8: a training set that changes between epochs
class _Growing(Classifier):
    """Reloads its training loader every epoch: 96 samples in epoch 0, then all 192 (ids = positions);
    ``offset`` shifts the ids of epoch 1 past its dataset's end (invalid)."""

    def __init__(self, problem, offset=0, **options):
        super().__init__(**options)
        self.problem, self.offset = problem, offset

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        from lightning_influence import IndexedDataset

        n = 96 if self.trainer.current_epoch == 0 else 192
        data = IndexedDataset(TensorDataset(self.problem.x[:n], self.problem.y[:n]))
        if self.trainer.current_epoch > 0 and self.offset:
            data = _Shifted(data, self.offset)
        return DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(self.trainer.current_epoch))


class _Shifted(torch.utils.data.Dataset):
    def __init__(self, data, offset):
        self.data, self.offset = data, offset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y, index = self.data[i]
        return x, y, index + self.offset


def test_a_training_set_that_grows_when_the_loader_is_reloaded_is_scored_whole(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    torch.manual_seed(0)
    quiet_trainer(callbacks=[cb], max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(_model(_Growing, problem=small_digits))
    assert len(cb.scores) == 192 and cb.steps_seen == 6 + 12 + 12


def test_an_id_past_the_reloaded_datasets_end_quotes_its_current_length(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val, log_summary=False)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"sample id \d+ is outside \[0, 192\)"):
        quiet_trainer(callbacks=[cb], max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(_model(_Growing, problem=small_digits, offset=150))
