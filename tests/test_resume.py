"""Resuming a fit from a Lightning checkpoint gives the scores of the uninterrupted run: the
callback's state (counters, score sums, the recorded steps not yet scored and the optimizer's
own state through Lightning) travels in the checkpoint, as tensors and primitives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import digits_problem, quiet_trainer
from lightning_influence import DiffIn, TracIn
from lightning_influence.data import FixedBatches
from lightning_influence.models import Classifier

EPOCHS = 3


@pytest.fixture(scope="module")
def problem():
    return digits_problem(n=256, batch_size=32, epochs=1, val_size=200)  # 8 batches an epoch


def _callbacks(problem, tmp_path):
    replay = DiffIn(target="val", target_loader=problem.val, storage="disk", spill_dir=tmp_path / "spill")
    online = DiffIn(target="val", mode="online", window=4, score_every=2, target_loader=problem.val)
    return [replay, online]


class _AnnealedFromStep5(Classifier):
    """Logits divided by a temperature buffer that training anneals from step 5 on."""

    def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x) / self.temperature

    def on_train_batch_start(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        # a function of the step (a checkpoint is saved before the module's on_train_batch_end runs)
        if self.trainer.global_step >= 5:
            self.temperature.fill_(0.97 ** (self.trainer.global_step - 4))


def _fit(problem, tmp_path, loader, ckpt_path=None, checkpoint=None, annealed=False, max_epochs=EPOCHS, save_after=None):
    torch.manual_seed(0)
    make = _AnnealedFromStep5 if annealed else Classifier
    model = make(hidden=(16,), lr=3e-3, optimizer="adamw", optimizer_options={"weight_decay": 0.01}).double()
    callbacks = _callbacks(problem, tmp_path)
    extra = [checkpoint] if checkpoint is not None else []
    trainer = quiet_trainer(callbacks=[*callbacks, *extra], max_epochs=max_epochs, enable_checkpointing=checkpoint is not None)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    if save_after is not None:
        trainer.save_checkpoint(save_after)
    return callbacks


def test_resumed_fit_keeps_recording_what_training_changes_outside_the_optimizer(problem, tmp_path):
    """A temperature annealed from step 5 on: the checkpoint at step 11 carries its value from before
    (for the restored steps that trained with it), and the resumed fit records it from its first step."""
    import warnings

    warnings.filterwarnings("ignore", message=".*recorded with every step")
    straight = _fit(problem, tmp_path / "a", FixedBatches(problem.train.batches), annealed=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=11)
    _fit(problem, tmp_path / "b", FixedBatches(problem.train.batches), checkpoint=checkpoint, annealed=True)
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    state = torch.load(first, map_location="cpu", weights_only=True)["callbacks"]
    for s in (s for key, s in state.items() if key.startswith("DiffIn")):
        assert s["changed_buffers"] == ["temperature"] and float(s["varying_defaults"]["temperature"]) == 1.0
    resumed = _fit(problem, tmp_path / "c", FixedBatches(problem.train.batches), ckpt_path=first, annealed=True)
    for a, b in zip(straight, resumed):
        assert a.scores.metadata["changed_buffers"] == b.scores.metadata["changed_buffers"] == ["temperature"]
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("where", ["epoch", "mid-epoch"])
def test_resumed_fit_gives_the_uninterrupted_scores(problem, tmp_path, where):
    """Adam moments, the online windows in flight and replay's spilled trajectory all resume."""
    straight = _fit(problem, tmp_path / "a", FixedBatches(problem.train.batches))
    every = dict(every_n_epochs=1) if where == "epoch" else dict(every_n_train_steps=11)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **every)
    _fit(problem, tmp_path / "b", FixedBatches(problem.train.batches), checkpoint=checkpoint)
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    assert ("step=8" in first.name) if where == "epoch" else ("step=11" in first.name)
    state = torch.load(first, map_location="cpu", weights_only=True)["callbacks"]  # no arbitrary unpickling
    diffin_state = [s for key, s in state.items() if key.startswith("DiffIn")]
    assert len(diffin_state) == 2 and all(s["records"] for s in diffin_state)
    assert all(s["kinks"] == [] and s["changed_buffers"] == [] for s in diffin_state)  # decisions travel too
    resumed = _fit(problem, tmp_path / "c", FixedBatches(problem.train.batches), ckpt_path=first)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b.scores.ids, a.scores.ids)
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=1e-12)
        for key in ("steps_seen", "steps_scored", "truncated_sweeps", "skipped_steps", "empty_steps", "kinks", "finite_difference"):
            assert b.scores.metadata[key] == a.scores.metadata[key], key


@pytest.mark.parametrize("window", [4, 5])
def test_a_fit_extended_from_its_last_checkpoint_gives_the_uninterrupted_scores(problem, tmp_path, window):
    """The last checkpoint of a fit is written before its end-of-fit sweep; online, that fit's last
    step left its sweep to the flush, which the extended fit runs before its first step."""
    def run(folder, **kwargs):  # type: ignore[no-untyped-def]
        callbacks = _fit(problem, tmp_path / folder, FixedBatches(problem.train.batches), **kwargs)
        return [*callbacks, *_fit_online(problem, window, **kwargs)]

    straight = run("a")
    run("b", max_epochs=EPOCHS - 1, checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    resumed = run("c", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(straight, resumed):
        assert a.steps_scored == b.steps_scored == EPOCHS * 8
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=1e-12)


def _fit_online(problem, window, ckpt_path=None, checkpoint=None, max_epochs=EPOCHS):  # type: ignore[no-untyped-def]
    """One online DiffIn alone (sweeping every step) in its own fit: the checkpoint it reads must be its own."""
    torch.manual_seed(0)
    online = DiffIn(target="val", mode="online", window=window, target_loader=problem.val)
    model = Classifier(hidden=(16,), lr=3e-3, optimizer="adamw", optimizer_options={"weight_decay": 0.01}).double()
    extra = [] if checkpoint is None else [ModelCheckpoint(dirpath=Path(checkpoint.dirpath) / "online", save_last=True)]
    path = None if ckpt_path is None else Path(ckpt_path).parent / "online" / "last.ckpt"
    quiet_trainer(callbacks=[online, *extra], max_epochs=max_epochs, enable_checkpointing=bool(extra)).fit(
        model, train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=path
    )
    return [online]


def test_a_checkpoint_saved_after_the_fit_ended_is_not_extended_silently(problem, tmp_path):
    """After the end-of-fit sweep the scores are final and the recorded steps are gone: continuing
    that run is refused before a step is taken; resuming it with nothing left to train gives back
    the finished scores."""
    path = tmp_path / "after.ckpt"
    first = _fit(problem, tmp_path / "a", FixedBatches(problem.train.batches), max_epochs=EPOCHS - 1, save_after=path)
    with pytest.raises(RuntimeError, match="after DiffIn had finished scoring its fit"):
        _fit(problem, tmp_path / "b", FixedBatches(problem.train.batches), ckpt_path=path)
    again = _fit(problem, tmp_path / "c", FixedBatches(problem.train.batches), ckpt_path=path, max_epochs=EPOCHS - 1)
    for a, b in zip(first, again):
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=0)


def test_resuming_the_last_checkpoint_with_nothing_left_to_train_finishes_the_scores(problem, tmp_path):
    """Lightning skips the training loop (and on_train_end); the restored steps are swept at fit end."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _fit(problem, tmp_path / "a", FixedBatches(problem.train.batches), checkpoint=checkpoint)
    again = _fit(problem, tmp_path / "b", FixedBatches(problem.train.batches), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(first, again):
        assert b.steps_scored == a.steps_scored
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=1e-12)


def test_a_mid_epoch_resume_with_torchdata_stateful_loader_gives_the_uninterrupted_scores(problem, tmp_path):
    """torchdata's ``StatefulDataLoader`` over a shuffled ``IndexedDataset``: Lightning restores its
    position (and its sampler's random state) from the checkpoint, and the resumed fit scores exactly
    what the uninterrupted one does. The uninterrupted run is the one that wrote the checkpoints:
    with torchdata 0.11, taking the loader's state changes how later epochs are shuffled. (Shuffled
    with the global random state, which the loader saves; with a ``generator=`` of the loader's own,
    the epochs after the resume are shuffled otherwise than the uninterrupted run's: DiffIn then
    scores the batches the resumed run trains on.)"""
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lightning_influence import IndexedDataset

    dataset = IndexedDataset(TensorDataset(problem.x, problem.y))

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(dataset, batch_size=32, shuffle=True)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=11)
    straight = _fit(problem, tmp_path / "b", loader(), checkpoint=checkpoint)
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    assert "step=11" in first.name  # the middle of the second epoch (8 batches an epoch)
    resumed = _fit(problem, tmp_path / "c", loader(), ckpt_path=first)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b.scores.ids, a.scores.ids)
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=1e-12)
        assert b.scores.metadata["steps_seen"] == a.scores.metadata["steps_seen"] == 3 * 8


class _Replaying:
    """An iterable Lightning cannot rewind: a resume mid-epoch restarts it from its first batch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_mid_epoch_resume_with_a_loader_that_restarts_is_refused(problem, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=11)
    _fit(problem, tmp_path / "b", _Replaying(problem.train.batches), checkpoint=checkpoint)
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    with pytest.raises(RuntimeError, match=r"resumed in the middle of an epoch \(3 batches already done\).*_Replaying"):
        _fit(problem, tmp_path / "c", _Replaying(problem.train.batches), ckpt_path=first)


def test_state_of_another_format_is_refused(problem):
    cb = DiffIn(target="val", target_loader=problem.val)
    with pytest.raises(ValueError, match="format None; this version reads format 2"):
        cb.load_state_dict({"steps_seen": 3})


def test_several_instances_keep_separate_state(problem, tmp_path):
    a, b = _callbacks(problem, tmp_path)
    assert a.state_key != b.state_key


def test_a_last_checkpoint_written_only_at_fit_end_is_refused_with_the_setup_that_works(problem, tmp_path):
    """ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only in its on_train_end, after
    the end-of-fit sweep: the refusal names that case and the checkpoints that do resume."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _fit(problem, tmp_path / "a", FixedBatches(problem.train.batches), checkpoint=checkpoint, max_epochs=EPOCHS - 1)
    with pytest.raises(RuntimeError, match=r"after DiffIn had finished.*save_top_k=0"):
        _fit(problem, tmp_path / "b", FixedBatches(problem.train.batches), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


@pytest.mark.parametrize("saved_with", ["no_diffin", "other_options"])
def test_resuming_from_a_checkpoint_without_this_callbacks_state_warns_that_earlier_steps_are_not_scored(problem, tmp_path, saved_with):
    """A checkpoint saved without DiffIn, or with options that make another state key: DiffIn can
    only score the steps from the resume on, and says so."""
    loader = problem.train  # 8 batches: one epoch, then one more after the resume
    path = tmp_path / "first.ckpt"
    torch.manual_seed(0)
    first = [] if saved_with == "no_diffin" else [DiffIn(target="val", target_loader=problem.val, hessian_every=2)]
    trainer = quiet_trainer(callbacks=first, max_epochs=1)
    trainer.fit(Classifier(hidden=(16,), lr=0.1).double(), train_dataloaders=loader)
    trainer.save_checkpoint(path)
    cb = DiffIn(target="val", target_loader=problem.val)
    with pytest.warns(UserWarning, match=r"DiffIn starts at optimizer step 8 of a resumed fit whose checkpoint holds no state"):
        quiet_trainer(callbacks=[cb], max_epochs=2).fit(Classifier(hidden=(16,), lr=0.1).double(), train_dataloaders=loader, ckpt_path=path)
    assert cb.scores.metadata["steps_seen"] == 8


def test_online_train_target_leaves_the_fixed_batches_position_and_resumes_exactly(problem, tmp_path):
    """Online sweeps of target="train" read the training set: not through the trainer's own
    FixedBatches, whose position Lightning checkpoints (it had moved to the end of the pass, and a
    mid-epoch resume re-trained batches already seen)."""

    def fit(folder, ckpt_path=None, checkpoint=None):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        cb = DiffIn(target="train", mode="online", window=2, score_every=2)
        extra = [checkpoint] if checkpoint is not None else []
        model = Classifier(hidden=(16,), lr=0.1).double()
        quiet_trainer(callbacks=[cb, *extra], max_epochs=EPOCHS, enable_checkpointing=bool(extra)).fit(
            model, train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=ckpt_path
        )
        return cb, model

    straight, straight_model = fit("a")
    fit("b", checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=11))
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    saved = torch.load(first, map_location="cpu", weights_only=True)
    assert "step=11" in first.name and saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 3
    resumed, resumed_model = fit("c", ckpt_path=first)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(resumed.scores.values, straight.scores.values, rtol=0, atol=1e-12)


def test_options_that_change_the_state_change_the_key_and_the_defaults_keep_theirs(problem):
    base = DiffIn(target="val", target_loader=problem.val)
    assert base.state_key == "DiffIn{'target': 'val', 'mode': 'replay', 'window': 256, 'hessian_every': 1, 'params': None}"
    keys = {
        DiffIn(target="val", target_loader=problem.val, target_samples=10).state_key,
        DiffIn(target="val", target_loader=problem.val, target_samples=10, seed=1).state_key,
        DiffIn(target="val", target_loader=problem.val, mode="online", window=4).state_key,
        DiffIn(target="val", target_loader=problem.val, mode="online", window=4, score_every=4).state_key,
        base.state_key,
    }
    assert len(keys) == 5
    tracin = TracIn(target="val", target_loader=problem.val)
    assert tracin.state_key == "TracIn{'target': 'val', 'target_every': 1}"
    assert len({tracin.state_key, TracIn(target="val", target_loader=problem.val, target_samples=10).state_key,
                TracIn(target="val", target_loader=problem.val, target_samples=10, seed=1).state_key}) == 3


@pytest.mark.parametrize("callback", [DiffIn, TracIn])
def test_a_checkpoint_saved_in_the_middle_of_an_accumulation_lets_training_go_on_and_is_refused_for_resume(problem, tmp_path, callback):
    """Validation every 3 batches with accumulation over 2: the default checkpoint after validation
    falls between the micro-batches of one step. The fit goes on; resuming from that checkpoint is
    refused, naming the setups that work."""
    torch.manual_seed(0)
    cb = callback(target="val", target_loader=problem.val)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    quiet_trainer(callbacks=[cb, checkpoint], max_epochs=1, accumulate_grad_batches=2, val_check_interval=3, enable_checkpointing=True).fit(
        Classifier(hidden=(16,), lr=0.1).double(), train_dataloaders=problem.train, val_dataloaders=problem.val
    )
    assert cb.scores is not None and cb.scores.metadata["steps_seen"] == 4
    saved = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))
    assert saved
    with pytest.raises(ValueError, match=rf"saved in the middle of a gradient accumulation .*{callback.__name__} cannot resume .* multiple of accumulate_grad_batches"):
        quiet_trainer(callbacks=[callback(target="val", target_loader=problem.val)], max_epochs=2, accumulate_grad_batches=2).fit(
            Classifier(hidden=(16,), lr=0.1).double(), train_dataloaders=problem.train, ckpt_path=saved[0]
        )


def test_a_second_fit_of_the_same_trainer_is_not_called_a_resume(problem):
    import warnings

    cb = DiffIn(target="val", target_loader=problem.val)
    trainer = quiet_trainer(callbacks=[cb], max_epochs=1)
    model = Classifier(hidden=(16,), lr=0.1).double()
    trainer.fit(model, train_dataloaders=problem.train)
    trainer.fit_loop.max_epochs = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=problem.train)
    assert not [w for w in caught if "resumed fit" in str(w.message)]


def test_a_resume_under_64_true_precision_rebuilds_from_the_resumed_parameters(problem, tmp_path):
    """A float32 module trained with precision="64-true": Lightning loads the float64 checkpoint into
    the module before the precision plugin converts it, so the resumed parameters are the saved ones
    rounded to float32 (~1e-8). The first resumed step stores its parameters, and the steps after it
    are rebuilt from them: the scores are the uninterrupted run's up to that rounding (they were 9%
    off when those steps were rebuilt from the checkpoint before the resume)."""
    def fit(folder, ckpt_path=None, checkpoint=None):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        callbacks = [DiffIn(target="val", target_loader=problem.val),
                     DiffIn(target="val", mode="online", window=8, score_every=8, target_loader=problem.val)]
        callbacks[1]._generate_state_key = lambda **kw: "online"
        model = Classifier(hidden=(16,), lr=0.1)  # float32 parameters until the precision plugin converts them
        extra = [] if checkpoint is None else [checkpoint]
        quiet_trainer(callbacks=[*callbacks, *extra], max_epochs=EPOCHS, precision="64-true", enable_checkpointing=bool(extra),
                      default_root_dir=tmp_path / folder).fit(model, train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=ckpt_path)
        return callbacks

    straight = fit("a")
    fit("b", checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=11))
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    assert "step=11" in first.name  # off the checkpoint_every=8 grid
    resumed = fit("c", ckpt_path=first)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b.scores.ids, a.scores.ids)
        assert float((b.scores.values - a.scores.values).abs().max()) <= 1e-6 * float(a.scores.values.abs().max())


def test_checkpoints_written_before_fit_do_not_break_the_fit_or_its_scores(problem, tmp_path):
    """Lightning's tuner saves (and restores) a checkpoint before the callback's fit has set it up;
    the fit after it scores as a fit alone does."""
    from lightning.pytorch.tuner import Tuner

    assert DiffIn(target="val", target_loader=problem.val).state_dict()["steps_seen"] == 0

    def fit(tune: bool):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        cb = DiffIn(target="val", target_loader=problem.val)
        model = Classifier(hidden=(16,), lr=0.1).double()
        trainer = quiet_trainer(callbacks=[cb], max_epochs=2, default_root_dir=tmp_path)
        if tune:
            Tuner(trainer).lr_find(model, train_dataloaders=FixedBatches(problem.train.batches), num_training=6, update_attr=False)
        trainer.fit(model, train_dataloaders=FixedBatches(problem.train.batches))
        return cb

    alone, tuned = fit(False), fit(True)
    assert tuned.scores.metadata["steps_seen"] == alone.scores.metadata["steps_seen"] == 16
    torch.testing.assert_close(tuned.scores.values, alone.scores.values, rtol=0, atol=1e-12)


class _RestartsItsFixedBatches(Classifier):
    """configure_optimizers reads trainer.estimated_stepping_batches (a per-step schedule): Lightning
    then does not restore the FixedBatches position on a mid-epoch resume, and the epoch restarts."""

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (total + 1)), "interval": "step"}}


def _fit_restarting(problem, tmp_path, ckpt_path=None, checkpoint=None, **options):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    callback = DiffIn(target="val", target_loader=problem.val, **options)
    extra = [checkpoint] if checkpoint is not None else []
    quiet_trainer(callbacks=[callback, *extra], max_epochs=2, enable_checkpointing=bool(extra)).fit(
        _RestartsItsFixedBatches(hidden=(8,)).double(), train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=ckpt_path
    )
    return callback


def test_a_mid_epoch_resume_whose_loader_restarts_its_epoch_is_refused_though_the_loader_has_state(problem, tmp_path):
    """The loader has state_dict/load_state_dict but Lightning does not restore it here: the first
    resumed batch repeats a batch the epoch already trained on, and the resume is refused (it was
    scored silently, 0.3 of the largest score off)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=11)
    _fit_restarting(problem, tmp_path, checkpoint=checkpoint)
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]  # step 11: 3 batches into the second epoch
    with pytest.raises(RuntimeError, match=r"resumed in the middle of an epoch \(3 of its batches trained before the checkpoint\), but the training loader restarted the epoch.*estimated_stepping_batches"):
        _fit_restarting(problem, tmp_path, ckpt_path=first)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"options": {"second_moment": "frozen"}}, r"options second_moment: 'linearized' then, 'frozen' now"),
        ({"target": "other"}, r"target data: '.*' then, '.*' now"),
        ({"precision": "32-true"}, r"precision: '64-true' then, '32-true' now"),
        ({"frozen": "net.0.bias"}, r"parameter 'net.0.bias' trained then, not now"),
        ({"momentum": 0.9}, r"optimizer state: \[\] then, \['momentum_buffer'\] now"),
    ],
    ids=["second_moment", "target", "precision", "frozen", "momentum"],
)
def test_a_resume_with_another_setup_is_refused_before_its_first_step(problem, tmp_path, change, expected):
    """Online sums and recorded steps belong to the checkpoint's setup: another target (the online
    scores mixed two targets, 0.7 off either run), DiffIn options, precision, trained parameters or
    optimizer state are refused at the first resumed batch, naming what differs (they were mixed
    silently, or failed after the rest of training in the end-of-fit sweep)."""
    other = digits_problem(n=64, batch_size=32, epochs=1, val_size=60, seed=1) if "target" in change else None

    def fit(ckpt_path=None, checkpoint=None, changed=False):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        options = {"second_moment": "frozen"} if changed and "options" in change else {}
        target = other.val if changed and other is not None else problem.val
        callback = DiffIn(target="val", mode="online", window=4, score_every=2, target_loader=target, **options)
        momentum = change.get("momentum", 0.0) if changed else 0.0
        model = Classifier(hidden=(8,), lr=0.1, optimizer_options={"momentum": momentum} if momentum else {}).double()
        if changed and "frozen" in change:
            model.get_parameter(change["frozen"]).requires_grad_(False)
        precision = change.get("precision", "64-true") if changed else "64-true"
        extra = [checkpoint] if checkpoint is not None else []
        trainer = quiet_trainer(callbacks=[callback, *extra], max_epochs=2, enable_checkpointing=bool(extra), precision=precision)
        trainer.fit(model, train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=ckpt_path)

    fit(checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=8))
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]  # an epoch boundary
    fit(ckpt_path=first)  # the same setup resumes
    with pytest.raises(ValueError, match=r"resumes from a checkpoint of a run set up differently \(.*" + expected):
        fit(ckpt_path=first, changed=True)


def test_a_failed_fit_leaves_no_earlier_scores_on_the_module(problem):
    class FailsAtStep3(Classifier):
        fail = False

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.fail and batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = FailsAtStep3(hidden=(8,)).double()
    callback = DiffIn(target="val", target_loader=problem.val)
    quiet_trainer(callbacks=[callback]).fit(model, train_dataloaders=FixedBatches(problem.train.batches))
    assert model.influence is not None
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(callbacks=[callback]).fit(model, train_dataloaders=FixedBatches(problem.train.batches))
    assert callback.scores is None and model.influence is None


def _fit_two_epochs(problem, callback, ckpt_path=None, checkpoint=None):  # type: ignore[no-untyped-def]
    """Two epochs of a small MLP on the fixed batches with ``callback`` (and a ``checkpoint`` callback)."""
    torch.manual_seed(0)
    extra = [checkpoint] if checkpoint is not None else []
    quiet_trainer(callbacks=[callback, *extra], max_epochs=2, enable_checkpointing=bool(extra)).fit(
        Classifier(hidden=(8,), lr=0.1).double(), train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=ckpt_path
    )
    return callback


def test_tracin_resumed_with_another_target_is_refused(problem, tmp_path):
    """TracIn's score sums are taken against its target at every step: a resume with another target
    mixed both targets in one set of scores."""
    other = digits_problem(n=64, batch_size=32, epochs=1, val_size=60, seed=1)

    def fit(target, ckpt_path=None, checkpoint=None):  # type: ignore[no-untyped-def]
        return _fit_two_epochs(problem, TracIn(target="val", target_loader=target), ckpt_path, checkpoint)

    whole = fit(problem.val)
    fit(problem.val, checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=8))
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    resumed = fit(problem.val, ckpt_path=first)
    torch.testing.assert_close(resumed.scores.values, whole.scores.values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"TracIn: this fit resumes from a checkpoint of a run set up differently \(target data: "):
        fit(other.val, ckpt_path=first)


def test_checkpoints_leave_a_one_pass_target_for_the_end_of_fit_and_replay_resumes_with_another_target(problem, tmp_path):
    """Replay scores every step against the target at the end of fit: writing a checkpoint must not
    read a one-pass target (it used the iterator up, and the end-of-fit sweep found no target), and
    a replay resume with another target is the new target's run, not refused."""

    def fit(target, ckpt_path=None, checkpoint=None):  # type: ignore[no-untyped-def]
        return _fit_two_epochs(problem, DiffIn(target="val", target_loader=target), ckpt_path, checkpoint)

    plain = fit(iter(list(problem.val)))
    checkpointed = fit(iter(list(problem.val)), checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4))
    torch.testing.assert_close(checkpointed.scores.values, plain.scores.values, rtol=0, atol=0)
    other = digits_problem(n=64, batch_size=32, epochs=1, val_size=60, seed=1)
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"))[0]
    torch.testing.assert_close(fit(other.val, ckpt_path=first).scores.values, fit(other.val).scores.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["clip spelled out", "no clipping as 0", "an epoch of one batch twice over", "constant batches"])
def test_legitimate_resumes_that_look_different_are_not_refused(problem, tmp_path, case):
    """The same clipping written otherwise (the default algorithm spelled out; 0 for none) and
    epochs whose batches repeat (a mid-epoch resume whose next batch equals an earlier one) resume
    to the uninterrupted scores; both were refused at their first batch."""
    batches = problem.train.batches[:4]
    data = {"an epoch of one batch twice over": batches + batches, "constant batches": [batches[0]] * 4}.get(case, problem.train.batches)
    first_clip, then_clip = {
        "clip spelled out": ({"gradient_clip_val": 0.5}, {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}),
        "no clipping as 0": ({}, {"gradient_clip_val": 0}),
    }.get(case, ({}, {}))

    def fit(options, ckpt_path=None, checkpoint=None):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        callback = DiffIn(target="val", target_loader=problem.val)
        extra = [checkpoint] if checkpoint is not None else []
        quiet_trainer(callbacks=[callback, *extra], max_epochs=2, enable_checkpointing=bool(extra), **options).fit(
            Classifier(hidden=(8,), lr=0.1).double(), train_dataloaders=FixedBatches(data), ckpt_path=ckpt_path
        )
        return callback

    whole = fit(first_clip)
    fit(first_clip, checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=len(data) // 2 + 1))
    first = sorted(Path(tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)[0]  # mid-epoch
    torch.testing.assert_close(fit(then_clip, ckpt_path=first).scores.values, whole.scores.values, rtol=0, atol=1e-12)
