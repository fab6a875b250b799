"""Optimizers that are not what they seem, or whose state or options change during fit: each is
either scored as it really ran or refused at the step where it shows, never modelled as something
else."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import quiet_trainer
from lightning_influence import DiffIn, TracIn
from lightning_influence.callbacks.checkpoints import ParameterCheckpoints
from lightning_influence.evaluation import StepRecorder
from lightning_influence.models import Classifier
from lightning_influence.optimizers import UnsupportedOptimizer


def _fit(problem, *callbacks, model, **trainer_kwargs):
    torch.manual_seed(0)
    quiet_trainer(callbacks=list(callbacks), **trainer_kwargs).fit(model, train_dataloaders=problem.train)
    return model


def _model(kind=None, **options):
    torch.manual_seed(0)
    return (kind or Classifier)(**{"hidden": (16,), "lr": 0.1, **options}).double()


# ---------------------------------------------------------------- the state changed between steps
class _StateReset(Callback):
    """A "restart": the optimizer's state cleared (or its momentum zeroed in place) at step 8."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != 8:
            return
        optimizer = trainer.optimizers[0]
        if self.how == "clear":
            optimizer.state.clear()
        else:
            for state in optimizer.state.values():
                state["momentum_buffer"].zero_()


@pytest.mark.parametrize("how", ["clear", "zero_in_place"])
@pytest.mark.parametrize("owner", ["DiffIn", "StepRecorder"])
def test_an_optimizer_state_reset_between_steps_is_refused_naming_the_step(small_digits, how, owner):
    """DiffIn (and the retraining recorder) model the state each step starts from as the one the
    previous step left: a reset momentum would be carried back through as if it had continued
    (QA: scores 2x too large, the recorder's retraining likewise, with no warning)."""
    watcher = DiffIn(target="val", target_loader=small_digits.val) if owner == "DiffIn" else StepRecorder()
    model = _model(optimizer_options={"momentum": 0.9})
    with pytest.raises(ValueError, match=rf"{owner}: the optimizer's state changed between optimizer steps 7 and 8 .*outside optimizer.step"):
        _fit(small_digits, watcher, _StateReset(how), model=model)
    # the same run without the reset is accepted, and TracIn (first order, no state) takes it as it is
    _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), model=_model(optimizer_options={"momentum": 0.9}))
    _fit(small_digits, TracIn(target="val", target_loader=small_digits.val), _StateReset(how), model=_model(optimizer_options={"momentum": 0.9}))


# ---------------------------------------------------------------- a stateful option switched on later
class _MomentumLater(Classifier):
    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 8:
            self.trainer.optimizers[0].param_groups[0]["momentum"] = 0.9


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_momentum_switched_on_mid_fit_is_refused(small_digits, checkpoint_every):
    """SGD built without momentum records no momentum buffer; momentum set later by a hook or a
    scheduler was modelled as plain SGD (QA: scores 4x too small with checkpoint_every=1)."""
    cb = DiffIn(target="val", target_loader=small_digits.val, checkpoint_every=checkpoint_every)
    with pytest.raises(UnsupportedOptimizer, match=r"momentum=0.9 in parameter group 0 of SGD, but no group had momentum when the fit started"):
        _fit(small_digits, cb, model=_model(_MomentumLater))


# ---------------------------------------------------------------- wrappers are not their inner optimizer
class _Lookahead(torch.optim.Optimizer):
    """Keeps the inner optimizer in ``.optimizer`` (as torch_optimizer's Lookahead does) and
    interpolates towards slow weights every k steps: not the inner optimizer's update."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        super().__init__(optimizer.param_groups, dict(optimizer.defaults))
        self.optimizer, self.k, self.alpha, self.n = optimizer, k, alpha, 0
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.n += 1
        if self.n % self.k == 0:
            for p, s in zip([p for g in self.param_groups for p in g["params"]], self.slow):
                s.add_(p - s, alpha=self.alpha)
                p.copy_(s)
        return loss


class _NoOptimizerInit(torch.optim.Optimizer):
    """A wrapper whose __init__ skips torch.optim.Optimizer.__init__ (no step hooks)."""

    def __init__(self, optimizer):  # noqa: D107 - deliberately no super().__init__
        self.optimizer, self.param_groups, self.defaults, self.state = optimizer, optimizer.param_groups, optimizer.defaults, optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()


class _Wrapped(Classifier):
    wrapper = _Lookahead

    def configure_optimizers(self):
        return self.wrapper(torch.optim.SGD(self.parameters(), lr=self.lr))


class _WrappedNoInit(_Wrapped):
    wrapper = _NoOptimizerInit


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_an_optimizer_wrapper_is_not_modelled_as_the_optimizer_it_wraps(small_digits, checkpoint_every):
    cb = DiffIn(target="val", target_loader=small_digits.val, checkpoint_every=checkpoint_every)
    with pytest.raises(UnsupportedOptimizer, match="does not model optimizer _Lookahead"):
        _fit(small_digits, cb, model=_model(_Wrapped))


@pytest.mark.parametrize("owner", ["DiffIn", "TracIn", "ParameterCheckpoints"])
def test_a_wrapper_without_step_hooks_is_refused_clearly(small_digits, owner):
    callback = {
        "DiffIn": lambda: DiffIn(target="val", target_loader=small_digits.val),
        "TracIn": lambda: TracIn(target="val", target_loader=small_digits.val),
        "ParameterCheckpoints": lambda: ParameterCheckpoints(every=4),
    }[owner]()
    expected = "does not model optimizer _NoOptimizerInit" if owner == "DiffIn" else "_NoOptimizerInit does not have .*torch.optim.Optimizer.__init__"
    with pytest.raises(UnsupportedOptimizer, match=expected):
        _fit(small_digits, callback, model=_model(_WrappedNoInit))


# ---------------------------------------------------------------- maximize
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tracin_flips_the_sign_of_an_ascent_step(small_digits, optimizer):
    """maximize=True steps along +lr * gradient: the first step's first-order change has the
    opposite sign (QA: every score had the wrong sign, Pearson -0.96 against leave-one-out)."""
    scores = []
    for maximize in (False, True):
        cb = TracIn(target="val", target_loader=small_digits.val)
        _fit(small_digits, cb, model=_model(optimizer=optimizer, lr=1e-3, optimizer_options={"maximize": maximize}), max_steps=1)
        scores.append(cb.scores)
    assert scores[0].ids.numel() == 16 and (scores[0].values != 0).all()
    torch.testing.assert_close(scores[1].values, -scores[0].values, rtol=1e-12, atol=0)
    # plain SGD ascent is still lr times the gradient: only the batch's re-averaging is missing (never calibrated)
    assert scores[1].metadata["calibrated"] is False and ("the run used" in scores[1].metadata["units"]) is (optimizer != "sgd")


def test_parameter_checkpoints_refuse_an_ascent(small_digits):
    with pytest.raises(ValueError, match=r"parameter group\(s\) \[0\] of the optimizer have maximize=True .*model descent steps"):
        _fit(small_digits, ParameterCheckpoints(every=4), model=_model(optimizer_options={"maximize": True}))


# ---------------------------------------------------------------- the optimizer's own arithmetic fails
def test_an_update_that_turns_finite_gradients_into_nan_names_the_optimizer_settings(small_digits):
    """Adam with eps=0 divides 0 by 0 on a coordinate whose gradient is exactly 0 (a pixel that is 0
    in every image): training goes NaN with or without DiffIn, and the error says so."""
    cb = DiffIn(target="val", target_loader=small_digits.val)
    with pytest.raises(FloatingPointError, match=r"optimizer step 0 made parameters non-finite from finite gradients .*Adam with .*'eps': 0.0.*positive eps"):
        _fit(small_digits, cb, model=_model(optimizer="adam", lr=1e-3, optimizer_options={"eps": 0.0}))
