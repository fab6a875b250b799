"""Ground-truth retraining of models with batch norm (and instance norm with running statistics).

Training normalises each micro-batch with its own statistics and updates the running statistics in
place; a run without sample ``z`` normalises the sub-batch without ``z`` and keeps its own running
statistics, which its eval-mode target loss uses. Every case is compared with an independent
reference: the recorded ``Trainer.fit`` itself (no removal), or a plain PyTorch loop (a deep copy of
the initial module in training mode, a ``torch.optim`` optimizer of the same class, the same batch
list with the removed samples taken out, then the eval-mode target loss)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Collection
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from conftest import quiet_trainer
from lightning_influence.batch_norm import batch_statistics, running_statistics
from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.evaluation import StepRecorder, leave_one_out, retrain, subset_retraining
from lightning_influence.evaluation import retraining as retraining_module
from lightning_influence.models import Classifier

Batch = tuple[Tensor, Tensor, Tensor]
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


class Normed(Classifier):
    """A digits classifier whose network ``body`` reads the 64 pixels reshaped to ``shape``."""

    def __init__(self, body: nn.Module, shape: tuple[int, ...], optimizer: str) -> None:
        options = dict(OPTIMIZERS[optimizer][1])
        super().__init__(hidden=(), lr=options.pop("lr"), optimizer=optimizer, optimizer_options=options)
        self.shape = shape
        self.net = body

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], *self.shape))


# The layer before each normalisation has no bias: the normalisation removes it, so its exact gradient
# is 0 and Adam would turn the rounding noise of that 0 into steps of the learning rate's size.
def bn1d(**options: Any) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(64, 8, bias=False), nn.BatchNorm1d(8, **options), nn.Tanh(), nn.Linear(8, 10)), (64,)


def bn2d(**options: Any) -> tuple[nn.Module, tuple[int, ...]]:
    body = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3, **options), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 10))
    return body, (1, 8, 8)


def bn3d(**options: Any) -> tuple[nn.Module, tuple[int, ...]]:
    body = nn.Sequential(nn.Conv3d(1, 2, 2, bias=False), nn.BatchNorm3d(2, **options), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 27, 10))
    return body, (1, 4, 4, 4)


def in1d(**options: Any) -> tuple[nn.Module, tuple[int, ...]]:
    norm = nn.InstanceNorm1d(3, affine=True, track_running_stats=True, **options)
    return nn.Sequential(nn.Conv1d(1, 3, 5, stride=4), norm, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 15, 10)), (1, 64)


def model(layers: Callable[..., tuple[nn.Module, tuple[int, ...]]], optimizer: str = "sgd", **options: Any) -> Normed:
    torch.manual_seed(0)
    body, shape = layers(**options)
    return Normed(body, shape, optimizer).double()


@pytest.fixture(scope="module")
def data() -> tuple[list[Batch], list[Batch]]:
    """Two shuffled epochs of 96 digits in micro-batches of 12 (16 batches), and 100 target samples."""
    x, y = load_digits_tensors(torch.float64)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        order = torch.randperm(96, generator=g)
        batches += [(x[order[i : i + 12]], y[order[i : i + 12]], order[i : i + 12]) for i in range(0, 96, 12)]
    return batches, [(x[200:300], y[200:300], torch.arange(100))]


def fit(module: Normed, batches: list[Batch], accumulate: int = 1, callbacks: tuple[Callback, ...] = ()) -> StepRecorder:
    """One ``Trainer.fit`` over ``batches`` recorded by a :class:`StepRecorder` (which checks at the end
    of fit that retraining with nothing removed reproduces it, and does not warn that the loss looks
    coupled: batch statistics are retrained as coupled anyway)."""
    recorder = StepRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*looks coupled across its batch")
        trainer = quiet_trainer(callbacks=[recorder, *callbacks], accumulate_grad_batches=accumulate)
        trainer.fit(module, train_dataloaders=FixedBatches(batches))
    return recorder


def brute_force(
    initial: nn.Module,
    optimizer: str,
    batches: list[Batch],
    removed: Collection[int],
    target: list[Batch],
    accumulate: int = 1,
    frozen_from: int | None = None,
) -> tuple[float, dict[str, Tensor]]:
    """Plain PyTorch training without ``removed``: the eval-mode target loss and the final state.
    A micro-batch left empty gets no forward and contributes a zero gradient (the step still runs).
    ``frozen_from``: from that step on, the first batch norm (``net.1``) runs in evaluation mode."""
    module = copy.deepcopy(initial).train()
    optimizer_class, options = OPTIMIZERS[optimizer]
    opt = optimizer_class([p for p in module.parameters() if p.requires_grad], **options)
    gone = torch.tensor(sorted(removed), dtype=torch.long)
    for start in range(0, len(batches), accumulate):
        if frozen_from is not None and start // accumulate >= frozen_from:
            module.net[1].eval()
        for p in module.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for x, y, ids in batches[start : start + accumulate]:
            keep = ~torch.isin(ids, gone)
            if keep.any():
                (module.per_sample_loss((x[keep], y[keep], ids[keep])).mean() / accumulate).backward()
        opt.step()
    module.eval()
    with torch.no_grad():
        loss = torch.cat([module.per_sample_loss(b) for b in target]).mean()
    return float(loss), {n: t.detach().clone() for n, t in module.state_dict().items()}


def assert_state_close(retrained: dict[str, Tensor], run: int, state: dict[str, Tensor], names: list[str]) -> None:
    for name in names:
        expected = state[name]
        scale = float(expected.abs().max()) if expected.is_floating_point() else 0.0
        torch.testing.assert_close(retrained[name][run], expected, rtol=0.0, atol=1e-11 * (1.0 + scale), msg=name)


# --- no removal: the Trainer's own run -------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("layers", [bn1d, bn2d], ids=["BatchNorm1d-MLP", "Conv-BatchNorm2d"])
def test_no_removal_lands_on_the_trained_parameters_and_running_statistics(data, layers, optimizer) -> None:
    batches, _ = data
    module = model(layers, optimizer)
    recorder = fit(module, batches)  # the recorder's end-of-fit check compares parameters and buffers as well
    assert recorder.optimizer is not None and len(recorder.steps) == 16
    stats = running_statistics(module)
    assert stats == ["net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"]
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, [()])
    state = {n: t.detach() for n, t in module.state_dict().items()}
    assert sorted(final) == sorted([n for n, _ in module.named_parameters()] + stats)
    assert_state_close(final, 0, state, list(final))
    assert int(final["net.1.num_batches_tracked"][0]) == 16
    moved = float((state["net.1.running_var"] - recorder.initial_params["net.1.running_var"]).abs().max())
    assert moved > 0.1  # the statistics really moved


class _TrainModeForward(Callback):
    """Runs the model in training mode on each batch outside training_step: batch norm updates its
    running statistics once more per batch, which no recorded step accounts for."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            pl_module(batch[0])


def test_the_recorder_refuses_running_statistics_written_outside_the_recorded_steps(data) -> None:
    batches, _ = data
    with pytest.raises(ValueError, match=r"reaches the trained parameters but its normalisation running statistics end .* a forward in training mode outside training_step"):
        fit(model(bn1d), batches, callbacks=(_TrainModeForward(),))


# --- removals: an independent plain PyTorch loop -----------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "optimizer", "accumulate"),
    [(bn1d, "sgd", 1), (bn2d, "adam", 2)],
    ids=["BatchNorm1d-SGD-momentum", "Conv-BatchNorm2d-Adam-accumulated"],
)
def test_leave_one_out_and_subsets_equal_brute_force_retraining(data, layers, optimizer, accumulate) -> None:
    batches, target = data
    module = model(layers, optimizer)
    initial = copy.deepcopy(module)
    recorder = fit(module, batches, accumulate)
    assert recorder.optimizer is not None and len(recorder.steps) == 16 // accumulate
    ids = [0, 17, 42, 95]
    truth = leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, ids, target)
    base, _ = brute_force(initial, optimizer, batches, (), target, accumulate)
    reference = torch.tensor([brute_force(initial, optimizer, batches, (i,), target, accumulate)[0] - base for i in ids], dtype=torch.float64)
    torch.testing.assert_close(truth, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    assert float(reference.abs().min()) > 1e-6  # every removal changes the target

    # subsets: two samples of one micro-batch, and a whole micro-batch (left empty: no forward, zero gradient)
    whole = tuple(batches[3][2].tolist())
    removals = [(5, 6, 60), whole]
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, removals)
    subsets = subset_retraining(module, recorder.initial_params, recorder.steps, recorder.optimizer, removals, target)
    for run, removed in enumerate(removals):
        loss, state = brute_force(initial, optimizer, batches, removed, target, accumulate)
        assert_state_close(final, run, state, list(final))
        assert subsets.changes[run].item() == pytest.approx(loss - base, rel=1e-10, abs=1e-12)


def test_retraining_uses_one_vectorised_evaluation_per_group_of_runs(data, monkeypatch) -> None:
    """torch.func.vmap carries each run's running statistics (updated in place through its slice):
    the run-by-run loop is never needed for batch norm with a momentum, and the result is exact."""
    batches, target = data
    module = model(bn1d)
    initial = copy.deepcopy(module)
    recorder = fit(module, batches[:6])

    def no_loop(*args: Any) -> Any:
        raise AssertionError("the run-by-run evaluation was used")

    monkeypatch.setattr(retraining_module, "_each_run", no_loop)
    removals = [(), (1,), (2, 3)]
    assert recorder.optimizer is not None
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, removals)
    for run, removed in enumerate(removals):
        assert_state_close(final, run, brute_force(initial, "sgd", batches[:6], removed, target)[1], list(final))


def test_runs_keeping_as_many_samples_share_one_vectorised_evaluation(data, monkeypatch) -> None:
    """With the default remove_from_batch, the runs that remove something from a micro-batch are
    grouped by how many samples they keep (each run its own rows, gathered): one evaluation per
    distinct count, plus one for the runs removing nothing; the result is the brute-force one."""
    batches, target = data
    batches = batches[:4]
    module = model(bn1d)
    initial = copy.deepcopy(module)
    recorder = fit(module, batches)
    first, second = batches[0][2].tolist(), batches[1][2].tolist()
    removals = [(), (first[0],), (first[5],), (first[1], first[2]), (first[3], second[0]), (second[4], second[7]), tuple(first)]
    calls = 0
    grad = retraining_module._Vectorize.grad

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return grad(self, *args, **kwargs)

    monkeypatch.setattr(retraining_module._Vectorize, "grad", counted)
    assert recorder.optimizer is not None
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, removals)
    expected = 0
    for _, _, ids in batches:
        kept = {12 - len(set(ids.tolist()) & set(r)) for r in removals}
        expected += len(kept - {0})
    # batch 0: kept 12, 11, 10 and 0 (emptied: no evaluation); batch 1: 12, 11, 10; batches 2 and 3: 12.
    # One more: the check of the functional gradient on the first micro-batch
    assert calls - 1 == expected == 3 + 3 + 1 + 1
    for run, removed in enumerate(removals):
        assert_state_close(final, run, brute_force(initial, "sgd", batches, removed, target)[1], list(final))


@pytest.mark.parametrize(
    ("layers", "options", "accumulate"),
    [
        (bn1d, {"momentum": None}, 1),
        (bn1d, {"track_running_stats": False}, 1),
        (bn1d, {"affine": False}, 2),
        (bn3d, {}, 1),
        (in1d, {}, 1),
    ],
    ids=["cumulative-average", "no-running-stats", "not-affine-accumulated", "BatchNorm3d", "InstanceNorm1d-running-stats"],
)
def test_normalisation_variants_equal_brute_force_retraining(data, layers, options, accumulate) -> None:
    batches, target = data
    batches = batches[:8]
    module = model(layers, **options)
    initial = copy.deepcopy(module)
    recorder = fit(module, batches, accumulate)
    assert recorder.optimizer is not None
    ids = [3, 50]
    truth = leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, ids, target)
    base, state = brute_force(initial, "sgd", batches, (), target, accumulate)
    reference = torch.tensor([brute_force(initial, "sgd", batches, (i,), target, accumulate)[0] - base for i in ids], dtype=torch.float64)
    torch.testing.assert_close(truth, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, [()])
    assert sorted(final) == sorted([n for n, _ in module.named_parameters()] + running_statistics(module))
    assert_state_close(final, 0, state, list(final))


# --- refusals ------------------------------------------------------------------------------------------


def test_a_removal_leaving_one_sample_to_batch_norm_is_refused_naming_step_and_sample(data) -> None:
    batches, target = data
    short = [*batches[:2], (batches[2][0][:2], batches[2][1][:2], batches[2][2][:2])]  # the third step: 2 samples
    module = model(bn1d)
    recorder = fit(module, short)
    assert recorder.optimizer is not None
    lonely = int(short[2][2][0])
    with pytest.raises(ValueError, match=rf"removing sample\(s\) {lonely} leaves micro-batch 0 of step 2 .* with 1 sample\(s\), which batch norm in training mode cannot normalise"):
        leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, [int(short[0][2][0]), lonely], target)
    # batch norm over space (2-D) normalises a single image: no refusal
    conv = model(bn2d)
    recorder = fit(conv, short)
    assert recorder.optimizer is not None
    assert leave_one_out(conv, recorder.initial_params, recorder.steps, recorder.optimizer, [lonely], target).isfinite().all()


def test_sync_batch_norm_dropout_and_unmodelled_options_are_refused(data) -> None:
    batches, target = data
    synced = model(bn1d)
    synced.net = nn.SyncBatchNorm.convert_sync_batchnorm(synced.net).double()
    with pytest.raises(ValueError, match=r"nn\.SyncBatchNorm layers \(net\.1\).*one device with plain batch norm"):
        fit(synced, batches[:2])
    dropped = model(bn1d)
    dropped.net.insert(3, nn.Dropout(0.2))
    with pytest.raises(ValueError, match=r"layers that draw random numbers in training \(net\.3: dropout.*set dropout to p=0"):
        fit(dropped, batches[:2])

    module = model(bn1d)
    recorder = fit(module, batches[:2])
    assert recorder.optimizer is not None
    args = (module, recorder.initial_params, recorder.steps, recorder.optimizer, [(1,)])
    with pytest.raises(ValueError, match=r"batch-statistics layers \(net\.1: .*coupled=False would mask"):
        retrain(*args, coupled=False)
    with pytest.raises(ValueError, match=r"batch-statistics layers \(net\.1: .*use batch_removal='reaverage'"):
        retrain(*args, batch_removal="drop")
    parameters_only = {n: p for n, p in recorder.initial_params.items() if "running" not in n and "tracked" not in n}
    with pytest.raises(ValueError, match=r"initial_params has no entry for the running statistics net\.1\.running_mean.*StepRecorder\.initial_params"):
        retrain(module, parameters_only, recorder.steps, recorder.optimizer, [(1,)])


# --- the shared helper -------------------------------------------------------------------------------


def test_batch_statistics_evaluates_the_training_function_without_writing_buffers() -> None:
    """Batch and instance norm as in training (the reference: a copy with those layers in training
    mode), dropout as in evaluation, no buffer written, modes restored; also under torch.func.vmap."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.InstanceNorm1d(3, affine=True, track_running_stats=True), nn.Dropout(0.5)
    ).double()
    net[1].running_mean.fill_(0.3)
    net[2].running_var.fill_(2.0)
    net.eval()
    x = torch.randn(5, 2, 7, dtype=torch.float64)
    before = copy.deepcopy(net.state_dict())

    def reference(params: dict[str, Tensor] | None = None) -> Tensor:
        twin = copy.deepcopy(net)
        if params is not None:
            twin.load_state_dict({**twin.state_dict(), **params})
        twin[1].train()
        twin[2].train()
        return twin(x)

    with batch_statistics(net):
        out = net(x)
    torch.testing.assert_close(out, reference(), rtol=0, atol=1e-14)
    assert all(torch.equal(t, before[n]) for n, t in net.state_dict().items())
    assert not any(m.training for m in net.modules()) and net[1].track_running_stats and net[2].running_mean is not None

    params = {n: p.detach() for n, p in net.named_parameters()}
    stacked = {n: torch.stack([p, p + 0.1 * torch.randn_like(p)]) for n, p in params.items()}
    with batch_statistics(net):
        outs = torch.func.vmap(lambda p: torch.func.functional_call(net, p, (x,)))(stacked)
    for run in range(2):
        torch.testing.assert_close(outs[run], reference({n: v[run] for n, v in stacked.items()}), rtol=0, atol=1e-13)
    assert all(torch.equal(t, before[n]) for n, t in net.state_dict().items())


# --- batch norm frozen in evaluation mode during training -------------------------------------------------


class _FreezesBatchNorm(Callback):
    """Puts ``net.1`` in evaluation mode from batch ``start`` on (the frozen-backbone pattern): when the
    epoch starts for ``start=0``, else in ``on_train_batch_start``, after the recorder's hook of that batch."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if self.start == 0:
            pl_module.net[1].eval()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx >= self.start:
            pl_module.net[1].eval()


@pytest.mark.parametrize(("start", "verify"), [(0, True), (5, True), (5, False)], ids=["from-the-start", "from-step-5", "from-step-5-unverified"])
def test_batch_norm_switched_to_evaluation_mode_is_replayed_as_trained(data, start, verify) -> None:
    """Eval-mode batch norm normalises with the running statistics and leaves them as they are: the
    recorded steps say which layers were in evaluation mode, and the retraining replays them so (also
    unverified: without the record, the truth of a run that normalised with batch statistics)."""
    batches, target = data
    batches = batches[:10]
    module = model(bn1d)
    if start == 0:  # a frozen backbone: pretrained statistics, batch norm's own parameters not trained
        module.net[1].running_mean.normal_(generator=torch.Generator().manual_seed(1))
        module.net[1].running_var.uniform_(0.5, 2.0)
        module.net[1].requires_grad_(False)
    initial = copy.deepcopy(module)
    recorder = StepRecorder(verify=verify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(callbacks=[recorder, _FreezesBatchNorm(start)])
        trainer.fit(module, train_dataloaders=FixedBatches(batches))
    assert recorder.optimizer is not None
    assert [sorted(s.eval_layers) for s in recorder.steps] == [[]] * start + [["net.1"]] * (10 - start)
    # memory: the steps hold one set object per stretch of steps with unchanged modes (not one per step)
    stored_sets = {id(s.eval_layers) for s in recorder.steps}
    assert len(stored_sets) == (1 if start == 0 else 2)
    ids = [3, 50, 77]
    truth = leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, ids, target)
    base, state = brute_force(initial, "sgd", batches, (), target, frozen_from=start)
    reference = torch.tensor(
        [brute_force(initial, "sgd", batches, (i,), target, frozen_from=start)[0] - base for i in ids], dtype=torch.float64
    )
    torch.testing.assert_close(truth, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, [()])
    assert_state_close(final, 0, state, list(final))



class _SwitchesInHook(Callback):
    """Puts ``net.1`` in evaluation mode in ``hook`` of the first batch, for the rest of the fit."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.hook == "on_train_batch_start":
            pl_module.net[1].eval()

    def on_before_backward(self, trainer, pl_module, loss):  # type: ignore[no-untyped-def]
        if self.hook == "on_before_backward":
            pl_module.net[1].eval()

    def on_after_backward(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if self.hook == "on_after_backward":
            pl_module.net[1].eval()


@pytest.mark.parametrize(
    ("hook", "recorder_first", "frozen_from"),
    [("on_train_batch_start", True, 0), ("on_before_backward", False, 1), ("on_after_backward", False, 1)],
    ids=["before-the-first-forward-after-the-recorder", "after-the-first-forward-before-the-recorder", "after-the-first-backward"],
)
def test_batch_norm_switched_by_a_hook_inside_the_first_batch_is_recorded_as_the_forward_ran_it(data, hook, recorder_first, frozen_from) -> None:
    """A callback switching batch norm to evaluation mode inside the first batch: in on_train_batch_start
    after the recorder's hook (training_step's first forward runs in evaluation mode: no false first-loss
    mismatch), or after that forward, in an on_before_backward that runs before the recorder's (step 0
    trained in training mode, recorded so). The record, and leave-one-out, match a plain PyTorch loop
    that switches where the forward saw the switch."""
    batches, target = data
    batches = batches[:6]
    module = model(bn1d)
    initial = copy.deepcopy(module)
    recorder = StepRecorder()
    switch = _SwitchesInHook(hook)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(callbacks=[recorder, switch] if recorder_first else [switch, recorder])
        trainer.fit(module, train_dataloaders=FixedBatches(batches))  # verified at the end of fit as well
    assert recorder.optimizer is not None
    assert [sorted(s.eval_layers) for s in recorder.steps] == [[]] * frozen_from + [["net.1"]] * (6 - frozen_from)
    ids = [3, 50]
    truth = leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, ids, target)
    base, _ = brute_force(initial, "sgd", batches, (), target, frozen_from=frozen_from)
    reference = torch.tensor(
        [brute_force(initial, "sgd", batches, (i,), target, frozen_from=frozen_from)[0] - base for i in ids], dtype=torch.float64
    )
    torch.testing.assert_close(truth, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))

# --- remove_from_batch: checked before the coupled retraining of batch-norm models ----------------------


class _ClassWeighted(Normed):
    """Batches ``(x, y, weights, ids)`` carry one weight per class (12 of them, of which the 10 digits
    use the first): not per sample, but with as many rows as a micro-batch has samples."""

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y, weights = batch[0], batch[1], batch[2]
        return super().per_sample_loss((x, y)) * weights[y]


class _ClassWeightedRemoval(_ClassWeighted):
    def remove_from_batch(self, batch: Any, index: int | Tensor) -> Any:
        x, y, weights, ids = batch
        keep = [i for i in range(len(ids)) if i != int(index)]
        return x[keep], y[keep], weights, ids[keep]


class _BrokenRemoval(Normed):
    def remove_from_batch(self, batch: Any, index: int | Tensor) -> Any:
        raise RuntimeError("no such sample")


def _class_weighted(cls: type[Normed]) -> Normed:
    torch.manual_seed(0)
    body, shape = bn1d()
    return cls(body, shape, "sgd").double()


def test_a_remove_from_batch_that_drops_a_shared_tensor_is_refused_and_a_correct_one_is_exact(data) -> None:
    """The default remove_from_batch drops row i of the 12 class weights too (shifting every weight
    after it): refused, naming the tensor, before any run is retrained. An override that keeps them
    whole gives the brute-force truth (the class weights untouched)."""
    batches, target = data
    weights = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)
    weighted = [(x, y, weights, ids) for x, y, ids in batches[:6]]
    weighted_target = [(x, y, weights, ids) for x, y, ids in target]
    module = _class_weighted(_ClassWeighted)
    recorder = fit(module, weighted)  # nothing removed: the recorded run is reproduced
    assert recorder.optimizer is not None
    args = (recorder.initial_params, recorder.steps, recorder.optimizer, [3, 50], weighted_target)
    with pytest.raises(ValueError, match=r"remove_from_batch takes out more than the sample: .*remove_from_batch\(batch, 0\) at step 0 .*tensor 2 of the batch .* kept whole they agree.*Override remove_from_batch"):
        leave_one_out(module, *args)

    fixed = _class_weighted(_ClassWeightedRemoval)
    initial = copy.deepcopy(fixed)
    recorder = fit(fixed, weighted)
    assert recorder.optimizer is not None
    truth = leave_one_out(fixed, recorder.initial_params, recorder.steps, recorder.optimizer, [3, 50], weighted_target)

    def brute(removed: tuple[int, ...]) -> float:
        twin = copy.deepcopy(initial).train()
        opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
        for x, y, w, ids in weighted:
            opt.zero_grad()
            keep = ~torch.isin(ids, torch.tensor(removed, dtype=torch.long))
            twin.per_sample_loss((x[keep], y[keep], w, ids[keep])).mean().backward()
            opt.step()
        twin.eval()
        with torch.no_grad():
            return float(torch.cat([twin.per_sample_loss(b) for b in weighted_target]).mean())

    base = brute(())
    reference = torch.tensor([brute((3,)) - base, brute((50,)) - base], dtype=torch.float64)
    torch.testing.assert_close(truth, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))


def test_an_error_inside_remove_from_batch_names_it(data) -> None:
    batches, target = data
    module = _class_weighted(_BrokenRemoval)
    recorder = fit(module, batches[:2])
    assert recorder.optimizer is not None
    with pytest.raises(ValueError, match=r"evaluating remove_from_batch\(batch, position\) for position\(s\) 0 .* of micro-batch 0 of step 0, then per_sample_loss on the result, raised RuntimeError: no such sample"):
        leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, [3], target)


# --- parameters frozen after fit ---------------------------------------------------------------------------


def test_freezing_the_model_after_fit_leaves_the_ground_truth_as_trained(data) -> None:
    """The recorder records which parameters trained; requires_grad_(False) or LightningModule.freeze()
    after fit (before inference) must not turn them into never-trained ones."""
    batches, target = data
    batches = batches[:6]
    module = model(bn1d)
    initial = copy.deepcopy(module)
    recorder = fit(module, batches)
    assert recorder.optimizer is not None
    ids = [3, 50]
    base, _ = brute_force(initial, "sgd", batches, (), target)
    reference = torch.tensor([brute_force(initial, "sgd", batches, (i,), target)[0] - base for i in ids], dtype=torch.float64)
    args = (recorder.initial_params, recorder.steps, recorder.optimizer, ids, target)
    module.net[0].requires_grad_(False)
    torch.testing.assert_close(leave_one_out(module, *args), reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    module.freeze()
    torch.testing.assert_close(leave_one_out(module, *args), reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    assert not any(p.requires_grad for p in module.parameters())  # the flags are left as the caller set them


class _FreezesAt(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 3:
            pl_module.net[0].weight.requires_grad_(False)


def test_the_recorder_refuses_parameters_frozen_during_fit(data) -> None:
    batches, _ = data
    with pytest.raises(ValueError, match=r"the trained parameters changed during fit \(at step 3: frozen since the first batch: net\.0\.weight\)"):
        fit(model(bn1d), batches[:6], callbacks=(_FreezesAt(),))


# --- the end-of-fit check names the likely cause -----------------------------------------------------------


class _ChangesMomentum(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 4:
            pl_module.net[1].momentum = 0.5


def test_the_end_of_fit_check_names_a_bias_before_batch_norm_under_adam_and_a_momentum_change(data) -> None:
    """float32 Conv2d(bias=True) into BatchNorm2d under Adam: the bias's exact gradient is 0 and its
    rounding noise, divided by Adam's running size, moves the fit and the retraining apart."""
    batches, _ = data
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    single = [(x.float(), y, ids) for x, y, ids in batches]
    with pytest.raises(ValueError, match=r"most in 'net\.0\.bias'.*Likely cause: 'net\.0\.bias' is a bias in a model with batch norm, trained by Adam: .*batch norm cancels this bias's gradient.*bias=False, freeze that bias, or train in float64"):
        fit(Normed(body, (1, 8, 8), "adam"), single)
    with pytest.raises(ValueError, match=r"normalisation running statistics end .*batch norm momentum changed during training"):
        fit(model(bn1d), batches[:8], callbacks=(_ChangesMomentum(),))


# --- momentum=None (cumulative moving average): vectorised like a float momentum ---------------------------


def shared_bn1d(**options: Any) -> tuple[nn.Module, tuple[int, ...]]:
    """One batch norm called twice per forward: its count rises by 2 per micro-batch, and each call
    averages with the factor of its own count."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.norm, self.second = nn.Linear(64, 8, bias=False), nn.BatchNorm1d(8, **options), nn.Linear(8, 8, bias=False)
            self.head = nn.Linear(8, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.norm(self.second(torch.tanh(self.norm(self.first(x)))))))

    return Twice(), (64,)


@pytest.mark.parametrize(
    ("layers", "optimizer", "accumulate", "frozen_from"),
    [(bn1d, "sgd", 1, None), (bn2d, "adam", 2, None), (shared_bn1d, "sgd", 1, None), (bn1d, "sgd", 1, 3)],
    ids=["BatchNorm1d-SGD-momentum", "Conv-BatchNorm2d-Adam-accumulated", "one-layer-called-twice", "frozen-from-step-3"],
)
def test_cumulative_average_batch_norm_is_vectorised_and_equals_brute_force(
    data, monkeypatch, layers, optimizer, accumulate, frozen_from
) -> None:
    """``momentum=None`` averages with ``1 / num_batches_tracked``, which torch reads as a Python number:
    the retraining passes it in from outside, per group of runs with equal counts (a run that emptied a
    micro-batch ran one forward less), so the run-by-run loop is never needed. Leave-one-out, subsets
    (one emptying a whole micro-batch) and every run's final parameters and running statistics equal a
    plain PyTorch loop (torch's own momentum=None) to 1e-10."""
    batches, target = data
    batches = batches[:8]
    module = model(layers, optimizer, momentum=None)
    initial = copy.deepcopy(module)
    callbacks = () if frozen_from is None else (_FreezesBatchNorm(frozen_from),)
    recorder = fit(module, batches, accumulate, callbacks)  # verified: the Trainer's own run is reproduced
    assert recorder.optimizer is not None

    def no_loop(*args: Any) -> Any:
        raise AssertionError("the run-by-run evaluation was used")

    monkeypatch.setattr(retraining_module, "_each_run", no_loop)
    ids = [0, 17, 42, 95]
    ids = [i for i in ids if any(i in b[2].tolist() for b in batches)]
    truth = leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, ids, target)
    reference_run = lambda removed: brute_force(initial, optimizer, batches, removed, target, accumulate, frozen_from)  # noqa: E731
    base, _ = reference_run(())
    reference = torch.tensor([reference_run((i,))[0] - base for i in ids], dtype=torch.float64)
    torch.testing.assert_close(truth, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))
    assert float(reference.abs().min()) > 1e-6

    whole = tuple(batches[1][2].tolist())  # an emptied micro-batch: that run's count falls one behind
    removals = [(), (5, 6, 60), whole]
    final = retrain(module, recorder.initial_params, recorder.steps, recorder.optimizer, removals)
    subsets = subset_retraining(module, recorder.initial_params, recorder.steps, recorder.optimizer, removals[1:], target)
    counts = [name for name in final if name.endswith("num_batches_tracked")]
    assert counts and int(final[counts[0]][2]) < int(final[counts[0]][0])  # the runs' counts differ
    for run, removed in enumerate(removals):
        loss, state = reference_run(removed)
        assert_state_close(final, run, state, list(final))
        if run:
            assert subsets.changes[run - 1].item() == pytest.approx(loss - base, rel=1e-10, abs=1e-12)
    assert all(m.momentum is None for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
