"""DiffIn(batch_norm="batch"): batch-norm models scored as trained (batch statistics, the sample's
removal from its batch's statistics, running statistics carried to the evaluation-mode target),
against leave-one-out retraining written as a plain PyTorch loop (train-mode batch norm, the
sample taken out of its batches, the target read in evaluation mode with the retrained running
statistics)."""

from __future__ import annotations

import contextlib
import re
import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_influence import DiffIn, InfluenceMixin
from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.estimators.diffin_batch_norm import BatchNormTrace, statistics_weight_gradient, weighted_moments
from lightning_influence.estimators.diffin_sweep import DiffInSweep
from lightning_influence.evaluation import StepRecorder, leave_one_out
from lightning_influence.kernels import per_sample_loss_function, removal_losses, weighted_batch_loss

from conftest import quiet_trainer

import lightning as L


class BatchNormNet(InfluenceMixin, L.LightningModule):
    """A small digits classifier with batch norm: an MLP (``BatchNorm1d``) or a conv net (``BatchNorm2d``
    then ``BatchNorm1d``, one of them a cumulative average: ``momentum=None``)."""

    def __init__(self, kind: str = "mlp", lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        if kind == "mlp":
            self.body = nn.Sequential(nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))
        else:
            self.body = nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                nn.Linear(3 * 36, 12, bias=False), nn.BatchNorm1d(12, momentum=None), nn.Tanh(), nn.Linear(12, 10),
            )

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.body(x), y, reduction="none")

    def sample_ids(self, batch: Any) -> torch.Tensor:
        return batch[2]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class BatchCounter(L.Callback):
    """Counts the training batches that finished: 0 when a refusal comes before training."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1


def problem(n: int, batch_size: int, epochs: int, seed: int = 0) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    x, y = load_digits_tensors(torch.float64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    X, Y = x[perm[:n]], y[perm[:n]]
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        batches += [(X[order[i : i + batch_size]], Y[order[i : i + batch_size]], order[i : i + batch_size]) for i in range(0, n, batch_size)]
    val = [(x[perm[n : n + 100]], y[perm[n : n + 100]], torch.arange(100))]
    return batches, val


def target_loss(model: nn.Module, val: list[tuple[torch.Tensor, ...]]) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model.per_sample_loss(b) for b in val]).mean())  # type: ignore[operator]


def retrain(init: BatchNormNet, batches: list[tuple[torch.Tensor, ...]], remove: int | None = None, accumulate: int = 1) -> BatchNormNet:
    """Plain training loop: train-mode batch norm, ``remove`` taken out of every batch, the loss of a
    step's micro-batches summed with weight ``1 / accumulate`` (as Lightning accumulates)."""
    model = copy.deepcopy(init)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    for start in range(0, len(batches), accumulate):
        opt.zero_grad()
        for x, y, ids in batches[start : start + accumulate]:
            keep = ids != remove if remove is not None else torch.ones_like(ids, dtype=torch.bool)
            (model.per_sample_loss((x[keep], y[keep], ids[keep])).mean() / accumulate).backward()
        opt.step()
    return model


def fit(init: BatchNormNet, batches: list[tuple[torch.Tensor, ...]], callbacks: list[Any], accumulate: int = 1) -> BatchNormNet:
    model = copy.deepcopy(init)
    quiet_trainer(callbacks=callbacks, accumulate_grad_batches=accumulate).fit(model, train_dataloaders=FixedBatches(batches))
    return model


def loo(init: BatchNormNet, batches: list[tuple[torch.Tensor, ...]], val: list[tuple[torch.Tensor, ...]], ids: torch.Tensor, accumulate: int = 1) -> torch.Tensor:
    base = target_loss(retrain(init, batches, accumulate=accumulate), val)
    return torch.tensor([target_loss(retrain(init, batches, int(i), accumulate), val) - base for i in ids], dtype=torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def eval_target_gradients(model: BatchNormNet, val: list[tuple[torch.Tensor, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradient of the evaluation-mode target with respect to the parameters and to every batch-norm
    layer's running mean and variance, with each layer written out as ``(x - mean) / sqrt(var + eps) * w + b``."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = [t.detach().clone().requires_grad_(True) for m in layers for t in (m.running_mean, m.running_var)]

    def explicit(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        k = layers.index(layer)  # type: ignore[arg-type]
        x = inputs[0]
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - stats[2 * k].view(shape)) / torch.sqrt(stats[2 * k + 1].view(shape) + layer.eps)  # type: ignore[operator]
        return y * layer.weight.view(shape) + layer.bias.view(shape)  # type: ignore[union-attr, operator]

    handles = [m.register_forward_hook(explicit) for m in layers]
    model.eval()
    loss = torch.cat([model.per_sample_loss(b) for b in val]).mean()
    for h in handles:
        h.remove()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params + stats)
    return list(grads[: len(params)]), list(grads[len(params) :])


def running_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for t in (m.running_mean, m.running_var)]


def test_one_step_is_the_target_gradient_along_the_removal() -> None:
    """One optimizer step (SGD with momentum, a conv net with a BatchNorm2d of momentum 0.1 and a
    cumulative-average BatchNorm1d): the step itself is not linearised, so the score of z is exactly
    ``<dF/dtheta, theta_1^{-z} - theta_1> + <dF/dr, r_1^{-z} - r_1>`` with the changes of the parameters
    and of the running statistics taken from retraining without z (plain loop) and the gradients of the
    evaluation-mode target from autograd: the removal's effect on the batch statistics (through the
    coupled loss's gradient and through the running statistics) checked piece by piece."""
    torch.manual_seed(0)
    batches, val = problem(8, 8, 1)
    init = BatchNormNet("conv", lr=0.1, momentum=0.9).double()
    diffin = DiffIn(target="val", target_loader=val, batch_norm="batch", batch_norm_removal="exact")
    trained = fit(init, batches, [diffin])
    base = retrain(init, batches)
    assert all(torch.equal(a, b) for a, b in zip(running_stats(trained), running_stats(base)))
    g_theta, g_stats = eval_target_gradients(base, val)
    ids = batches[0][2]
    for i in ids:
        gone = retrain(init, batches, int(i))
        moved = sum(float((g * (a - b)).sum()) for g, a, b in zip(g_theta, gone.parameters(), base.parameters()))
        moved += sum(float((g * (a - b)).sum()) for g, a, b in zip(g_stats, running_stats(gone), running_stats(base)))
        assert abs(float(diffin.scores[int(i)]) - moved) < 1e-9 * abs(moved) + 1e-15, (int(i), float(diffin.scores[int(i)]), moved)


@pytest.mark.parametrize("removal", ["exact", "linear"])
@pytest.mark.parametrize(
    "kind, momentum, accumulate, bn_momentum",
    [("mlp", 0.9, 1, 0.01), ("mlp", 0.0, 2, 0.01), ("conv", 0.9, 1, None)],
    ids=["mlp-momentum", "mlp-accumulation", "conv-cumulative-average"],
)
def test_few_steps_match_leave_one_out_to_the_linearisation(
    kind: str, momentum: float, accumulate: int, bn_momentum: float | None, removal: str
) -> None:
    """Three steps at a small learning rate, where the linearised propagation is close to exact: the
    adjoints of the parameters, the optimizer state and the running statistics (carried through the
    later steps' updates, with the statistics' dependence on the parameters), against retraining.
    With a batch-norm momentum of 0.01 the running statistics move little and the prediction is
    close; the cumulative average (the first update replaces the statistics) leaves the target's
    curvature in them, a second-order error of a few percent. The exact removal on batches of 8; the
    linear one (sample weights) on batches of 32, where its own error is a few percent."""
    torch.manual_seed(0)
    size = 8 if removal == "exact" else 32
    batches, val = problem(3 * size * accumulate, size, 1)
    batches = batches[: 3 * accumulate]
    init = BatchNormNet(kind, lr=1e-3, momentum=momentum).double()
    if bn_momentum is not None:
        for m in init.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    diffin = DiffIn(target="val", target_loader=val, batch_norm="batch", batch_norm_removal=removal)
    fit(init, batches, [diffin], accumulate)
    ids = torch.cat([b[2] for b in batches]).unique()
    truth = loo(init, batches, val, ids, accumulate)
    scores = torch.stack([diffin.scores[int(i)] for i in ids])
    error = float((scores - truth).abs().max()) / float(truth.abs().max())
    if removal == "exact":
        assert error < (2e-3 if bn_momentum is not None else 0.1)
    else:  # first order in 1 / (b - 1) in the network after each batch norm (measured 0.026-0.030)
        assert error < 0.05
    assert spearman(scores, truth) > 0.99


def test_running_statistics_carry_most_of_the_effect() -> None:
    """The same one-step case scored in evaluation mode (``batch_norm="running"``) misses the removal's effect on the
    running statistics and on the batch statistics of the step: the batch-norm option is what fits."""
    torch.manual_seed(0)
    batches, val = problem(24, 8, 1)
    init = BatchNormNet("mlp", lr=1e-3).double()
    running = DiffIn(target="val", target_loader=val, batch_norm="running", name="r")
    batch = DiffIn(target="val", target_loader=val, batch_norm="batch", batch_norm_removal="exact", name="b")
    fit(init, batches[:1], [running, batch])
    ids = batches[0][2]
    truth = loo(init, batches[:1], val, ids)
    off = lambda cb: float((torch.stack([cb.scores[int(i)] for i in ids]) - truth).abs().max())  # noqa: E731
    assert off(batch) < 1e-2 * float(truth.abs().max())
    assert off(running) > 0.5 * float(truth.abs().max()) > 10 * off(batch)
    assert batch.scores.metadata["batch_norm"] == "batch" and running.scores.metadata["batch_norm"] == "running"


def test_fit_fidelity_against_retraining() -> None:
    """A digits MLP with batch norm, SGD lr 0.1, 30 steps of 16, float64: replay and online (a window of 8
    steps) against the library's leave-one-out retraining of 30 samples (each run with its own batch
    and running statistics), itself checked against the plain loop on three of them."""
    torch.manual_seed(0)
    batches, val = problem(160, 16, 3)
    init = BatchNormNet("mlp", lr=0.1).double()
    recorder = StepRecorder()
    replay = DiffIn(target="val", target_loader=val, batch_norm="batch", name="replay")
    exact = DiffIn(target="val", target_loader=val, batch_norm="batch", batch_norm_removal="exact", name="exact")
    online = DiffIn(target="val", target_loader=val, batch_norm="batch", mode="online", window=8, score_every=8, name="online")
    running = DiffIn(target="val", target_loader=val, batch_norm="running", name="running")
    model = fit(init, batches, [recorder, replay, exact, online, running])
    ids = torch.randperm(160, generator=torch.Generator().manual_seed(1))[:30]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, val)
    torch.testing.assert_close(truth[:3], loo(init, batches, val, ids[:3]), rtol=1e-6, atol=1e-12)
    callbacks = [("replay", replay), ("exact", exact), ("online", online), ("running", running)]
    rho = {name: spearman(torch.stack([cb.scores[int(i)] for i in ids]), truth) for name, cb in callbacks}
    assert replay.scores.metadata["batch_norm_removal"] == "linear" and exact.scores.metadata["batch_norm_removal"] == "exact"
    assert rho["replay"] >= 0.97 and rho["exact"] >= 0.97, rho
    assert rho["online"] >= 0.85, rho
    assert rho["replay"] > rho["running"] + 0.05, rho


def test_query_columns_and_spilled_steps_score_as_the_mean_target_in_memory(tmp_path: Any) -> None:
    """Each query column carries its own running-statistics adjoint: the mean of the columns is the
    score against the mean loss of the same samples; steps spilled to disk and rebuilt between
    checkpoints carry their batch-norm counters."""
    torch.manual_seed(0)
    batches, val = problem(48, 8, 2)
    queries = [(val[0][0][:3], val[0][1][:3], torch.arange(3))]
    init = BatchNormNet("conv", lr=0.05, momentum=0.9).double()
    mean = DiffIn(target="val", target_loader=queries, batch_norm="batch", name="mean")
    query = DiffIn(target="query", target_loader=queries, batch_norm="batch", name="query")
    spilled = DiffIn(target="val", target_loader=queries, batch_norm="batch", storage="disk", spill_dir=tmp_path, checkpoint_every=4, name="disk")
    fit(init, batches, [mean, query, spilled])
    size = float(mean.scores.values.abs().max())
    # the columns' Hessian products take finite-difference steps of their own: equal to their truncation error
    torch.testing.assert_close(query.scores.values.mean(dim=1), mean.scores.values, rtol=0, atol=1e-5 * size)
    torch.testing.assert_close(spilled.scores.values, mean.scores.values, rtol=0, atol=1e-9 * size)


class FrozenNorm(BatchNormNet):
    def on_train_epoch_start(self) -> None:
        self.body[1].eval()  # batch norm frozen: training normalises with the running statistics


class TwoForwards(BatchNormNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.body(batch[0])  # a second training-mode forward: the running statistics move twice
        return self.per_sample_loss(batch).mean()


def test_unmodelled_runs_are_refused() -> None:
    batches, val = problem(32, 8, 1)
    with pytest.raises(ValueError, match="batch_norm must be"):
        DiffIn(batch_norm="train")  # type: ignore[arg-type]
    exact = {"batch_norm_removal": "exact"}
    for kwargs in ({"coupled": False, **exact}, {"chunk_size": 4}, {"per_sample": "finite_difference", **exact}, {"batch_removal": "drop"}):
        with pytest.raises(ValueError, match="batch_norm='batch' scores each batch"):
            DiffIn(batch_norm="batch", **kwargs)
    with pytest.raises(ValueError, match="batch_norm_removal must be"):
        DiffIn(batch_norm_removal="sub-batches")  # type: ignore[arg-type]
    for kwargs in ({"coupled": True}, {"per_sample": "forward_mode"}):
        with pytest.raises(ValueError, match="batch_norm_removal='linear'.*rules out"):
            DiffIn(batch_norm_removal="linear", **kwargs)

    class NoNorm(BatchNormNet):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 10))

    with pytest.raises(ValueError, match="has none"):
        fit(NoNorm().double(), batches, [DiffIn(target="val", target_loader=val, batch_norm="batch")])
    synced = BatchNormNet().double()
    synced.body[1] = nn.SyncBatchNorm(16).double()
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        fit(synced, batches, [DiffIn(target="val", target_loader=val, batch_norm="batch")])
    with pytest.raises(ValueError, match="were in evaluation mode during training"):
        fit(FrozenNorm().double(), batches, [DiffIn(target="val", target_loader=val, batch_norm="batch")])
    with pytest.raises(ValueError, match="outside the recorded steps"):
        fit(TwoForwards().double(), batches, [DiffIn(target="val", target_loader=val, batch_norm="batch")])


@pytest.mark.parametrize("case", ["batch", "auto on frozen batch norm"])
def test_a_resumed_fit_gives_the_uninterrupted_scores(tmp_path: Any, case: str) -> None:
    """Replay and online (blocks of 4 steps) resumed from the last checkpoint of a shorter fit: the
    recorded steps carry their batch-norm counters, and the online flush reads the resumed running
    statistics, so the scores equal the uninterrupted fit's. ``"auto"`` on batch norm frozen from the
    first batch settles on ``"running"`` again in the resumed fit, before the setup is compared."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    batches, val = problem(48, 8, 1)
    make, mode = (BatchNormNet, "batch") if case == "batch" else (FrozenNorm, "auto")

    def run(folder: str, epochs: int, ckpt_path: Any = None, save: bool = False) -> list[DiffIn]:
        torch.manual_seed(0)
        model = make("mlp", lr=0.1, momentum=0.9).double()
        callbacks = [
            DiffIn(target="val", target_loader=val, batch_norm=mode, name="replay"),  # type: ignore[arg-type]
            DiffIn(target="val", target_loader=val, batch_norm=mode, mode="online", window=4, score_every=4, name="online"),  # type: ignore[arg-type]
        ]
        extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)] if save else []
        quiet_trainer(callbacks=[*callbacks, *extra], max_epochs=epochs, enable_checkpointing=save).fit(
            model, train_dataloaders=FixedBatches(batches), ckpt_path=ckpt_path
        )
        return callbacks

    straight = run("a", 3)
    run("b", 2, save=True)
    resumed = run("c", 3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(straight, resumed):
        assert a.steps_scored == b.steps_scored == 18
        assert a.scores.metadata["batch_norm"] == b.scores.metadata["batch_norm"] == ("batch" if case == "batch" else "running")
        torch.testing.assert_close(b.scores.values, a.scores.values, rtol=0, atol=1e-12)


class NoNormNet(BatchNormNet):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def test_auto_scores_batch_norm_as_trained_unless_the_run_rules_it_out() -> None:
    """The default ``batch_norm="auto"`` gives the scores of ``"batch"`` on a batch-norm model; an option
    that rules ``"batch"`` out falls back to ``"running"`` with a warning naming it; a model without batch
    norm is scored as before, without a warning."""
    import warnings

    torch.manual_seed(0)
    batches, val = problem(48, 8, 1)
    init = BatchNormNet("mlp", lr=0.05).double()
    auto, batch = DiffIn(target="val", target_loader=val, name="auto"), DiffIn(target="val", target_loader=val, batch_norm="batch", name="batch")
    fit(init, batches, [auto, batch])
    assert auto.scores.metadata["batch_norm"] == "batch"
    torch.testing.assert_close(auto.scores.values, batch.scores.values, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"has batch norm.*chunk_size=4.*batch_norm='running'"):
        chunked = DiffIn(target="val", target_loader=val, chunk_size=4)
        fit(init, batches, [chunked])
    assert chunked.scores.metadata["batch_norm"] == "running"
    plain = DiffIn(target="val", target_loader=val)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batch norm.*")
        fit(NoNormNet().double(), batches, [plain])
    assert plain.scores.metadata["batch_norm"] == "running"


class ClassWeighted(BatchNormNet):
    """Batches ``(x, y, w, ids)`` whose ``w`` holds 8 class weights (batches of 8): not
    per sample, yet with as many rows as the batch."""

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, w, _ = batch
        return F.cross_entropy(self.body(x), y, reduction="none") * w[y]

    def sample_ids(self, batch: Any) -> torch.Tensor:
        return batch[3]


class ClassWeightedRemoval(ClassWeighted):
    def remove_from_batch(self, batch: Any, index: int | torch.Tensor) -> Any:
        x, y, w, ids = batch
        keep = torch.arange(len(ids), device=ids.device) != index
        return x[keep], y[keep], w, ids[keep]


def test_a_remove_from_batch_that_drops_a_shared_tensor_is_refused() -> None:
    """Removal re-evaluates ``remove_from_batch(batch, i)``; the default also drops row ``i`` of the class
    weights, which would change every other sample's loss: refused at the first batch, in evaluation mode
    (each sample's loss its own there). A removal that keeps the weights whole is scored."""
    torch.manual_seed(0)
    x, y = load_digits_tensors(torch.float64)
    seven = torch.nonzero(y < 7).flatten()  # seven classes: a weight dropped shifts the others silently
    weights = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    weighted = [(x[seven[i : i + 8]], y[seven[i : i + 8]], weights, torch.arange(i, i + 8)) for i in range(0, 32, 8)]
    val = [(x[seven[100:200]], y[seven[100:200]], weights, torch.arange(100))]
    with pytest.raises(ValueError, match=r"has batch norm.*takes out more than the sample.*Override remove_from_batch"):
        fit(ClassWeighted().double(), weighted, [DiffIn(target="val", target_loader=val, batch_norm_removal="exact")])
    right = DiffIn(target="val", target_loader=val, batch_norm_removal="exact")
    init = ClassWeighted().double()
    removal = ClassWeightedRemoval().double()
    removal.load_state_dict(init.state_dict())
    fit(removal, weighted, [right])
    assert right.scores.metadata["batch_norm"] == "batch" and bool(torch.isfinite(right.scores.values).all())
    # The sample weights (the default) take the sample out of the batch-norm statistics only: no removal to get
    # wrong, and the scores of the exact removal to its linearisation in 1 / (b - 1) (b = 8 here)
    linear = DiffIn(target="val", target_loader=val)
    fit(init, weighted, [linear])
    assert linear.scores.metadata["batch_norm_removal"] == "linear"
    assert spearman(linear.scores.values, right.scores.values) > 0.97
    # A short last micro-batch would be removed exactly, through remove_from_batch, which takes out a class weight
    # too: found on the first batch, and such micro-batches are removed linearly, with a warning.
    short = [*weighted, (x[seven[32:35]], y[seven[32:35]], weights, torch.arange(32, 35))]
    with pytest.warns(UserWarning, match=r"takes out more than sample 0.*removed linearly like the others"):
        fallback = DiffIn(target="val", target_loader=val)
        fit(init, short, [fallback])
    assert fallback.scores.metadata["forward_mode_passes"] == 0 and bool(torch.isfinite(fallback.scores.values).all())


class FrozenLater(BatchNormNet):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step >= 6:
            self.body[1].eval()  # frozen from step 6 on: neither mode models the run


def test_auto_scores_batch_norm_frozen_throughout_in_evaluation_mode_exactly() -> None:
    """A frozen backbone's batch norm (evaluation mode from the first batch on) normalises with fixed
    running statistics: ``"auto"`` sees it at the first batch and scores it as ``"running"`` does, which
    is that run's linearisation (against the ground truth, which replays the layer's mode per step). Batch
    norm frozen only later is refused at the step where it shows, naming ``"running"``."""
    torch.manual_seed(0)
    batches, val = problem(96, 16, 2)
    init = FrozenNorm(lr=0.1).double()
    recorder = StepRecorder()
    auto, running = DiffIn(target="val", target_loader=val, name="auto"), DiffIn(target="val", target_loader=val, batch_norm="running", name="r")
    model = fit(init, batches, [recorder, auto, running])
    assert auto.scores.metadata["batch_norm"] == "running" and auto.scores.metadata["coupled"] is False
    torch.testing.assert_close(auto.scores.values, running.scores.values, rtol=0, atol=0)
    ids = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:30]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, val)
    assert spearman(torch.stack([auto.scores[int(i)] for i in ids]), truth) >= 0.99
    with pytest.raises(ValueError, match=r"were in evaluation mode during training at optimizer step 6.*Freeze all of them"):
        fit(FrozenLater().double(), batches, [DiffIn(target="val", target_loader=val)])


def test_batch_norm_without_running_statistics_is_scored_as_trained() -> None:
    """``track_running_stats=False`` everywhere: batch statistics in training and in evaluation, nothing
    carried; scored against the ground truth like the tracked case."""
    torch.manual_seed(0)
    batches, val = problem(96, 16, 2)
    init = BatchNormNet(lr=0.1).double()
    init.body[1] = nn.BatchNorm1d(16, track_running_stats=False).double()
    recorder, auto = StepRecorder(), DiffIn(target="val", target_loader=val)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "looks coupled" warning: the coupling is modelled
        warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|litlogger).*")
        model = fit(init, batches, [recorder, auto])
    assert auto.scores.metadata["batch_norm"] == "batch"
    ids = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:30]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, val)
    assert spearman(torch.stack([auto.scores[int(i)] for i in ids]), truth) >= 0.97


def test_a_one_sample_micro_batch_and_an_unused_layer_are_refused_with_the_way_out() -> None:
    torch.manual_seed(0)
    batches, val = problem(40, 8, 1)
    conv = BatchNormNet("conv").double()  # BatchNorm2d trains on one image (spatial statistics); its removal would not
    conv.body[6] = nn.BatchNorm1d(12).double()
    short = [*batches[:2], tuple(t[:1] for t in batches[2]), *batches[3:]]
    counter = BatchCounter()

    conv2d_only = BatchNormNet("conv").double()
    conv2d_only.body[6] = nn.Identity()
    with pytest.raises(ValueError, match=r"optimizer step 2 trained on a micro-batch of one sample.*drop_last=True.*batch_norm='running'"):
        fit(conv2d_only, short, [DiffIn(target="val", target_loader=val), counter])
    assert counter.batches == 2  # refused at that step, not after the rest of training

    class Unused(BatchNormNet):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.BatchNorm1d(4, affine=False)

    with pytest.raises(ValueError, match=r"did not run in per_sample_loss.*Remove the unused layer.*batch_norm='running'"):
        fit(Unused().double(), batches, [DiffIn(target="val", target_loader=val)])


def test_auto_falls_back_to_evaluation_mode_for_a_loader_whose_last_batch_is_too_short() -> None:
    """A shuffling loader over 34 samples in batches of 8 (``drop_last=False``): its last batch of two samples
    leaves ``BatchNorm1d`` one value per channel once one is removed, so ``"auto"`` scores in evaluation mode,
    says why at the first batch, and trains to the end; ``drop_last=True`` scores batch norm as trained."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import IndexedDataset

    x, y = load_digits_tensors(torch.float64)
    data = IndexedDataset(TensorDataset(x[:34], y[:34]))
    _, val = problem(32, 8, 1)
    for drop_last, expected in ((False, "running"), (True, "batch")):
        cb = DiffIn(target="val", target_loader=val)
        model = BatchNormNet().double()
        context = pytest.warns(UserWarning, match=r"last batch holds 2 sample.*drop_last=True") if not drop_last else contextlib.nullcontext()
        with context:
            quiet_trainer(callbacks=[cb]).fit(model, train_dataloaders=DataLoader(data, batch_size=8, shuffle=True, drop_last=drop_last))
        assert cb.scores.metadata["batch_norm"] == expected


def test_a_short_last_batch_that_batch_norm_can_still_normalise_is_warned_about() -> None:
    """A last batch of 3 (35 samples in batches of 8) is scored as trained, with a warning at the first batch
    that its removals move its statistics beyond the linearisation (README, 'Batch norm': the whole run's
    accuracy falls); with drop_last=True there is nothing to warn about."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import IndexedDataset

    x, y = load_digits_tensors(torch.float64)
    data = IndexedDataset(TensorDataset(x[:35], y[:35]))
    _, val = problem(32, 8, 1)
    for drop_last in (False, True):
        cb = DiffIn(target="val", target_loader=val)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(callbacks=[cb]).fit(BatchNormNet().double(), train_dataloaders=DataLoader(data, batch_size=8, drop_last=drop_last))
        short = [w for w in caught if "last batch holds 3 samples" in str(w.message)]
        assert cb.scores.metadata["batch_norm"] == "batch"
        assert len(short) == (0 if drop_last else 1) and all("drop_last=True" in str(w.message) for w in short)


def test_a_short_last_batch_is_found_from_the_sampler() -> None:
    """A SubsetRandomSampler of 258 of 288 samples leaves a last batch of 2, too few for BatchNorm1d once one is
    removed: "auto" falls back to evaluation mode at the first batch (before, read from the dataset's length,
    the fit trained to the end and the sweep refused it); 261 leave 5, warned about."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from lightning_influence import IndexedDataset

    x, y = load_digits_tensors(torch.float64)
    data = IndexedDataset(TensorDataset(x[:288], y[:288]))
    _, val = problem(32, 8, 1)
    for subset, expected, shown in ((258, "running", "2 sample(s)"), (261, "batch", "5 samples")):
        cb = DiffIn(target="val", target_loader=val)
        sampler = SubsetRandomSampler(list(range(subset)), generator=torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match=f"last batch holds {re.escape(shown)}"):
            quiet_trainer(callbacks=[cb], max_epochs=1).fit(BatchNormNet().double(), train_dataloaders=DataLoader(data, batch_size=32, sampler=sampler))
        assert cb.scores.metadata["batch_norm"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("case", ["adam-full-batch-converged", "sgd-cnn-400-steps"])
def test_float32_relu_batch_norm_runs_pass_the_recorded_gradient_checks(case: str) -> None:
    """Legitimate float32 ReLU models with batch norm, where the sweep's written-out batch norm rounds
    differently from training's kernels and flips a few units across their kinks: a full-batch Adam run to a
    loss of 2e-6 (the last gradients' norms 1e-5: a rounding difference is large against them, not against
    the run's) and a CNN over 400 SGD steps (rebuilt steps checked). Both were refused with LossChangedError."""
    x, y = load_digits_tensors(torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))

    class Net(InfluenceMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            if case.startswith("adam"):
                self.body = nn.Sequential(
                    nn.Linear(64, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(),
                    nn.Linear(256, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10),
                )
            else:
                self.body = nn.Sequential(
                    nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                    nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10),
                )

        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            return F.cross_entropy(self.body(batch[0]), batch[1], reduction="none")

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2) if case.startswith("adam") else torch.optim.SGD(self.parameters(), lr=0.05)

    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import IndexedDataset

    train = DataLoader(IndexedDataset(TensorDataset(x[perm[:64]], y[perm[:64]])), batch_size=64 if case.startswith("adam") else 32,
                       shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(IndexedDataset(TensorDataset(x[perm[64:164]], y[perm[64:164]])), batch_size=100)
    cb = DiffIn(target="val", target_loader=val)
    quiet_trainer(callbacks=[cb], max_epochs=1000 if case.startswith("adam") else 200).fit(Net(), train)
    assert cb.scores.metadata["recorded_gradient_checks"] >= 3


def test_auto_falls_back_to_evaluation_mode_under_16_mixed() -> None:
    """A step the 16-mixed gradient scaler skips moved the running statistics without an update DiffIn
    records: ``"auto"`` scores in evaluation mode there, and says why."""
    from lightning.pytorch.plugins import MixedPrecision

    batches, val = problem(32, 8, 1)
    to32 = lambda bs: [(b[0].float(), *b[1:]) for b in bs]  # noqa: E731
    cb = DiffIn(target="val", target_loader=to32(val))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # skips its first steps
    with pytest.warns(UserWarning, match=r"has batch norm.*precision='16-mixed'.*batch_norm='running'"):
        quiet_trainer(callbacks=[cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(
            BatchNormNet(), train_dataloaders=FixedBatches(to32(batches))
        )
    assert cb.scores.metadata["batch_norm"] == "running" and cb.scores.metadata["skipped_steps"] >= 1
    with pytest.raises(ValueError, match=r"batch_norm='batch'\) does not model precision='16-mixed'"):
        quiet_trainer(callbacks=[DiffIn(target="val", target_loader=to32(val), batch_norm="batch")], plugins=[MixedPrecision("16-mixed", "cpu")]).fit(
            BatchNormNet(), train_dataloaders=FixedBatches(to32(batches))
        )


def test_a_micro_batch_that_leaves_batch_norm_one_value_per_channel_is_named() -> None:
    """A batch of two samples through ``BatchNorm1d``: without one of them the layer has one value per
    channel. A fixed batch list says nothing about its last batch in advance; the sweep names the step."""
    batches, val = problem(34, 8, 1)  # the last batch holds two samples
    with pytest.raises(ValueError, match=r"optimizer step 4 trained on a micro-batch of 2 samples.*one value per channel.*drop_last=True"):
        fit(BatchNormNet().double(), batches, [DiffIn(target="val", target_loader=val)])


# ---------------------------------------------------------------------- the linear removal (sample weights)


@pytest.mark.parametrize("shape", [(8, 5), (8, 3, 4, 4), (5, 2, 7)], ids=["BatchNorm1d", "BatchNorm2d", "BatchNorm1d-length"])
def test_weighted_statistics_extrapolate_to_the_sub_batch_statistics_exactly(shape: tuple[int, ...]) -> None:
    """The running statistics' linear extrapolation from unit weights, ``-N / (N - 1) dS/dw_z``, is their
    value on the batch without ``z`` (computed directly: ``x.mean``, ``x.var`` of the sub-batch), and unit
    weights give the batch's own statistics; so is the closed form of ``dS/dw_z`` along an adjoint that the
    Hessian products' passes take (:func:`statistics_weight_gradient`)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    n, dims = shape[0], [0, *range(2, len(shape))]
    weights = torch.ones(n, dtype=torch.float64, requires_grad=True)
    stats = weighted_moments(x, weights)
    plain = (x.mean(dims), x.var(dims, unbiased=False), x.var(dims, unbiased=True))
    for k, stat in enumerate(stats):
        torch.testing.assert_close(stat, plain[k], rtol=0, atol=1e-13)
        if k == 1:  # normalisation's variance: a weighted mean, second order off (see weighted_moments)
            continue
        jacobian = torch.stack([torch.autograd.grad(stat[c], weights, retain_graph=True)[0] for c in range(stat.shape[0])], dim=1)
        for z in range(n):
            sub = torch.cat([x[:z], x[z + 1 :]])
            without = (sub.mean(dims), sub.var(dims, unbiased=False), sub.var(dims, unbiased=True))[k]
            torch.testing.assert_close(-n / (n - 1) * jacobian[z], without - plain[k], rtol=0, atol=1e-12)
    # the closed form the products' passes use, along an adjoint of the mean and the running variance
    w_mean, w_var = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    share = statistics_weight_gradient(x, w_mean, w_var)
    for z in range(n):
        sub = torch.cat([x[:z], x[z + 1 :]])
        change = w_mean @ (sub.mean(dims) - plain[0]) + w_var @ (sub.var(dims, unbiased=True) - plain[2])
        torch.testing.assert_close(-n / (n - 1) * share[z], change, rtol=0, atol=1e-12)


def test_removal_losses_are_the_losses_without_coupling_and_first_order_with_batch_norm() -> None:
    """Without batch norm the removal losses are the per-sample losses; with it, ``(L - v_z) / (b - 1)``
    predicts the mean loss of the batch without ``z`` (evaluated on the sub-batch) to first order in
    ``1 / (b - 1)``: the error shrinks faster than ``1 / b`` from b = 8 to 32, and ``mean v = L``."""
    torch.manual_seed(0)
    plain = BatchNormNet("mlp").double()
    plain.body[1] = nn.Identity()
    x, y = load_digits_tensors(torch.float64)
    for model, errors in ((plain, None), (BatchNormNet("conv").double(), {})):
        loss_fn = per_sample_loss_function(model)
        params = {n: p.detach() for n, p in model.named_parameters()}
        trace = BatchNormTrace(model) if errors is not None else None
        weighting = trace.sample_weighting if trace is not None else (lambda _: contextlib.nullcontext())
        mode = trace.batch_statistics_mode() if trace is not None else contextlib.nullcontext()
        with mode:
            for b in (8, 32):
                batch = (x[:b], y[:b], torch.arange(b))
                with torch.enable_grad():
                    losses, w, total = weighted_batch_loss(loss_fn, params, batch, weighting)
                    (by_weight,) = torch.autograd.grad(total, [w])
                v = removal_losses(total, w, by_weight)
                assert abs(float(v.mean() - total)) < 1e-12
                if errors is None:
                    torch.testing.assert_close(v, losses.detach(), rtol=0, atol=1e-12)
                    continue
                full = float(loss_fn(params, batch).mean())
                truth = torch.stack([loss_fn(params, (torch.cat([x[:z], x[z + 1 : b]]), torch.cat([y[:z], y[z + 1 : b]]), None)).mean() - full for z in range(b)])
                errors[b] = float(((total.detach() - v) / (b - 1) - truth).norm() / truth.norm())
    assert errors[32] < 0.03 and errors[32] < errors[8] / 4, errors  # measured 0.020 and 0.162


def test_linear_removal_of_one_step_against_retraining() -> None:
    """The one-step case of ``test_one_step_is_the_target_gradient_along_the_removal`` on batches of 32 with
    the default (linear) removal: the retrained change of the parameters and running statistics, read by
    the target's gradient, to a few percent (first order in 1 / (b - 1)); no sub-batch is evaluated."""
    torch.manual_seed(0)
    batches, val = problem(32, 32, 1)
    init = BatchNormNet("conv", lr=0.1, momentum=0.9).double()
    diffin = DiffIn(target="val", target_loader=val)
    fit(init, batches, [diffin])
    base = retrain(init, batches)
    g_theta, g_stats = eval_target_gradients(base, val)
    moved = []
    for i in batches[0][2]:
        gone = retrain(init, batches, int(i))
        change = sum(float((g * (a - b)).sum()) for g, a, b in zip(g_theta, gone.parameters(), base.parameters()))
        moved.append(change + sum(float((g * (a - b)).sum()) for g, a, b in zip(g_stats, running_stats(gone), running_stats(base))))
    truth = torch.tensor(moved, dtype=torch.float64)
    scores = torch.stack([diffin.scores[int(i)] for i in batches[0][2]])
    assert diffin.scores.metadata["batch_norm_removal"] == "linear" and diffin.scores.metadata["forward_mode_passes"] == 0
    assert float((scores - truth).norm() / truth.norm()) < 0.04  # measured 0.022
    assert spearman(scores, truth) > 0.99


class OtherOptimizer(BatchNormNet):
    """The batch-norm net trained with AdamW, or with SGD and weight decay (whose step scales the adjoint)."""

    def __init__(self, kind: str, optimizer: str) -> None:
        super().__init__(kind, lr=0.01 if optimizer == "adamw" else 0.1)
        self.optimizer = optimizer

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=0.05)


@pytest.mark.parametrize(
    ("kind", "optimizer", "accumulate", "scheme"),
    [
        ("mlp", "sgd", 1, "forward"), ("mlp", "momentum", 2, "central"), ("conv", "sgd", 2, "forward"), ("conv", "momentum", 1, "central"),
        ("conv", "adamw", 1, "central"), ("mlp", "weight-decay", 1, "forward"),
    ],
)
def test_running_statistics_folded_into_the_products_give_the_scores_of_their_own_pass(
    monkeypatch: pytest.MonkeyPatch, kind: str, optimizer: str, accumulate: int, scheme: str
) -> None:
    """The running statistics' part of each step (their adjoint and each sample's direct effect on
    them) taken with the step's Hessian product gives the scores of the separate gradient pass, which
    the retraining tests above check, to the products' finite-difference error (measured 4e-12 to
    9e-10 central, 4e-9 to 9e-8 forward, float64), for a mean and a query target, plain SGD, momentum,
    AdamW and weight decay, one or two micro-batches per step; and it replaces every pass but the oldest step's."""
    torch.manual_seed(0)
    batches, val = problem(96 * accumulate, 16, 2)
    queries = [(val[0][0][:3], val[0][1][:3], torch.arange(3))]
    if optimizer in ("adamw", "weight-decay"):
        init: BatchNormNet = OtherOptimizer(kind, optimizer).double()
    else:
        init = BatchNormNet(kind, lr=0.1, momentum=0.9 if optimizer == "momentum" else 0.0).double()
    steps = len(batches) // accumulate

    def scores(fold: bool) -> list[Any]:
        monkeypatch.setattr(DiffInSweep, "fold_statistics", fold)
        made = [DiffIn(target=t, target_loader=loader, finite_difference=scheme, name=t) for t, loader in (("val", val), ("query", queries))]
        fit(init, batches, made, accumulate)
        return [cb.scores for cb in made]

    folded, separate = scores(True), scores(False)
    for a, b in zip(folded, separate, strict=True):
        size = float(b.values.abs().max())
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=(1e-8 if scheme == "central" else 1e-6) * size)
        columns = 1 if b.values.dim() == 1 else b.values.shape[1]
        assert a.metadata["statistics_folds"] == (steps - 1) * columns and b.metadata["statistics_folds"] == 0
        assert a.metadata["statistics_passes"] == accumulate < b.metadata["statistics_passes"]


class ScheduledTemperature(BatchNormNet):
    """A loss with a temperature kept as a float and lowered every 6 steps: another function each time."""

    temperature = 3.0

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.body(x) / self.temperature, y, reduction="none")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.temperature = (3.0, 1.0, 0.3)[min(batch_idx // 6, 2)]


class SmoothedInTraining(BatchNormNet):
    """A loss that reads ``self.training``: label smoothing in training only."""

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.body(x), y, reduction="none", label_smoothing=0.4 if self.training else 0.0)


@pytest.mark.parametrize("removal", ["linear", "exact"])
def test_a_loss_that_changes_during_fit_is_refused_with_batch_norm_scored_as_trained(removal: str) -> None:
    """The sweep runs batch norm with batch statistics, as training did, so training's loss is the sweep's:
    the recorded gradients are checked (a float temperature lowered during fit: LossChangedError, as without
    batch norm; before, accepted and scored with Spearman 0.18 against the retraining of the run as trained)
    and so are the first batch's losses in both modes (a loss that reads self.training: refused; before,
    accepted and scored as the loss without smoothing). A loss that stays the same passes both checks."""
    from lightning_influence.estimators.diffin_sweep import LossChangedError

    batches, val = problem(96, 16, 3)
    with pytest.raises(LossChangedError, match="differs from the gradient training computed"):
        fit(ScheduledTemperature().double(), batches, [DiffIn(target="val", target_loader=val, batch_norm_removal=removal)])
    with pytest.raises(ValueError, match=r"reads self\.training.*batch statistics, as trained|batch statistics, as trained.*reads self\.training"):
        fit(SmoothedInTraining().double(), batches, [DiffIn(target="val", target_loader=val, batch_norm_removal=removal)])
    kept = DiffIn(target="val", target_loader=val, batch_norm_removal=removal)
    fit(BatchNormNet().double(), batches, [kept])
    assert kept.scores.metadata["batch_norm"] == "batch" and kept.scores.metadata["recorded_gradient_checks"] >= 2
    assert kept.scores.metadata["max_recorded_gradient_error"] < 1e-9


class FoldedSequence(BatchNormNet):
    """A batch-norm layer over ``[batch * length, channels]``: its rows are not the batch's samples."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 10))

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        h = self.body[2](self.body[1](self.body[0](x.reshape(-1, 8))))  # [B * 8, 6]
        return F.cross_entropy(self.body[3](h.reshape(len(x), 8, 6).mean(1)), y, reduction="none")


class NoisyNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.5  # a forward of its own


class Flipped(BatchNormNet):
    """The batch norm sees the rows in reverse order (and hands them back): the same function."""

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        h = self.body[1](self.body[0](x).flip(0)).flip(0)
        return F.cross_entropy(self.body[3](self.body[2](h)), y, reduction="none")


class InteriorReversed(BatchNormNet):
    """The batch norm sees the rows between the first and the last in reverse order."""

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        h = self.body[0](x)
        order = torch.cat([torch.tensor([0]), torch.arange(len(h) - 2, 0, -1), torch.tensor([len(h) - 1])])
        h = self.body[1](h[order])[order.argsort()]
        return F.cross_entropy(self.body[3](self.body[2](h)), y, reduction="none")


class Standardised(BatchNormNet):
    """Inputs standardised by a batch norm under ``no_grad`` (the same function as with autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs = nn.BatchNorm1d(64, affine=False)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        with torch.no_grad():
            x = self.inputs(x)
        return F.cross_entropy(self.body(x), y, reduction="none")


class SharedNorm(BatchNormNet):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        h = self.body[1](self.body[1](self.body[0](x)))  # one batch norm layer run twice per forward
        return F.cross_entropy(self.body[3](self.body[2](h)), y, reduction="none")


def test_linear_removal_refuses_what_the_sample_weights_cannot_model_at_the_first_batch() -> None:
    """Refused before training, naming ``batch_norm_removal="exact"``, which scores them: a layer whose rows
    are not the samples (a folded sequence), rows permuted before the batch norm, a batch norm whose
    output does not reach the loss through autograd. A batch-norm subclass with its own forward is not
    scored as trained at all (``"auto"`` falls back to ``"running"`` with a warning), and a layer run twice
    per forward is refused at the first batch under either removal. A module that couples its samples
    itself takes the exact removal under ``"auto"``."""
    torch.manual_seed(0)
    batches, val = problem(64, 16, 1)
    counter = BatchCounter()

    with pytest.raises(ValueError, match=r"received 128.*batch_norm_removal='exact'"):
        fit(FoldedSequence().double(), batches, [DiffIn(target="val", target_loader=val), counter])
    assert counter.batches == 0
    exact = DiffIn(target="val", target_loader=val, batch_norm_removal="exact")
    fit(FoldedSequence().double(), batches, [exact])
    assert exact.scores.metadata["batch_norm"] == "batch" and bool(torch.isfinite(exact.scores.values).all())
    for module in (Flipped(), InteriorReversed(), Standardised()):
        with pytest.raises(ValueError, match=r"(another order than the samples|does not reach the loss).*batch_norm_removal='exact'"):
            fit(module.double(), batches, [DiffIn(target="val", target_loader=val), counter])
        assert counter.batches == 0
    # the exact removal scores the flipped model as the plain one (the same function)
    flipped = DiffIn(target="val", target_loader=val, batch_norm_removal="exact", name="f")
    plain = DiffIn(target="val", target_loader=val, batch_norm_removal="exact", name="p")
    init = Flipped().double()
    fit(init, batches, [flipped])
    same = BatchNormNet().double()
    same.load_state_dict(init.state_dict())
    fit(same, batches, [plain])
    torch.testing.assert_close(flipped.scores.values, plain.scores.values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"ran twice in one per_sample_loss.*batch_norm='running'"):
        fit(SharedNorm().double(), batches, [DiffIn(target="val", target_loader=val), counter])
    assert counter.batches == 0
    noisy = BatchNormNet().double()
    noisy.body[1] = NoisyNorm(16).double()
    with pytest.warns(UserWarning, match=r"NoisyNorm, a batch-norm subclass with a forward of its own"):
        fallback = DiffIn(target="val", target_loader=val)
        fit(noisy, batches, [fallback])
    assert fallback.scores.metadata["batch_norm"] == "running"
    with pytest.raises(ValueError, match=r"a batch-norm subclass with a forward of its own"):
        fit(noisy, batches, [DiffIn(target="val", target_loader=val, batch_norm="batch"), counter])
    assert counter.batches == 0

    class Coupled(BatchNormNet):
        coupled_batch_loss = True

    auto = DiffIn(target="val", target_loader=val)
    fit(Coupled().double(), batches, [auto])
    assert auto.scores.metadata["batch_norm_removal"] == "exact" and auto.scores.metadata["coupled"] is True
    with pytest.raises(ValueError, match=r"declares coupled_batch_loss.*batch_norm_removal='exact'"):
        fit(Coupled().double(), batches, [DiffIn(target="val", target_loader=val, batch_norm_removal="linear")])


def test_linear_removal_takes_short_micro_batches_and_copies_as_they_are() -> None:
    """A last batch of 3 (fewer than ``LINEAR_REMOVAL_MIN_SAMPLES``) is removed exactly under the linear
    removal: its samples get the exact run's scores up to the other steps' linearisation (the first order
    in 1 / (b - 1) gave scores of the wrong sign on such a batch). A sampler drawing with
    replacement puts copies of a sample in a batch: the linear removal takes all of them out (against the
    ground truth, which retrains without every copy); the exact removal, which re-evaluates the batch
    without one position, is refused at the first batch."""
    torch.manual_seed(0)
    batches, val = problem(67, 16, 1)  # batches of 16, 16, 16, 16 and 3
    assert batches[-1][2].numel() == 3
    # plain SGD runs the in-place step (whose product moves the adjoint before the terms are read); momentum the general one
    for momentum in (0.0, 0.9):
        init = BatchNormNet("mlp", lr=0.1, momentum=momentum).double()
        linear = DiffIn(target="val", target_loader=val, name="linear")
        exact = DiffIn(target="val", target_loader=val, batch_norm_removal="exact", name="exact")
        fit(init, batches, [linear, exact])
        last = batches[-1][2]
        got = torch.stack([linear.scores[int(i)] for i in last])
        want = torch.stack([exact.scores[int(i)] for i in last])
        assert linear.scores.metadata["forward_mode_passes"] == 4  # the short batch's: one pass and three sub-batches
        assert float((got - want).norm() / want.norm()) < 0.05, (momentum, got, want)

    x, y = load_digits_tensors(torch.float64)
    dataset = TensorDataset(x[:48], y[:48], torch.arange(48))
    sampler = RandomSampler(dataset, replacement=True, num_samples=96, generator=torch.Generator().manual_seed(3))
    loader = lambda: DataLoader(dataset, batch_size=16, sampler=sampler)  # noqa: E731
    torch.manual_seed(0)
    init = BatchNormNet("mlp", lr=0.1).double()
    recorder, copies = StepRecorder(), DiffIn(target="val", target_loader=val)
    model = copy.deepcopy(init)
    torch.manual_seed(1)
    quiet_trainer(callbacks=[recorder, copies]).fit(model, train_dataloaders=loader())
    repeated = [b[2] for step in recorder.steps for b in step.batches if b[2].unique().numel() < b[2].numel()]
    assert repeated, "the sampler drew no copies into one batch"
    ids = copies.scores.ids
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, val)
    assert spearman(copies.scores.values, truth) > 0.95
    with pytest.raises(ValueError, match=r"draws with replacement.*batch_norm_removal='linear'"):
        torch.manual_seed(1)
        quiet_trainer(callbacks=[DiffIn(target="val", target_loader=val, batch_norm_removal="exact")]).fit(
            copy.deepcopy(init), train_dataloaders=loader()
        )


def test_explicit_batch_statistics_refuse_a_loader_whose_last_batch_is_too_short_before_training() -> None:
    x, y = load_digits_tensors(torch.float64)
    dataset = TensorDataset(x[:34], y[:34], torch.arange(34))  # batches of 8 and a last one of 2, BatchNorm1d
    counter = BatchCounter()

    val = [(x[200:300], y[200:300], torch.arange(100))]
    with pytest.raises(ValueError, match=r"last batch holds 2 sample\(s\).*drop_last=True"):
        quiet_trainer(callbacks=[DiffIn(target="val", target_loader=val, batch_norm="batch"), counter]).fit(
            BatchNormNet().double(), train_dataloaders=DataLoader(dataset, batch_size=8)
        )
    assert counter.batches == 0
