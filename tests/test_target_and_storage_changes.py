"""What changes during fit, seen where it takes effect: a learning rate set after the callbacks'
``on_before_optimizer_step`` (by the module's own hook or a later callback), the set of trained
parameters (``BackboneFinetuning``, freezing mid-fit), a validation loader reloaded every epoch, a
spilled trajectory removed, and sample ids that do not match the batch."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from conftest import digits_problem, quiet_trainer  # noqa: E402
from lightning_influence.callbacks.hooks import OptimizerStepWatch  # noqa: E402
from lightning_influence.callbacks.tracin import TracIn  # noqa: E402
from lightning_influence.evaluation import StepRecorder  # noqa: E402
from lightning_influence.evaluation.retraining import retrain  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402
from test_tracin import _brute_force_tracin  # noqa: E402

HALVED_FROM = 5  # the optimizer step from which the learning rate is halved


def _lr_at(step: int) -> float:
    return 0.05 if step >= HALVED_FROM else 0.1


class HalvesLrInItsHook(Classifier):
    """Halves the learning rate in its own ``on_before_optimizer_step``, which Lightning runs after every callback's."""

    def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(self.trainer.global_step)


class HalvesLrAtBatchStart(Classifier):
    """The same schedule, set before the step's batch starts (seen by every hook)."""

    def on_train_batch_start(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = _lr_at(self.trainer.global_step)


class HalvesLrLate(Callback):
    """The same schedule, set by a callback listed after TracIn and the recorder."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(trainer.global_step)


def _fit_lr_change(problem, model_class, extra=()):
    torch.manual_seed(0)
    model = model_class(hidden=(16,), lr=0.1).double()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder, tracin = StepRecorder(), TracIn(target="val", target_loader=problem.val)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[recorder, tracin, *extra], max_epochs=2).fit(model, train_dataloaders=problem.train)
    return model, initial, recorder, tracin


@pytest.mark.parametrize("where", ["module_hook", "later_callback"])
def test_a_learning_rate_set_after_the_callbacks_hooks_is_recorded_and_scored_as_used(where):
    problem = digits_problem(n=96, batch_size=16, epochs=1, val_size=100)
    if where == "module_hook":
        model, initial, recorder, tracin = _fit_lr_change(problem, HalvesLrInItsHook)
    else:
        model, initial, recorder, tracin = _fit_lr_change(problem, Classifier, [HalvesLrLate()])
    steps = len(recorder.steps)
    assert steps == 12
    # The recorder has the learning rates the optimizer used...
    assert [s.lrs for s in recorder.steps] == [(_lr_at(t),) for t in range(steps)]
    # ... so the ground-truth retraining reproduces the real run's final parameters.
    final = retrain(model, recorder.initial_params, recorder.steps, recorder.optimizer, [()])
    for name, p in model.named_parameters():
        torch.testing.assert_close(final[name][0], p.detach(), atol=1e-12, rtol=0.0)
    # TracIn equals the same schedule set at batch start, and a brute-force TracIn with the true learning rates.
    _, _, _, reference = _fit_lr_change(problem, HalvesLrAtBatchStart)
    ids = sorted(reference.scores.ids.tolist())
    got = torch.tensor([float(tracin.scores[i]) for i in ids], dtype=torch.float64)
    want = torch.tensor([float(reference.scores[i]) for i in ids], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    group_of = {n: 0 for n, _ in model.named_parameters()}
    brute, _ = _brute_force_tracin(model, recorder, list(problem.val), group_of)
    brute_values = torch.tensor([brute[i] for i in ids], dtype=torch.float64)
    torch.testing.assert_close(got, brute_values, rtol=1e-9, atol=1e-10 * float(brute_values.abs().max()))
    assert not model.trainer.optimizers[0]._optimizer_step_pre_hooks  # the watches are closed


def test_optimizer_step_watch_runs_after_every_hook_and_clipping():
    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=100)
    events: list = []

    class Logged(Classifier):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            events.append("training_step")
            return super().training_step(batch, batch_idx)

        def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
            events.append("module hook")
            optimizer.param_groups[0]["lr"] = 0.5

    class Watching(Callback):
        def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            self.watch = OptimizerStepWatch(self.seen, "Watching", carries_state=True)
            self.watch.watch(trainer.optimizers[0])

        def seen(self, optimizer):  # type: ignore[no-untyped-def]
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            events.append(("step", optimizer.param_groups[0]["lr"], norm <= 1e-3 * (1 + 1e-9)))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
            events.append("callback hook")

        def on_fit_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            self.watch.close()

    torch.manual_seed(0)
    model = Logged(hidden=(16,), lr=0.1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[Watching()], max_steps=2, accumulate_grad_batches=2, gradient_clip_val=1e-3).fit(
            model, train_dataloaders=problem.train
        )
    step = ["training_step", "training_step", "callback hook", "module hook", ("step", 0.5, True)]
    assert events == step + step


# --- the set of trained parameters changes during fit ----------------------------------------------------


class BackboneAndHead(Classifier):
    def __init__(self) -> None:
        super().__init__(hidden=(16,), lr=0.1)
        del self.net
        self.backbone = nn.Sequential(nn.Linear(64, 16), nn.Tanh())
        self.head = nn.Linear(16, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.backbone(x))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class FreezesFirstLayer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if trainer.current_epoch == 1:
            pl_module.net[0].weight.requires_grad_(False)


@pytest.mark.parametrize("change", ["backbone_finetuning", "freeze_mid_fit"])
def test_tracin_refuses_a_change_of_the_trained_parameters(change):
    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=100)
    torch.manual_seed(0)
    if change == "backbone_finetuning":
        model, other = BackboneAndHead().double(), BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)
        expected = "that was not trained at fit start .* is trained now .* optimizer step 4: TracIn cannot score"
    else:
        model, other = Classifier(hidden=(16,), lr=0.1).double(), FreezesFirstLayer()
        expected = "parameter 'net.0.weight' has been frozen .* optimizer step 4: TracIn cannot score"
    tracin = TracIn(target="val", target_loader=problem.val)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=expected):
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[other, tracin], max_epochs=2).fit(model, train_dataloaders=problem.train)
    assert tracin.scores is None
    assert not model.trainer.optimizers[0]._optimizer_step_pre_hooks  # closed on the exception


# --- a validation loader reloaded with other data every epoch -----------------------------------------------


class ReloadsOtherValData(Classifier):
    """``val_dataloader()`` serves another third of the validation samples at every epoch."""

    def __init__(self, loaders) -> None:  # type: ignore[no-untyped-def]
        super().__init__(hidden=(16,), lr=0.1)
        self.loaders = loaders

    def val_dataloader(self):  # type: ignore[no-untyped-def]
        return self.loaders[self.trainer.current_epoch % len(self.loaders)]


def test_target_val_stays_the_fit_start_validation_loader_when_the_trainer_reloads_another():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import DiffIn, IndexedDataset

    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=90)
    x = torch.cat([b[0] for b in problem.val])
    y = torch.cat([b[1] for b in problem.val])
    thirds = [DataLoader(IndexedDataset(TensorDataset(x[i : i + 30], y[i : i + 30])), batch_size=30) for i in (0, 30, 60)]
    first = DataLoader(IndexedDataset(TensorDataset(x[:30], y[:30])), batch_size=30)
    callbacks = {
        "tracin": TracIn(target="val"),
        "tracin pinned": TracIn(target="val", target_loader=first, name="pinned"),
        "diffin": DiffIn(target="val", log_summary=False),
        "diffin pinned": DiffIn(target="val", target_loader=first, log_summary=False, name="pinned"),
    }
    torch.manual_seed(0)
    model = ReloadsOtherValData(thirds).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=list(callbacks.values()), max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(
            model, train_dataloaders=problem.train
        )
    reloads = [str(w.message) for w in caught if "validation loader changed during fit" in str(w.message)]
    assert sorted(m.split("(")[0] for m in reloads) == ["DiffIn", "TracIn"]  # once per callback reading the trainer's
    assert all("target_loader=" in m for m in reloads)
    for name in ("tracin", "diffin"):
        scores, pinned = callbacks[name].scores, callbacks[f"{name} pinned"].scores
        ids = sorted(pinned.ids.tolist())
        got = torch.tensor([float(scores[i]) for i in ids], dtype=torch.float64)
        want = torch.tensor([float(pinned[i]) for i in ids], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()), msg=name)


def test_a_validation_loader_rebuilt_over_the_same_dataset_is_not_warned_about():
    """``reload_dataloaders_every_n_epochs`` with a ``val_dataloader()`` that builds a new loader over the
    same dataset each epoch: the target's data does not change, so no warning (QA: noise)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import DiffIn, IndexedDataset

    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=30)
    x = torch.cat([b[0] for b in problem.val])
    y = torch.cat([b[1] for b in problem.val])
    dataset = IndexedDataset(TensorDataset(x, y))

    class Rebuilds(ReloadsOtherValData):
        def val_dataloader(self):  # type: ignore[no-untyped-def]
            return DataLoader(dataset, batch_size=15)

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[DiffIn(target="val", log_summary=False), TracIn(target="val")], max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(
            Rebuilds([]).double(), train_dataloaders=problem.train
        )
    assert not [w for w in caught if "validation loader changed during fit" in str(w.message)]


# --- a spilled trajectory removed during fit ----------------------------------------------------------------


class RemovesSpill(Callback):
    def __init__(self, folder: Path, whole: bool) -> None:
        self.folder, self.whole = folder, whole

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if trainer.current_epoch != 0:
            return
        import shutil

        if self.whole:
            shutil.rmtree(self.folder)
        else:
            next(iter(sorted(self.folder.rglob("step-*.pt")))).unlink()


@pytest.mark.parametrize("whole", [True, False], ids=["folder", "one_step_file"])
def test_a_spilled_trajectory_removed_during_fit_is_a_clear_error(tmp_path, whole):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import DiffIn, IndexedDataset
    from lightning_influence.trajectory import SpilledTrajectoryError

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    model = Classifier(in_features=6, num_classes=3, hidden=(8,), lr=0.1).double()
    spill = tmp_path / "spill"
    callback = DiffIn(target="train", storage="disk", spill_dir=spill, log_summary=False)
    expected = r"DiffIn's spilled trajectory in .*spill.* was removed or changed during fit \((writing|reading) step \d+"
    with warnings.catch_warnings(), pytest.raises(SpilledTrajectoryError, match=expected) as raised:
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[callback, RemovesSpill(spill, whole)], max_epochs=2).fit(
            model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
        )
    assert "keep the folder and its files for the whole fit" in str(raised.value)
    assert "storage='memory'" in str(raised.value)


# --- sample ids that do not match the batch -------------------------------------------------------------


def test_too_few_sample_ids_blame_sample_ids_not_the_loss():
    from lightning_influence.checks import check_losses

    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=100)

    class DropsAnId(Classifier):
        def sample_ids(self, batch):  # type: ignore[no-untyped-def]
            return batch[-1][:-1]

    torch.manual_seed(0)
    model = DropsAnId(hidden=(8,), lr=0.1).double()
    expected = r"sample_ids\(batch\) returned 15 ids for a batch of 16 samples .*DropsAnId.sample_ids\(batch\) must return one"
    with warnings.catch_warnings(), pytest.raises(ValueError, match=expected):
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[TracIn(target="val", target_loader=problem.val)]).fit(model, train_dataloaders=problem.train)
    # Without the batch (or with a loss of another length), the loss is what is blamed, as before.
    batch = (torch.zeros(8, 3), torch.zeros(8), torch.arange(8))
    with pytest.raises(ValueError, match=r"per_sample_loss\(batch\) must return an unreduced Tensor\[B\] with B = 8"):
        check_losses(torch.zeros(1), torch.arange(8), batch=batch)
    with pytest.raises(ValueError, match=r"sample_ids\(batch\) returned 7 ids for a batch of 8 samples .*IndexedDataset"):
        check_losses(torch.zeros(8), torch.arange(7), batch=batch)


def test_tracin_leaves_out_the_steps_the_gradient_scaler_skips():
    """16-mixed with an initial scale that overflows: the scaler skips the first steps (no optimizer.step runs,
    so the step watch never fires); TracIn counts them as skipped, marks their samples seen with nothing added,
    and scores the other steps as the recorder's steps (the ones that ran) say."""
    from lightning.pytorch.plugins import MixedPrecision

    from lightning_influence.data import FixedBatches

    problem = digits_problem(n=96, batch_size=16, epochs=1, val_size=100)
    train = [(x.float(), y, ids) for x, y, ids in problem.train.batches]
    val = [(x.float(), y, ids) for x, y, ids in problem.val.batches]
    torch.manual_seed(0)
    model = Classifier(hidden=(8,), lr=0.1)
    recorder, tracin = StepRecorder(), TracIn(target="val", target_loader=val)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[recorder, tracin], max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(
            model, train_dataloaders=FixedBatches(train)
        )
    meta = tracin.scores.metadata
    assert recorder.skipped_steps >= 1 and meta["skipped_steps"] == recorder.skipped_steps
    assert meta["steps_seen"] == len(train) and meta["target_gradients"] == len(recorder.steps)
    assert sorted(tracin.scores.ids.tolist()) == list(range(96))  # every sample seen, those of skipped steps too
    skipped = {int(i) for x, y, ids in train for i in ids} - {int(i) for s in recorder.steps for b in s.batches for i in b[2]}
    assert skipped and all(float(tracin.scores[i]) == 0.0 for i in skipped)
