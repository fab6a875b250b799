"""The retraining ground truth against independent references: real ``Trainer.fit`` runs
(SGD with momentum, Adam, AdamW; schedulers, parameter groups, frozen parameters, gradient
clipping, gradient accumulation, skipped mixed-precision steps) and a plain Python loop with
autograd and a fresh real optimizer per run on a module copy (no vmap, no stacking)."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from types import SimpleNamespace
from collections.abc import Callable, Collection, Sequence
from typing import Any

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from conftest import quiet_trainer
from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.evaluation import (
    RETRAINABLE_OPTIMIZERS,
    OptimizerSpec,
    StepRecorder,
    TrainingStep,
    leave_one_out,
    optimizer_lrs,
    pearson,
    retrain,
    spearman,
    target_loss,
)
from lightning_influence.kernels import evaluation_mode
from lightning_influence.models import Classifier

Batch = tuple[Tensor, Tensor, Tensor]


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    x, y = load_digits_tensors(torch.float64)
    return x[:320], y[:320]


def fixed_batches(x: Tensor, y: Tensor, size: int = 16) -> list[Batch]:
    return [(x[i : i + size], y[i : i + size], torch.arange(i, i + size)) for i in range(0, len(x), size)]


def initial_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def fit(module: L.LightningModule, batches: list[Batch], **trainer_kwargs: Any) -> tuple[L.Trainer, StepRecorder]:
    recorder = StepRecorder()
    callbacks = [recorder, *trainer_kwargs.pop("callbacks", [])]
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=FixedBatches(batches))
    return trainer, recorder


def reference_run(
    module: nn.Module,
    initial: dict[str, Tensor],
    steps: Sequence[TrainingStep],
    spec: OptimizerSpec,
    removed: Collection[int] = (),
) -> dict[str, Tensor]:
    """Plain loop on a module copy, independent of the vectorised engine: a fresh real optimizer
    of the spec's class over the copy's own parameters; per step, for each micro-batch with
    samples left, ``(per_sample_loss(kept).mean() / normalizer).backward()`` (accumulating);
    an emptied step gets zero gradients; torch's own clip_grad_norm_ / clip_grad_value_;
    each group's lr set; ``optimizer.step()``."""
    model = copy.deepcopy(module)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    params = dict(model.named_parameters())
    groups = []
    for names, options in zip(spec.param_groups, spec.hyperparameters, strict=True):
        options = {k: (False if k in ("foreach", "fused", "capturable", "differentiable") else v) for k, v in options.items()}
        groups.append({**options, "params": [params[n] for n in names]})
    opt = spec.optimizer_class(groups)
    if isinstance(opt, torch.optim.Adagrad):  # a fresh Adagrad's accumulators start at its initial value
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["sum"] = torch.full_like(p, group["initial_accumulator_value"])
    trained = [p for names in spec.param_groups for n in names if (p := params[n]).requires_grad]
    removed_t = torch.tensor(sorted(removed), dtype=torch.long)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for x, y, idx in step.batches:
            keep = ~torch.isin(idx, removed_t)
            if bool(keep.any()):
                (model.per_sample_loss((x[keep], y[keep], idx[keep])).mean() / step.normalizer).backward()
        for p in trained:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if spec.clip_val is not None:
            if spec.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(trained, spec.clip_val)
            else:
                torch.nn.utils.clip_grad_value_(trained, spec.clip_val)
        for group, lr in zip(opt.param_groups, step.lrs, strict=True):
            group["lr"] = lr
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}


def reference_target(module: nn.Module, params: dict[str, Tensor], target: Sequence[Batch]) -> float:
    model = copy.deepcopy(module).eval()
    model.load_state_dict(params, strict=False)
    x = torch.cat([b[0] for b in target])
    y = torch.cat([b[1] for b in target])
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y, reduction="mean"))


def plain_sgd(groups: Sequence[Sequence[str]]) -> OptimizerSpec:
    return OptimizerSpec(torch.optim.SGD, tuple(map(tuple, groups)), tuple({"lr": 0.1} for _ in groups))


def schedule(
    x: Tensor, y: Tensor, n_steps: int = 14, pool: int = 48, size: int = 10, seed: int = 1, micro: int = 1
) -> list[TrainingStep]:
    """Random micro-batches drawn from a small pool (samples recur across steps) and two
    per-step varying learning rates (group 0: hidden layer, group 1: output layer)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for t in range(n_steps):
        batches = []
        for _ in range(1 if t % 3 == 2 else micro):  # every third step a shorter accumulation
            idx = torch.randperm(pool, generator=g)[:size]
            batches.append((x[idx], y[idx], idx))
        lrs = (0.3 * (1.0 + 0.5 * math.sin(t)), 0.05 + 0.02 * t)
        steps.append(TrainingStep(batches=tuple(batches), lrs=lrs, normalizer=micro))
    return steps


@pytest.fixture()
def small_mlp() -> tuple[Classifier, list[list[str]]]:
    torch.manual_seed(3)
    module = Classifier(hidden=(8,)).double()
    return module, [["net.0.weight", "net.0.bias"], ["net.2.weight", "net.2.bias"]]


def max_deviation(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    return max(float((a - expected[n]).abs().max()) for n, a in actual.items())


def assert_params_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-10) -> None:
    for n, a in actual.items():
        torch.testing.assert_close(a, expected[n], atol=atol, rtol=0.0, msg=lambda m, n=n: f"{n}: {m}")


def run_of(stacked: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    return {n: t[k] for n, t in stacked.items()}


# --- plain SGD (the original setting) -------------------------------------------------------


@pytest.mark.parametrize("hidden", [(16,), ()], ids=["mlp", "logreg"])
def test_no_removal_reproduces_lightning_fit(digits: tuple[Tensor, Tensor], hidden: tuple[int, ...]) -> None:
    x, y = digits
    batches = fixed_batches(x, y)
    torch.manual_seed(0)
    module = Classifier(hidden=hidden).double()
    initial = initial_of(module)
    trainer, recorder = fit(module, batches, max_epochs=2)
    assert len(recorder.steps) == 2 * len(batches) == trainer.global_step
    assert all(len(s.batches) == 1 and s.normalizer == 1 for s in recorder.steps)
    final = initial_of(module)
    spec = recorder.optimizer
    assert spec is not None and spec.optimizer_class is torch.optim.SGD and spec.clip_val is None
    assert sorted(n for g in spec.param_groups for n in g) == sorted(final)

    # runs 0 and 2 remove nothing; run 1 removes a sample, so the vmapped runs really differ
    out = retrain(module, initial, recorder.steps, spec, [(), (5,), ()])
    assert all(t.shape == (3, *final[n].shape) for n, t in out.items())
    for run in (0, 2):
        assert_params_close(run_of(out, run), final)
    assert max_deviation(run_of(out, 1), final) > 1e-6
    for n, p in module.named_parameters():  # the module itself is untouched
        assert torch.equal(p.detach(), final[n])


def test_removal_matches_plain_sgd_loop(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, groups = small_mlp
    x, y = digits
    steps = schedule(x, y)
    initial = initial_of(module)
    spec = plain_sgd(groups)
    removals: list[tuple[int, ...]] = [(0,), (7,), (), (13, 21), (40,)]
    # chunk_size 2: three chunks, the last one of a single run
    out = retrain(module, initial, steps, spec, removals, chunk_size=2)
    for k, removed in enumerate(removals):
        assert_params_close(run_of(out, k), reference_run(module, initial, steps, spec, removed), atol=1e-12)


def test_emptied_batch_does_not_move_parameters_under_plain_sgd(
    digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]
) -> None:
    module, groups = small_mlp
    x, y = digits
    initial = initial_of(module)
    spec = plain_sgd(groups)
    only_z = TrainingStep(batches=((x[[30]], y[[30]], torch.tensor([30])),), lrs=(0.5, 0.5))
    pair = TrainingStep(batches=((x[[31, 32]], y[[31, 32]], torch.tensor([31, 32])),), lrs=(0.5, 0.5))

    alone = retrain(module, initial, [only_z], spec, [(30,), ()])
    for n in alone:
        assert torch.equal(alone[n][0], initial[n])  # the emptied step is an exact no-op
        assert not torch.equal(alone[n][1], initial[n])  # while the full step moves

    steps = schedule(x, y, n_steps=6)
    with_empty = [steps[0], only_z, steps[1], pair, *steps[2:]]
    out = retrain(module, initial, with_empty, spec, [(30, 31, 32)])
    with pytest.warns(UserWarning, match="occur in no recorded step"):  # 31 and 32 were only in the emptied pair
        skipped = retrain(module, initial, [steps[0], steps[1], *steps[2:]], spec, [(30, 31, 32)])
    for n in out:
        assert torch.isfinite(out[n]).all()
        torch.testing.assert_close(out[n], skipped[n], atol=1e-12, rtol=0.0)
    assert_params_close(run_of(out, 0), reference_run(module, initial, with_empty, spec, (30, 31, 32)), atol=1e-12)


def test_leave_one_out_is_target_change_of_retraining(
    digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]
) -> None:
    module, groups = small_mlp
    x, y = digits
    steps = schedule(x, y, n_steps=10, micro=2)
    initial = initial_of(module)
    spec = OptimizerSpec(
        torch.optim.Adam, tuple(map(tuple, groups)), ({"lr": 0.01, "weight_decay": 1e-3}, {"lr": 0.01}), clip_val=1.0
    )
    target = [(x[200:207], y[200:207], torch.arange(200, 207)), (x[250:263], y[250:263], torch.arange(250, 263))]
    ids = [2, 9, 17, 33]
    scores = leave_one_out(module, initial, steps, spec, ids, iter(target), chunk_size=3)
    assert scores.dtype == torch.float64 and scores.shape == (len(ids),)

    base = reference_target(module, reference_run(module, initial, steps, spec), target)
    expected = [reference_target(module, reference_run(module, initial, steps, spec, (z,)), target) - base for z in ids]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0.0)
    assert float(scores.abs().min()) > 1e-8  # every one of these samples was trained on

    # a sample that never occurs would change nothing: its id is refused (a wrong id, not a ground truth of 0)
    with pytest.raises(ValueError, match=r"1 removed sample id\(s\) occur in no recorded step \(319\)"):
        leave_one_out(module, initial, steps, spec, torch.tensor([319]), target)


def test_target_loss_stacked_and_single(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, _ = small_mlp
    x, y = digits
    target = [(x[:5], y[:5], torch.arange(5)), (x[5:16], y[5:16], torch.arange(5, 16))]
    params = initial_of(module)
    stacked = {n: torch.stack([p, p + 0.01, p - 0.02]) for n, p in params.items()}
    values = target_loss(module, stacked, target, chunk_size=2)
    assert values.dtype == torch.float64 and values.shape == (3,)
    for k in range(3):
        single = run_of(stacked, k)
        assert target_loss(module, single, target).shape == ()
        assert float(target_loss(module, single, target)) == pytest.approx(reference_target(module, single, target), abs=1e-13)
        assert float(values[k]) == pytest.approx(reference_target(module, single, target), abs=1e-13)


# --- what Lightning really runs: optimizers, schedules, groups, clipping, accumulation ---------


class Configured(Classifier):
    """A 64-12-8-10 MLP with two parameter groups (different lrs), ``net.0.bias`` frozen but
    kept in group 0, ``net.4.bias`` trainable but in no group, and a per-step scheduler."""

    def __init__(self, make: Callable[[list[dict[str, Any]]], tuple[torch.optim.Optimizer, Any]], **kwargs: Any) -> None:
        super().__init__(hidden=(12, 8), **kwargs)
        self.make = make
        self.net[0].bias.requires_grad_(False)

    def configure_optimizers(self) -> Any:
        named = dict(self.named_parameters())
        groups = [
            {"params": [named["net.0.weight"], named["net.0.bias"]], "lr": 0.05},
            {"params": [named["net.2.weight"], named["net.2.bias"], named["net.4.weight"]], "lr": 0.02},
        ]
        opt, sched = self.make(groups)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _sgd(groups: list[dict[str, Any]]) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    warmup = lambda s: min(1.0, (s + 1) / 4) * 0.95**s  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [warmup, warmup])


def _adam(groups: list[dict[str, Any]]) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adam(groups, betas=(0.8, 0.99), weight_decay=1e-2)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-3)


def _adagrad(groups: list[dict[str, Any]]) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adagrad(groups, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)


def _rmsprop(groups: list[dict[str, Any]]) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.RMSprop(groups, alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-2)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-3)


def _adamw(groups: list[dict[str, Any]]) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(groups, amsgrad=True, weight_decay=0.05)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.02], total_steps=14, cycle_momentum=False)


class GradientProbe(Callback):
    """The pre-clipping gradient norm and largest entry at each step (Lightning clips after
    on_before_optimizer_step)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.maxima: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        self.maxima.append(max(float(g.abs().max()) for g in grads))


@pytest.mark.parametrize("clip", ["norm", "value"])
@pytest.mark.parametrize(
    "make",
    [_sgd, _adam, _adamw, _adagrad, _rmsprop],
    ids=["sgd-nesterov-wd", "adam-cosine", "adamw-amsgrad-onecycle", "adagrad-initial-accumulator", "rmsprop-centered"],
)
def test_retraining_reproduces_lightning_optimizers(digits: tuple[Tensor, Tensor], make: Callable, clip: str) -> None:
    x, y = digits
    batches = fixed_batches(x[:120], y[:120], size=12)  # 10 micro-batches: accumulation 3 leaves a last step of 1
    torch.manual_seed(0)
    module = Configured(make).double()
    initial = initial_of(module)
    clip_val = 0.2 if clip == "norm" else 0.02
    probe = GradientProbe()
    trainer, recorder = fit(
        module,
        batches,
        max_epochs=3,
        accumulate_grad_batches=3,
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=clip,
        callbacks=[probe],
    )
    final = initial_of(module)
    steps, spec = recorder.steps, recorder.optimizer
    assert spec is not None and spec.optimizer_class is type(trainer.optimizers[0])
    assert (spec.clip_val, spec.clip_algorithm) == (clip_val, clip)
    assert len(steps) == trainer.global_step == 3 * 4
    assert [len(s.batches) for s in steps] == [3, 3, 3, 1] * 3 and {s.normalizer for s in steps} == {3}
    assert len({s.lrs for s in steps}) == len(steps) and all(s.lrs[0] != s.lrs[1] for s in steps)  # scheduled, per group
    # clipping is active at most steps
    active = [n > clip_val for n in probe.norms] if clip == "norm" else [m > clip_val for m in probe.maxima]
    assert sum(active) >= len(steps) // 2

    out = retrain(module, initial, steps, spec, [()])
    assert set(out) == {"net.0.weight", "net.2.weight", "net.2.bias", "net.4.weight"}  # frozen / in no group: not trained
    deviation = max_deviation(run_of(out, 0), final)
    print(f"{make.__name__}/{clip}: max |retrained - Trainer| = {deviation:.2e}")
    assert deviation <= 1e-10
    assert torch.equal(final["net.0.bias"], initial["net.0.bias"]) and torch.equal(final["net.4.bias"], initial["net.4.bias"])
    # the reproduction depends on every ingredient: without clipping, or without normalising, it fails
    unclipped = retrain(module, initial, steps, dataclasses.replace(spec, clip_val=None), [()])
    assert max_deviation(run_of(unclipped, 0), final) > 1e-4
    unnormalised = [dataclasses.replace(s, normalizer=1) for s in steps]
    assert max_deviation(run_of(retrain(module, initial, unnormalised, spec, [()]), 0), final) > 1e-6

    # removals (one sample; two; all samples of a micro-batch) against the unvectorised loop
    assert max_deviation(reference_run(module, initial, steps, spec), final) <= 1e-10
    removals = [(3,), (), (15, 40), tuple(range(24, 36))]
    out = retrain(module, initial, steps, spec, removals, chunk_size=3)
    worst = 0.0
    for k, removed in enumerate(removals):
        expected = reference_run(module, initial, steps, spec, removed)
        worst = max(worst, max_deviation(run_of(out, k), {n: expected[n] for n in out}))
        if removed:
            assert max_deviation(run_of(out, k), final) > 1e-7
    stacked_baseline = max_deviation(run_of(out, 1), final)  # the unremoved run inside a chunk of 3
    print(f"{make.__name__}/{clip}: max |vectorised - reference loop| = {worst:.2e}, stacked baseline {stacked_baseline:.2e}")
    assert worst <= 1e-12 and stacked_baseline <= 1e-10


OPTIMIZER_OPTIONS: dict[type, list[dict[str, Any]]] = {
    torch.optim.SGD: [
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
        {"momentum": 0.5, "nesterov": True, "maximize": False},
    ],
    torch.optim.Adam: [{"amsgrad": True, "weight_decay": 1e-2}, {"betas": (0.5, 0.9), "eps": 1e-6}],
    torch.optim.AdamW: [{"amsgrad": True, "weight_decay": 0.1}, {"weight_decay": 0.0}],
    torch.optim.RMSprop: [{"momentum": 0.5, "centered": True, "weight_decay": 1e-2}, {"alpha": 0.9}],
    torch.optim.Adagrad: [{"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 1e-2}, {}],
    torch.optim.Adamax: [{"weight_decay": 1e-2}, {"betas": (0.5, 0.9)}],
    torch.optim.NAdam: [{"decoupled_weight_decay": True, "weight_decay": 1e-2}, {"momentum_decay": 0.01}],
    torch.optim.RAdam: [{"decoupled_weight_decay": True, "weight_decay": 1e-2}, {}],
}


@pytest.mark.parametrize("optimizer_class", RETRAINABLE_OPTIMIZERS, ids=lambda c: c.__name__)
def test_stacked_runs_equal_separate_real_optimizer_runs(
    digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]], optimizer_class: type
) -> None:
    """The premise of the vectorisation, checked per supported optimizer: one optimizer over
    parameters stacked [K, ...] is K independent runs (12 steps, 2 micro-batches, clipping)."""
    module, groups = small_mlp
    x, y = digits
    steps = [dataclasses.replace(s, lrs=(s.lrs[0] / 30, s.lrs[1] / 10)) for s in schedule(x, y, n_steps=12, micro=2)]
    initial = initial_of(module)
    spec = OptimizerSpec(optimizer_class, tuple(map(tuple, groups)), tuple(OPTIMIZER_OPTIONS[optimizer_class]), clip_val=0.5)
    removals = [(0,), (), (13, 21), (5, 40, 41)]
    out = retrain(module, initial, steps, spec, removals, chunk_size=3)
    for k, removed in enumerate(removals):
        assert_params_close(run_of(out, k), reference_run(module, initial, steps, spec, removed), atol=1e-12)
    assert max_deviation(run_of(out, 0), run_of(out, 1)) > 1e-7


def test_wholly_frozen_group_is_not_trained(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, groups = small_mlp
    x, y = digits
    module.net[0].requires_grad_(False)
    steps = schedule(x, y, n_steps=6, micro=2)
    initial = initial_of(module)
    spec = OptimizerSpec(torch.optim.Adam, tuple(map(tuple, groups)), ({"lr": 0.01}, {"lr": 0.02}), clip_val=0.1)
    out = retrain(module, initial, steps, spec, [(), (4,)])
    assert set(out) == set(groups[1])
    for k, removed in enumerate([(), (4,)]):
        assert_params_close(run_of(out, k), reference_run(module, initial, steps, spec, removed), atol=1e-12)


def test_skipped_mixed_precision_steps_are_not_recorded(digits: tuple[Tensor, Tensor]) -> None:
    """float16 autocast with a GradScaler whose initial scale overflows: the first steps are
    skipped (no update, no Adam step count) and must not be recorded."""
    from lightning.pytorch.plugins import MixedPrecision

    x, y = load_digits_tensors(torch.float32)
    batches = fixed_batches(x[:320], y[:320], size=16)

    class AdamClassifier(Classifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module = AdamClassifier(hidden=(8,))
    initial = {n: p.double() for n, p in initial_of(module).items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=1000)
    trainer, recorder = fit(module, batches, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert recorder.skipped_steps >= 1 and len(recorder.steps) >= 10
    assert adam_steps == {len(recorder.steps)} and len(recorder.steps) + recorder.skipped_steps == len(batches)
    # float16 autocast is not reproduced bit for bit, but the float64 retraining stays close
    reference = AdamClassifier(hidden=(8,)).double()
    steps = [dataclasses.replace(s, batches=tuple((b[0].double(), *b[1:]) for b in s.batches)) for s in recorder.steps]
    out = run_of(retrain(reference, initial, steps, recorder.optimizer, [()]), 0)
    final = {n: p.double() for n, p in initial_of(module).items()}
    moved = max_deviation(final, initial)
    print(f"16-mixed: {recorder.skipped_steps} skipped; max |retrained - Trainer| = {max_deviation(out, final):.2e}, moved {moved:.2e}")
    assert max_deviation(out, final) < 0.01 * moved  # well below one Adam step (lr 1e-3): no step too many or too few


# --- refusals ---------------------------------------------------------------------------------


def test_unsupported_optimizers_are_refused(small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, groups = small_mlp

    class MySGD(torch.optim.SGD):
        pass

    for opt in (
        torch.optim.LBFGS(module.parameters()),
        torch.optim.Adafactor(module.parameters()),
        torch.optim.Rprop(module.parameters()),
        MySGD(module.parameters(), lr=0.1),
    ):
        with pytest.raises(ValueError, match="elementwise per coordinate"):
            OptimizerSpec.from_optimizer(module, opt)
    with pytest.raises(ValueError, match="elementwise per coordinate"):
        OptimizerSpec(torch.optim.LBFGS, tuple(map(tuple, groups)), ({}, {}))
    with pytest.raises(ValueError, match="not a parameter of the module"):
        OptimizerSpec.from_optimizer(module, torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))


def test_optimizer_spec_from_optimizer(small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    module, groups = small_mlp
    opt = torch.optim.AdamW(
        [{"params": module.net[0].parameters(), "lr": 0.2}, {"params": module.net[2].parameters(), "weight_decay": 0.0}],
        lr=0.1,
        betas=(0.8, 0.9),
    )
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # adds 'initial_lr': not an optimizer option
    spec = OptimizerSpec.from_optimizer(module, LightningOptimizer(opt), 0.0, None)
    assert spec.optimizer_class is torch.optim.AdamW and spec.param_groups == tuple(map(tuple, groups))
    assert spec.hyperparameters[0]["betas"] == (0.8, 0.9) and spec.hyperparameters[1]["weight_decay"] == 0.0
    assert all("params" not in h and "initial_lr" not in h for h in spec.hyperparameters)
    assert spec.clip_val is None and spec.clip_algorithm == "norm"  # Lightning: <= 0 means no clipping
    assert optimizer_lrs(opt) == (0.1, 0.05) == optimizer_lrs(LightningOptimizer(opt))
    clipped = OptimizerSpec.from_optimizer(module, opt, 2, "value")
    assert (clipped.clip_val, clipped.clip_algorithm) == (2.0, "value")
    with pytest.raises(ValueError, match="'norm' or 'value'"):
        OptimizerSpec.from_optimizer(module, opt, 1.0, "inf")
    with pytest.raises(ValueError, match="finite positive"):
        dataclasses.replace(spec, clip_val=-1.0)
    with pytest.raises(ValueError, match="does not take"):
        OptimizerSpec(torch.optim.SGD, (("net.0.weight",),), ({"betas": (0.9, 0.9)},))
    with pytest.raises(ValueError, match="more than one parameter group"):
        OptimizerSpec(torch.optim.SGD, (("net.0.weight",), ("net.0.weight",)), ({}, {}))


def test_retrain_rejects_what_it_cannot_reproduce(digits: tuple[Tensor, Tensor], small_mlp: tuple[Classifier, list[list[str]]]) -> None:
    module, groups = small_mlp
    x, y = digits
    steps = schedule(x, y, n_steps=2)
    initial = initial_of(module)
    with pytest.raises(ValueError, match="2 learning rates for 1 parameter groups"):
        retrain(module, initial, steps, plain_sgd([groups[0] + groups[1]]), [()])
    with pytest.raises(ValueError, match="not a parameter"):
        retrain(module, initial, steps, plain_sgd([["net.9.weight"], groups[1]]), [()])
    with pytest.raises(TypeError, match="OptimizerSpec"):
        retrain(module, initial, steps, groups, [()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a TrainingStep"):
        retrain(module, initial, [(steps[0].batches[0], steps[0].lrs)], plain_sgd(groups), [()])  # type: ignore[list-item]

    dropout = Classifier(hidden=(8,)).double()
    dropout.net.insert(1, nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        retrain(dropout, initial_of(dropout), steps, plain_sgd([["net.0.weight", "net.0.bias"], ["net.3.weight", "net.3.bias"]]), [()])

    with pytest.raises(ValueError, match="normalizer"):
        TrainingStep(batches=steps[0].batches, lrs=(0.1,), normalizer=0)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        TrainingStep(batches=(), lrs=(0.1,))
    with pytest.raises(TypeError, match="tuple of micro-batches"):
        TrainingStep(batches=steps[0].batches[0][0], lrs=(0.1,))  # type: ignore[arg-type]


def test_recorder_refuses_runs_it_cannot_reproduce(digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    batches = fixed_batches(x[:64], y[:64])

    class Manual(Classifier):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.automatic_optimization = False

    class CycledMomentum(Classifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycles momentum
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Unused(Classifier):
        def __init__(self) -> None:
            super().__init__(hidden=(8,))
            self.spare = nn.Parameter(torch.zeros(3))

    class OwnClipping(Classifier):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
            pass

    cases = [
        (Manual, "manual optimization"),
        (CycledMomentum, "momentum: 0.95 -> "),
        (Unused, "received no gradient"),
        (OwnClipping, "configure_gradient_clipping"),
    ]
    for cls, message in cases:
        module = cls(hidden=(8,)).double() if cls is not Unused else cls().double()
        with pytest.raises(ValueError, match=message):
            fit(module, batches)

    # Lightning itself refuses several optimizers under automatic optimization; the recorder too
    module = Classifier(hidden=(8,)).double()
    two = [torch.optim.SGD(module.net[0].parameters(), lr=0.1), torch.optim.SGD(module.net[2].parameters(), lr=0.1)]
    with pytest.raises(ValueError, match="exactly one optimizer"):
        StepRecorder().on_fit_start(SimpleNamespace(optimizers=two), module)  # type: ignore[arg-type]

    # a run that does not start from a fresh optimizer (resumed) is refused at its first step
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    module.per_sample_loss(batches[0]).mean().backward()
    opt.step()
    trainer = SimpleNamespace(optimizers=[opt], gradient_clip_val=None, gradient_clip_algorithm=None, accumulate_grad_batches=1, precision="64-true")
    recorder = StepRecorder()
    recorder.on_fit_start(trainer, module)  # type: ignore[arg-type]
    recorder.on_train_batch_start(trainer, module, batches[0], 0)  # type: ignore[arg-type]
    module.per_sample_loss(batches[0]).mean().backward()  # the micro-batch's backward
    with pytest.raises(ValueError, match="already has state"):
        recorder.on_before_optimizer_step(trainer, module, opt)  # type: ignore[arg-type]


# --- correlation metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_metrics_match_scipy(ties: bool) -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=60)
    scores = 0.6 * truth + rng.normal(size=60)
    if ties:
        truth, scores = np.round(truth, 1), np.round(scores)
    assert spearman(torch.from_numpy(scores), torch.from_numpy(truth)) == pytest.approx(
        scipy.stats.spearmanr(scores, truth).statistic, abs=1e-6
    )
    assert pearson(scores.tolist(), truth.tolist()) == pytest.approx(scipy.stats.pearsonr(scores, truth).statistic, abs=1e-12)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("scores", "truth", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([1.0, 2.0], [2.0, 1.0], "at least 3"),
        ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "non-finite"),
        ([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0], "non-finite"),
        ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], "constant"),
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], "1-D"),
    ],
)
@pytest.mark.parametrize("metric", [spearman, pearson])
def test_metrics_reject_bad_input(metric: Any, scores: Any, truth: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metric(scores, truth)


class _GRUClassifier(Classifier):
    """A GRU over 8 steps of 8 digit pixels: ``aten::gru`` has no vmap batching rule."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.net = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.rnn(x.reshape(-1, 8, 8))[0][:, -1])


def test_models_without_batching_rules_are_retrained_run_by_run(digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    torch.manual_seed(0)
    module = _GRUClassifier().double()
    groups = [[n for n, _ in module.named_parameters()]]
    steps = [TrainingStep(batches=(s.batches[0],), lrs=(0.3,)) for s in schedule(x, y, n_steps=6)]
    initial = initial_of(module)
    spec = plain_sgd(groups)
    removals: list[tuple[int, ...]] = [(0,), (), (13, 21)]
    out = retrain(module, initial, steps, spec, removals, chunk_size=2)
    for k, removed in enumerate(removals):
        assert_params_close(run_of(out, k), reference_run(module, initial, steps, spec, removed), atol=1e-12)
    losses = target_loss(module, out, [(x[:20], y[:20], torch.arange(20))])
    for k in range(len(removals)):
        torch.testing.assert_close(losses[k], target_loss(module, run_of(out, k), [(x[:20], y[:20], torch.arange(20))]))


def test_float32_target_batches_of_a_64_true_fit_are_evaluated_as_training_saw_them(digits: tuple[Tensor, Tensor]) -> None:
    """precision="64-true" converts the float32 batches its loops feed the module to float64; the
    target batches given to leave_one_out are converted alike (before: a raw dtype error from the
    vmapped forward), with the same result as float64 target batches."""
    x, y = digits
    batches = fixed_batches(x.float(), y)[:6]
    torch.manual_seed(0)
    module = Classifier(hidden=(8,))
    initial = {n: p.detach().clone().double() for n, p in module.named_parameters()}
    _, recorder = fit(module, batches, precision="64-true")
    target32 = [(x[200:260].float(), y[200:260])]
    target64 = [(x[200:260], y[200:260])]
    ids = [0, 5, 17]
    widened = leave_one_out(module, initial, recorder.steps, recorder.optimizer, ids, target32)
    exact = leave_one_out(module, initial, recorder.steps, recorder.optimizer, ids, target64)
    torch.testing.assert_close(widened, exact, rtol=0, atol=0)
    assert float(exact.abs().max()) > 0


# --- models torch.func cannot evaluate; the same function as the differentiable path ---------------


def token_batches(n: int = 32, length: int = 6, vocab: int = 10, size: int = 8, seed: int = 0) -> list[Batch]:
    """Right-padded token sequences (0 = padding, lengths 2..length) with binary labels, ids 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    for i in range(n):
        tokens[i, lengths[i] :] = 0
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.arange(n)
    return [(tokens[i : i + size], labels[i : i + size], ids[i : i + size]) for i in range(0, n, size)]


class _PackedLSTM(Classifier):
    """An LSTM fed with ``pack_padded_sequence`` (padded text): vmap cannot batch ``_pack_padded_sequence``
    and ``torch.func.grad`` cannot run the packed LSTM ("Cannot access data pointer of Tensor that
    doesn't have storage"), while plain autograd can."""

    def __init__(self) -> None:
        super().__init__(in_features=4, num_classes=2, hidden=())
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.drop_last_loss = False

    def per_sample_loss(self, batch: Any) -> Tensor:
        tokens, labels = batch[0], batch[1]
        lengths = (tokens != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        losses = nn.functional.cross_entropy(self.net(h[-1]), labels, reduction="none")
        return losses[:-1] if self.drop_last_loss else losses


def grad_enabled_target(module: nn.Module, params: dict[str, Tensor], target: Sequence[Any]) -> float:
    """The mean per-sample target loss in evaluation mode as the estimators compute it: with gradients
    enabled, on a module copy whose parameters require them."""
    model = copy.deepcopy(module).eval()
    model.load_state_dict(params, strict=False)
    assert all(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        return float(torch.cat([model.per_sample_loss(b) for b in target]).mean().detach())


def test_packed_sequence_lstm_is_retrained_run_by_run_as_the_sequential_reference() -> None:
    """Before: a misleading refusal blaming activation checkpointing (the fallback to one run at a time
    depended on the wording of vmap's error)."""
    batches = token_batches()
    steps = [TrainingStep(batches=(b,), lrs=(0.1,)) for _ in range(2) for b in batches]
    torch.manual_seed(0)
    module = _PackedLSTM().double()
    initial = initial_of(module)
    spec = OptimizerSpec(torch.optim.Adam, (tuple(initial),), ({"lr": 0.01},))
    removals: list[tuple[int, ...]] = [(0,), (), (3, 9, 30)]
    out = retrain(module, initial, steps, spec, removals, chunk_size=2)
    for k, removed in enumerate(removals):
        assert_params_close(run_of(out, k), reference_run(module, initial, steps, spec, removed), atol=1e-12)

    target = token_batches(n=12, size=5, seed=1)
    ids = [0, 5, 17]
    scores = leave_one_out(module, initial, steps, spec, ids, target, chunk_size=2)
    base = grad_enabled_target(module, reference_run(module, initial, steps, spec), target)
    retrained = [reference_run(module, initial, steps, spec, (z,)) for z in ids]
    expected = [grad_enabled_target(module, params, target) - base for params in retrained]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0.0)
    assert float(scores.abs().min()) > 1e-8


def test_errors_the_run_by_run_evaluation_raises_too_keep_their_message() -> None:
    """The model's own error surfaces as itself, not as vmap's (or as advice about checkpointing)."""
    batches = token_batches()
    steps = [TrainingStep(batches=(b,), lrs=(0.1,)) for b in batches]
    torch.manual_seed(0)
    module = _PackedLSTM().double()
    initial = initial_of(module)
    module.drop_last_loss = True  # one loss too few: the retraining's own check of the loss shape
    message = r"per_sample_loss returned shape \(7,\) at step 0 \(micro-batch 0\)"
    with pytest.raises(ValueError, match=message) as caught:
        retrain(module, initial, steps, plain_sgd([list(initial)]), [(), (1,)])
    assert caught.value.__context__ is None and caught.value.__cause__ is None


class _PaddedTransformer(Classifier):
    """A two-layer TransformerEncoder with a key padding mask, mean-pooled over all positions (padding
    included): in evaluation mode without gradients PyTorch's fast path (nested tensors) returns zeros at
    the padded positions, a different function from the one gradients go through."""

    def __init__(self) -> None:
        super().__init__(in_features=8, num_classes=2, hidden=())
        self.emb = nn.Embedding(10, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.enc = nn.TransformerEncoder(layer, 2)
        self.fail = False

    def per_sample_loss(self, batch: Any) -> Tensor:
        if self.fail:
            raise RuntimeError("the loss failed")
        tokens, labels = batch[0], batch[1]
        h = self.enc(self.emb(tokens), src_key_padding_mask=tokens == 0)
        return nn.functional.cross_entropy(self.net(h.mean(1)), labels, reduction="none")


def test_target_loss_is_the_differentiable_function_not_the_attention_fast_path() -> None:
    torch.manual_seed(0)
    module = _PaddedTransformer().double()
    target = token_batches(n=12, size=6, length=8, seed=1)
    params = initial_of(module)
    differentiable = grad_enabled_target(module, params, target)
    assert torch.backends.mha.get_fastpath_enabled()
    with evaluation_mode(module), torch.no_grad(), warnings.catch_warnings():  # what the ground truth computed before
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        fast = float(torch.cat([module.per_sample_loss(b) for b in target]).mean())
    assert abs(fast - differentiable) > 1e-4  # the fast path really is another function here

    assert float(target_loss(module, params, target)) == pytest.approx(differentiable, abs=1e-12)
    stacked = {n: torch.stack([p, p + 0.01]) for n, p in params.items()}
    values = target_loss(module, stacked, target)
    for k in range(2):
        assert float(values[k]) == pytest.approx(grad_enabled_target(module, run_of(stacked, k), target), abs=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored

    module.fail = True
    with pytest.raises(RuntimeError, match="the loss failed"):
        target_loss(module, params, target)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after an error as well
    module.fail = False
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        target_loss(module, params, target)
        assert not torch.backends.mha.get_fastpath_enabled()  # restored to what it was, not switched on
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_leave_one_out_of_a_padded_transformer_is_that_of_the_differentiable_loss() -> None:
    batches = token_batches(n=24, length=8)
    steps = [TrainingStep(batches=(b,), lrs=(0.05,)) for b in batches]
    torch.manual_seed(0)
    module = _PaddedTransformer().double()
    initial = initial_of(module)
    spec = plain_sgd([list(initial)])
    target = token_batches(n=12, size=6, length=8, seed=1)
    ids = [0, 9, 20]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's fallback for attention kernels without a batching rule
        scores = leave_one_out(module, initial, steps, spec, ids, target)
    base = grad_enabled_target(module, reference_run(module, initial, steps, spec), target)
    retrained = [reference_run(module, initial, steps, spec, (z,)) for z in ids]
    expected = [grad_enabled_target(module, params, target) - base for params in retrained]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0.0)
    assert torch.backends.mha.get_fastpath_enabled()
