"""Resuming a fit from a Lightning checkpoint gives the scores of the uninterrupted run: the
callback's state (counters, score sums, the recorded steps not yet scored and the optimizer's
own state through Lightning) travels in the checkpoint, as tensors and primitives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import digits_problem, quiet_trainer
from lightning_influence import DiffIn
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


def _fit(problem, tmp_path, loader, ckpt_path=None, checkpoint=None, annealed=False):
    torch.manual_seed(0)
    make = _AnnealedFromStep5 if annealed else Classifier
    model = make(hidden=(16,), lr=3e-3, optimizer="adamw", optimizer_options={"weight_decay": 0.01}).double()
    callbacks = _callbacks(problem, tmp_path)
    extra = [checkpoint] if checkpoint is not None else []
    quiet_trainer(callbacks=[*callbacks, *extra], max_epochs=EPOCHS, enable_checkpointing=checkpoint is not None).fit(
        model, train_dataloaders=loader, ckpt_path=ckpt_path
    )
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
