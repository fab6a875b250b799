"""What the retraining ground truth refuses because it would not reproduce the recorded run:
activation checkpointing and other reads of parameters outside the functional call, spectral
normalisation and other forwards that write module buffers. Each case is a real ``Trainer.fit``
recorded by :class:`StepRecorder`; the advised fix is checked to reproduce the run."""

from __future__ import annotations

import warnings
import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from conftest import quiet_trainer
from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.evaluation import StepRecorder, leave_one_out, retrain
from lightning_influence.models import Classifier

Batch = tuple[Tensor, Tensor, Tensor]


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    x, y = load_digits_tensors(torch.float64)
    return [(x[i : i + 16], y[i : i + 16], torch.arange(i, i + 16)) for i in range(0, 64, 16)]


def state_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def fit(module: L.LightningModule, batches: list[Batch], verify: bool = False) -> tuple[dict[str, Tensor], StepRecorder]:
    """Fits ``module`` for two epochs; its initial parameters and the recorder. ``verify=False``
    (here): the recorder does not retrain the run at the end of fit, so that the refusals of the
    retraining itself are what the tests see (the recorder's own check raises the same error at
    the end of fit: :func:`test_the_recorder_refuses_at_the_end_of_fit_what_the_retraining_would`)."""
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    recorder = StepRecorder(verify=verify)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[recorder], max_epochs=2).fit(module, train_dataloaders=FixedBatches(batches))
    return initial, recorder


def assert_refused(
    module: nn.Module, initial: dict[str, Tensor], recorder: StepRecorder, target: list[Batch], match: str
) -> None:
    """``leave_one_out`` refuses with ``match`` and leaves the module's parameters and buffers as they were."""
    assert recorder.optimizer is not None
    before = state_of(module)
    with pytest.raises(ValueError, match=match):
        leave_one_out(module, initial, recorder.steps, recorder.optimizer, [0, 1, 2], target)
    after = state_of(module)
    assert all(torch.equal(after[n], t) for n, t in before.items())


def assert_reproduces(module: nn.Module, initial: dict[str, Tensor], recorder: StepRecorder) -> None:
    """Retraining with nothing removed gives the recorded run's final parameters."""
    assert recorder.optimizer is not None
    out = retrain(module, initial, recorder.steps, recorder.optimizer, [(), (3,)])
    final = dict(module.named_parameters())
    for n, t in out.items():
        torch.testing.assert_close(t[0], final[n].detach(), atol=1e-10, rtol=0.0)
    assert max(float((t[1] - final[n]).abs().max()) for n, t in out.items()) > 1e-8


# --- parameters read outside the functional call --------------------------------------------------


class _Checkpointed(Classifier):
    """An MLP whose middle block runs under activation checkpointing while ``checkpointing`` is set."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__(hidden=(8, 8))
        self.use_reentrant = use_reentrant
        self.checkpointing = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.net[:2](x)
        if self.checkpointing:
            h = checkpoint(self.net[2:4], h, use_reentrant=self.use_reentrant)
        else:
            h = self.net[2:4](h)
        return self.net[4](h)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_is_refused_with_the_fix(batches: list[Batch], use_reentrant: bool) -> None:
    torch.manual_seed(0)
    module = _Checkpointed(use_reentrant).double()
    initial, recorder = fit(module, batches)
    assert_refused(module, initial, recorder, batches[:1], "activation checkpointing.*Turn activation checkpointing off")
    # the advised fix: the same recorded run, retrained with checkpointing switched off
    module.checkpointing = False
    assert_reproduces(module, initial, recorder)


class _CachedReference(Classifier):
    """Scales the logits by a parameter read through a list built at construction: a reference to
    the Parameter object that ``functional_call`` does not swap."""

    def __init__(self) -> None:
        super().__init__(hidden=(8,))
        self.scale = nn.Parameter(torch.ones(10))
        self._cached = [self.scale]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self._cached[0]


def test_parameters_read_outside_the_functional_call_are_refused(batches: list[Batch]) -> None:
    torch.manual_seed(0)
    module = _CachedReference().double()
    initial, recorder = fit(module, batches)
    match = "most in scale.*reads the module.s own parameters instead of those passed in"
    assert_refused(module, initial, recorder, batches[:1], match)


# --- forwards that write module state ---------------------------------------------------------------


class _SpectralNormed(Classifier):
    """An MLP whose hidden layer is under ``torch.nn.utils.spectral_norm`` (``kind='hook'``), its
    parametrization version (``'parametrization'``), or an exact, stateless spectral norm (``'exact'``)."""

    def __init__(self, kind: str) -> None:
        super().__init__(hidden=(8,))
        if kind == "hook":
            self.net[0] = nn.utils.spectral_norm(self.net[0])
        elif kind == "parametrization":
            self.net[0] = nn.utils.parametrizations.spectral_norm(self.net[0])
        else:
            parametrize.register_parametrization(self.net[0], "weight", _ExactSpectralNorm())


class _ExactSpectralNorm(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight / torch.linalg.matrix_norm(weight, ord=2)


@pytest.mark.parametrize("kind", ["hook", "parametrization"])
def test_spectral_norm_is_refused(batches: list[Batch], kind: str) -> None:
    """Holding the recorded values of the power iteration's buffers does not reproduce the runs (the
    iteration would advance again from them, and a run without a sample has its own iterates):
    refused by the recorder when fit starts, and by the retraining."""
    from lightning_influence.evaluation import OptimizerSpec

    torch.manual_seed(0)
    module = _SpectralNormed(kind).double()
    match = r"spectral normalisation \(net\.0;.*matrix_norm"
    with pytest.raises(ValueError, match=match):
        fit(module, batches)
    spec = OptimizerSpec.from_optimizer(module, torch.optim.SGD(module.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=match):
        retrain(module, {n: p.detach() for n, p in module.named_parameters()}, [], spec, [()])


def test_exact_spectral_norm_is_reproduced(batches: list[Batch]) -> None:
    torch.manual_seed(0)
    module = _SpectralNormed("exact").double()
    initial, recorder = fit(module, batches)
    assert_reproduces(module, initial, recorder)


class _RunningScale(nn.Module):
    """Divides by a running mean of the absolute input, updated in place at every training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * x.abs().mean())
        return x / self.running


class _Refilled(nn.Module):
    """Fills its mask buffer with the same ones at every forward: written, never changed."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(8))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.mask.fill_(1.0)
        return x * self.mask


@pytest.mark.parametrize("layer", ["running", "refilled"])
def test_forward_writing_buffers_is_refused(batches: list[Batch], layer: str) -> None:
    """A running statistic changes with each run's trajectory; even rewriting the same values is
    refused (torch.func cannot write a module tensor), with the cause named, not torch.func's error."""
    torch.manual_seed(0)
    module = Classifier(hidden=(8,)).double()
    module.net.insert(1, _RunningScale() if layer == "running" else _Refilled())
    initial, recorder = fit(module, batches)
    name = "net.1.running" if layer == "running" else "net.1.mask"
    assert (name in recorder.steps[-1].varying) == (layer == "running")
    assert_refused(module, initial, recorder, batches[:1], rf"training forward writes module buffers \({name}\)")


def test_gradient_check_leaves_a_plain_module_alone(batches: list[Batch]) -> None:
    torch.manual_seed(0)
    module = Classifier(hidden=(8,)).double()
    initial, recorder = fit(module, batches)
    for p in module.parameters():
        p.grad = torch.full_like(p, 7.0)  # gradients the caller holds are kept
    assert_reproduces(module, initial, recorder)
    for p in module.parameters():
        assert p.grad is not None and bool((p.grad == 7.0).all())


def test_the_recorder_refuses_at_the_end_of_fit_what_the_retraining_would(batches: list[Batch]) -> None:
    torch.manual_seed(0)
    module = Classifier(hidden=(8,)).double()
    module.net.insert(1, _RunningScale())
    with pytest.raises(ValueError, match=r"training forward writes module buffers \(net\.1\.running\)"):
        fit(module, batches, verify=True)


# --- runs that trained otherwise than the recorder replays them -----------------------------------


class _HalvedGradients(Classifier):
    def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
        for p in self.parameters():
            p.grad.mul_(0.5)


class _L2InTrainingStep(Classifier):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.per_sample_loss(batch).mean() + 1e-2 * sum((p**2).sum() for p in self.parameters())


class _TinyNoise(Classifier):
    """Noise far below the functional-gradient check's tolerance, drawn in training only."""

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        losses = super().per_sample_loss(batch)
        return losses + 1e-9 * torch.randn_like(losses) if self.training else losses


def test_a_run_that_trained_otherwise_than_recorded_is_refused(batches: list[Batch]) -> None:
    """QA: with the recorder alone (no DiffIn to refuse them), a gradient edited in a hook, an L2
    term in training_step only, or noise in training gave a ground truth of another run (a
    no-removal retraining 0.06-0.13 away from the trained parameters, two leave-one-out calls
    differing by half the effects) without a word."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"StepRecorder: the recorded run, retrained with nothing removed, ends .* away from the trained parameters .*gradients changed in a hook"):
        fit(_HalvedGradients(hidden=(8,)).double(), batches, verify=True)
    # raised when fit ends, after every callback's on_train_end: the other callbacks' results are there
    from lightning_influence import TracIn

    tracin = TracIn(target="val", target_loader=FixedBatches(batches[:1]))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"StepRecorder: the recorded run"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[StepRecorder(), tracin], max_epochs=2).fit(_HalvedGradients(hidden=(8,)).double(), train_dataloaders=FixedBatches(batches))
    assert tracin.scores is not None and len(tracin.scores) > 0
    torch.manual_seed(0)
    _, unchecked = fit(_HalvedGradients(hidden=(8,)).double(), batches, verify=False)  # the option skips it
    assert unchecked.final_gap is None and unchecked.steps
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"per_sample_loss\(batch\).mean\(\) = .* but training_step returned loss .* on the first step"):
        fit(_L2InTrainingStep(hidden=(8,)).double(), batches, verify=True)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"the retraining needs a deterministic per_sample_loss, but it draws random numbers .*set dropout to p=0"):
        fit(_TinyNoise(hidden=(8,)).double(), batches, verify=True)
    torch.manual_seed(0)
    module = Classifier(hidden=(8,)).double()
    _, faithful = fit(module, batches, verify=True)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(module.parameters(), faithful.initial_params.values()))
    assert faithful.final_gap is not None and faithful.final_gap <= 1e-12 * moved


def test_layers_that_act_differently_in_training_are_refused_when_recording_starts(batches: list[Batch]) -> None:
    """Named, with the fix, before training (the retraining refused them only after the whole fit)."""
    torch.manual_seed(0)
    module = Classifier(hidden=(8,)).double()
    module.net.insert(1, nn.Dropout(0.3))
    with pytest.raises(ValueError, match=r"Classifier has layers that draw random numbers in training \(net\.1: dropout .*set dropout to p=0"):
        fit(module, batches, verify=True)
