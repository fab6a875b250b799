"""DiffIn callback behaviour: mode and storage equivalences, results exposure, clear errors."""

from __future__ import annotations


import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import digits_problem, quiet_trainer
from lightning_influence import DiffIn, InfluenceMixin, InfluenceScores, TracIn
from lightning_influence.data import FixedBatches
from lightning_influence.models import Classifier, SmallCNN


def _fit(problem, *callbacks, model=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = model if model is not None else Classifier(hidden=(16,), lr=0.1).double()
    quiet_trainer(callbacks=list(callbacks), **trainer_kwargs).fit(model, train_dataloaders=problem.train)
    return model


def _values(cb):
    return cb.scores.values


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_online_with_a_window_covering_the_run_equals_replay(small_digits, checkpoint_every):
    # Both modes store parameters every 8 steps by default and rebuild the steps in between alike.
    replay = DiffIn(target="val", target_loader=small_digits.val, checkpoint_every=checkpoint_every)
    online = DiffIn(
        target="val", mode="online", target_loader=small_digits.val, window=len(small_digits.train), checkpoint_every=checkpoint_every
    )
    _fit(small_digits, replay, online)
    assert replay.scores.metadata["checkpoint_every"] == online.scores.metadata["checkpoint_every"] == (checkpoint_every or 8)
    torch.testing.assert_close(_values(online), _values(replay), rtol=0, atol=1e-15)
    assert online.scores.metadata["truncated_sweeps"] == 0


def test_online_truncated_windows_differ_from_replay_but_agree_in_ranking(small_digits):
    replay = DiffIn(target="val", target_loader=small_digits.val)
    online = DiffIn(target="val", mode="online", target_loader=small_digits.val, window=8, score_every=4)
    _fit(small_digits, replay, online)
    assert online.scores.metadata["truncated_sweeps"] > 5
    assert not torch.allclose(_values(online), _values(replay))
    assert torch.corrcoef(torch.stack([_values(online), _values(replay)]))[0, 1] > 0.5


@pytest.mark.parametrize(
    "case",
    ["plain", "weight-decay-query", "central-forward-mode", "direct-loss", "blocks-weight-decay-query", "blocks-central"],
)
def test_in_place_sgd_steps_equal_the_general_transpose(small_digits, monkeypatch, case):
    """Stateless SGD steps propagate on the adjoint in place (a^G = c * lambda, no vector of its
    own): the scores equal those of the general transpose (StepModel.vjp) to rounding, with weight
    decay (a^theta = (1 - lr wd) lambda), several target columns, central differences with
    forward-mode per-sample derivatives, loss differences without training's losses, and blocks
    of steps sharing one product (hessian_every > 1: the block's sum of a^G is a multiple of
    lambda too)."""
    from lightning_influence.optimizers import StepModel

    options: dict = dict(target="val", target_loader=small_digits.val)
    model_options: dict = dict(hidden=(16,), lr=0.1)
    if case in ("weight-decay-query", "blocks-weight-decay-query"):
        options = dict(target="query", target_loader=FixedBatches([tuple(t[:3] for t in small_digits.val.batches[0])]))
        model_options["optimizer_options"] = {"weight_decay": 0.05}
    if case == "central-forward-mode":
        options.update(finite_difference="central", per_sample="forward_mode")
    if case == "blocks-weight-decay-query":  # forward mode: the loss differences' side differs (below)
        options.update(hessian_every=3, per_sample="forward_mode")
    if case == "blocks-central":
        options.update(hessian_every=2, finite_difference="central")
    kind = _DirectLoss if case == "direct-loss" else Classifier

    def run() -> DiffIn:
        cb = DiffIn(**options)
        torch.manual_seed(0)
        _fit(small_digits, cb, model=kind(**model_options).double())
        return cb

    in_place = run()
    monkeypatch.setattr(StepModel, "adjoint_scales", lambda self, *args: None)
    general = run()
    assert in_place.scores.metadata["hessian_products"] == general.scores.metadata["hessian_products"] > 0
    evaluations = in_place.scores.metadata["loss_evaluations"], general.scores.metadata["loss_evaluations"]
    if case == "blocks-central":
        # In place, a product step of a longer block takes its loss differences from the product's gradient
        # passes too (along a multiple of its own a^G, and the central differences' points are the same)
        assert evaluations[0] < evaluations[1]
    else:
        assert evaluations[0] == evaluations[1]
    scale = float(general.scores.values.abs().max())
    # The in-place products run along c * lambda where the general ones run along a^G: equal up to rounding,
    # which a forward difference's small step amplifies (measured 2.5e-11 of the largest score on one CPU
    # for blocks-weight-decay-query); central differences keep it within 1e-12.
    central = options.get("finite_difference") == "central"
    torch.testing.assert_close(in_place.scores.values, general.scores.values, rtol=0, atol=(1e-12 if central else 1e-10) * scale)


@pytest.mark.parametrize(
    "options",
    [
        dict(storage="disk"),
        dict(checkpoint_every=4),
        dict(storage="disk", checkpoint_every=3),
        dict(checkpoint_every=4, recompute="gradients"),
        dict(storage="disk", checkpoint_every=3, recompute="gradients"),
    ],
)
def test_trajectory_storage_policies_give_the_replay_scores(small_digits, tmp_path, options):
    reference = DiffIn(target="val", target_loader=small_digits.val)
    other = DiffIn(target="val", mode="replay", target_loader=small_digits.val, spill_dir=tmp_path / "spill", **options)
    other._generate_state_key = lambda **kw: "other"
    _fit(small_digits, reference, other)
    # Recomputed steps reproduce the trajectory up to rounding; spilled ones exactly.
    atol = 1e-15 if options.get("checkpoint_every", 1) == 1 else 1e-8
    torch.testing.assert_close(_values(other), _values(reference), rtol=0, atol=atol * _values(reference).abs().max())
    assert not list((tmp_path / "spill").rglob("*"))  # spilled records (and their folder) are removed after the sweep


def test_callbacks_sharing_a_spill_dir_keep_their_own_files(small_digits, tmp_path):
    reference = DiffIn(target="val", target_loader=small_digits.val)
    spilled = [
        DiffIn(target="val", target_loader=small_digits.val, storage="disk", spill_dir=tmp_path, window=window, mode=mode)
        for mode, window in (("replay", 256), ("online", 8))
    ]
    spilled[0]._generate_state_key = lambda **kw: "replay"
    spilled[1]._generate_state_key = lambda **kw: "online"
    _fit(small_digits, reference, *spilled)
    torch.testing.assert_close(_values(spilled[0]), _values(reference), rtol=0, atol=0)
    assert spilled[1].scores.metadata["truncated_sweeps"] > 0
    assert not list(tmp_path.rglob("*"))


class _WithDropout(Classifier):
    def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 10))


@pytest.mark.parametrize(
    "case",
    ["dropout", "adam", "subset"],
)
def test_checkpoints_rebuilt_from_kept_gradients_give_the_replay_scores(small_digits, case):
    """recompute="updates" (the default with checkpoint_every > 1) keeps each step's gradient and
    re-runs only the optimizer between checkpoints: it also works where gradients cannot be
    recomputed (dropout, a parameter subset) and with a stateful optimizer (Adam: the moments are
    rebuilt too), in both modes, and gives the scores of the fully recorded run."""
    torch.manual_seed(0)
    model = {
        "dropout": lambda: _WithDropout(lr=0.1),
        "adam": lambda: Classifier(hidden=(16,), lr=0.01, optimizer="adam"),
        "subset": lambda: Classifier(hidden=(16,), lr=0.1),
    }[case]().double()
    options = dict(target="val", target_loader=small_digits.val, params=["net.2.*"] if case == "subset" else None)
    callbacks = []
    for mode in ("replay", "online"):
        for every in (1, 4):
            cb = DiffIn(mode=mode, window=8, checkpoint_every=every, **options)
            cb._generate_state_key = (lambda key: (lambda **kw: key))(f"{mode}-{every}")
            callbacks.append(cb)
    peak, online_rebuilt = [], []

    class Probe(L.Callback):
        def on_train_batch_end(self, *args):  # type: ignore[no-untyped-def]
            held = callbacks[1]._held  # the last step, until its host values arrive (one step later)
            records = list(callbacks[1]._trajectory._records) + ([held.record] if held is not None else [])
            peak.append((sum(r.theta is not None for r in records), sum(r.grad is not None for r in records), len(records)))
            # After each online sweep, the window it re-swept keeps no rebuilt parameters.
            online = list(callbacks[3]._trajectory._records)
            online_rebuilt.append(sum(r.theta is not None and r.step % 4 != 0 for r in online))

    _fit(small_digits, *callbacks, Probe(), model=model)
    # The step model re-runs an update to within an ulp of torch's (1e-16 relative), which the
    # forward differences against the recorded gradient and training losses amplify by 1 / eps ~ 1e8
    # (float64): measured up to 1.4e-8 of the largest score (SGD and Adam; Adam measured 5e-5 to
    # 1.6e-4 while coordinates whose second moment is exactly 0 still had a derivative of 1 / eps).
    # In float32 this stays below the finite differences' own error.
    tolerance = 1e-6
    for full, rebuilt in ((callbacks[0], callbacks[1]), (callbacks[2], callbacks[3])):
        scale = float(full.scores.values.abs().max())
        torch.testing.assert_close(rebuilt.scores.values, full.scores.values, rtol=0, atol=tolerance * scale)
    thetas, grads, steps = peak[-1]
    assert steps == len(small_digits.train) and thetas == steps // 4 and grads == steps  # parameters every 4 steps only
    assert callbacks[3].truncated_sweeps >= 2 and not any(online_rebuilt)
    if case == "dropout":
        with pytest.raises(ValueError, match="recompute='gradients'.*dropout.*use recompute='updates'.*or checkpoint_every=1"):
            _fit(small_digits, DiffIn(checkpoint_every=4, recompute="gradients", **options), model=_WithDropout(lr=0.1).double())
    with pytest.raises(ValueError, match="recompute must be"):
        DiffIn(recompute="parameters")


@pytest.mark.parametrize("mode", ["replay", "online"])
def test_hessian_every_k_takes_k_times_fewer_products_and_keeps_the_ranking(small_digits, mode):
    exact = DiffIn(target="val", mode=mode, target_loader=small_digits.val, window=16)
    strided = DiffIn(target="val", mode=mode, target_loader=small_digits.val, window=16, hessian_every=3)
    strided._generate_state_key = lambda **kw: "strided"
    _fit(small_digits, exact, strided)
    products_exact = exact.scores.metadata["hessian_products"]
    products_strided = strided.scores.metadata["hessian_products"]
    assert products_strided <= products_exact / 3 + exact.scores.metadata["target_gradients"]
    assert not torch.equal(_values(strided), _values(exact))
    assert torch.corrcoef(torch.stack([_values(strided), _values(exact)]))[0, 1] > 0.95


@pytest.mark.parametrize("mode", ["replay", "online"])
def test_steps_without_a_product_difference_the_training_losses(small_digits, mode):
    """hessian_every > 1: the steps between products take per-sample forward differences from the
    losses training_step computed (one plain forward pass), matching forward mode's exact derivatives."""
    exact = DiffIn(target="val", mode=mode, target_loader=small_digits.val, window=16, hessian_every=3, per_sample="forward_mode")
    cheap = DiffIn(target="val", mode=mode, target_loader=small_digits.val, window=16, hessian_every=3)
    cheap._generate_state_key = lambda **kw: "cheap"
    _fit(small_digits, exact, cheap)
    meta = cheap.scores.metadata
    assert meta["per_sample"] == "finite_difference" and meta["forward_mode_passes"] == 0
    assert meta["loss_evaluations"] <= meta["steps_scored"]  # at most one forward pass a step
    reference = _values(exact)
    torch.testing.assert_close(_values(cheap), reference, rtol=0, atol=1e-6 * float(reference.abs().max()))


def test_central_and_forward_differences_agree(small_digits):
    forward = DiffIn(target="val", target_loader=small_digits.val, finite_difference="forward")
    central = DiffIn(target="val", target_loader=small_digits.val, finite_difference="central")
    central._generate_state_key = lambda **kw: "central"
    _fit(small_digits, forward, central)
    assert forward.scores.metadata["finite_difference"] == "forward"
    rel = (_values(forward) - _values(central)).norm() / _values(central).norm()
    assert rel < 1e-6


@pytest.mark.parametrize("mode", ["replay", "online"])
def test_chunked_passes_and_finite_difference_derivatives_give_the_same_scores(small_digits, mode):
    """Sweep passes over chunks of 5 samples (batches of 16: uneven chunks), and per-sample
    derivatives by central differences of the losses instead of forward mode, in both modes."""
    options = dict(target="val", mode=mode, target_loader=small_digits.val, window=16)
    reference = DiffIn(**options, per_sample="forward_mode")
    chunked = DiffIn(**options, per_sample="forward_mode", chunk_size=5, checkpoint_every=4 if mode == "replay" else 1)
    chunked._generate_state_key = lambda **kw: "chunked"
    differenced = DiffIn(**options, per_sample="finite_difference", chunk_size=5)
    differenced._generate_state_key = lambda **kw: "differenced"
    _fit(small_digits, reference, chunked, differenced)
    scale = _values(reference).abs().max()
    torch.testing.assert_close(_values(chunked), _values(reference), rtol=0, atol=1e-8 * scale)
    assert chunked.scores.metadata["chunk_size"] == 5
    torch.testing.assert_close(_values(differenced), _values(reference), rtol=0, atol=1e-6 * scale)
    meta = differenced.scores.metadata
    assert meta["per_sample"] == "finite_difference" and meta["forward_mode_passes"] == 0
    # One plain forward pass (at theta - eps v) per step that shares a product's gradient pass, two otherwise.
    assert meta["loss_evaluations"] <= (meta["steps_scored"] + 2 * meta["truncated_sweeps"] + 2) * 2


class _DirectLoss(Classifier):
    """A training_step that computes its loss without calling per_sample_loss."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return F.cross_entropy(self(batch[0]), batch[1])


class _Copying(DiffIn):
    """Deep-copies the module in the middle of each training batch, as a user callback might."""

    def __init__(self, **options):  # type: ignore[no-untyped-def]
        super().__init__(**options)
        self.copies: list = []

    def on_after_backward(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        import copy

        self.copies.append(copy.deepcopy(pl_module))


def test_training_losses_serve_as_the_base_of_the_loss_differences(small_digits):
    """The default per-sample derivatives take the losses at theta_t from training_step (through
    InfluenceMixin's loss tap): no loss pass of their own, the forward-mode scores, and a fallback
    to a pass at theta - eps v when training_step never calls per_sample_loss."""
    from lightning_influence.mixin import _LOSS_TAPS

    options = dict(target="val", target_loader=small_digits.val)
    exact = DiffIn(**options, per_sample="forward_mode")
    tapped = _Copying(**options)
    tapped._generate_state_key = lambda **kw: "tapped"
    model = _fit(small_digits, exact, tapped)
    steps = len(small_digits.train)
    assert tapped.scores.metadata["loss_evaluations"] == 2  # only the oldest step, which has no product
    scale = float(exact.scores.values.abs().max())
    torch.testing.assert_close(tapped.scores.values, exact.scores.values, rtol=0, atol=1e-6 * scale)
    assert model not in _LOSS_TAPS  # the taps are gone after fit
    assert tapped.copies and all(copy not in _LOSS_TAPS for copy in tapped.copies)  # copies never had one

    direct = DiffIn(**options)
    torch.manual_seed(0)  # the initial weights of _fit's default model
    _fit(small_digits, direct, model=_DirectLoss(hidden=(16,), lr=0.1).double())
    assert direct.scores.metadata["loss_evaluations"] == steps + 1  # one pass at theta - eps v per step
    torch.testing.assert_close(direct.scores.values, exact.scores.values, rtol=0, atol=1e-6 * scale)


def test_results_are_exposed_and_saved(small_digits, tmp_path):
    path = tmp_path / "scores.pt"
    cb = DiffIn(target="val", target_loader=small_digits.val, save_path=path)
    model = _fit(small_digits, cb)
    assert model.influence is cb.scores
    assert cb.scores.ids.tolist() == list(range(small_digits.n))
    assert cb.scores.values.dtype == torch.float64
    meta = cb.scores.metadata
    assert meta["estimator"] == "diffin" and meta["mode"] == "replay" and meta["target"] == "val"
    assert meta["steps_seen"] == meta["steps_scored"] == len(small_digits.train)
    assert meta["per_sample"] == "finite_difference" and meta["forward_mode_passes"] == 0  # per_sample="auto"
    assert meta["hessian_products"] == len(small_digits.train) - 1
    # No loss pass of its own: theta + eps v came with each step's product and the losses at theta from
    # training_step; only the oldest step, which needs no product, takes both sides by two passes.
    assert meta["loss_evaluations"] == 2
    loaded = InfluenceScores.load(path)
    assert torch.equal(loaded.values, cb.scores.values) and torch.equal(loaded.ids, cb.scores.ids)
    harmful, _ = cb.scores.most_harmful(5)
    assert all(cb.scores[int(i)] <= cb.scores.values.sort().values[4] for i in harmful)


def test_target_samples_equals_an_explicit_subset_loader(small_digits):
    subset = DiffIn(target="val", target_loader=small_digits.val, target_samples=50, seed=3)
    chosen = torch.randperm(200, generator=torch.Generator().manual_seed(3))[:50].sort().values
    x = torch.cat([b[0] for b in small_digits.val.batches])[chosen]
    y = torch.cat([b[1] for b in small_digits.val.batches])[chosen]
    explicit = DiffIn(target="val", target_loader=FixedBatches([(x, y, chosen)]))
    explicit._generate_state_key = lambda **kw: "explicit"
    _fit(small_digits, subset, explicit)
    torch.testing.assert_close(_values(subset), _values(explicit), rtol=1e-10, atol=1e-15)


def test_dropout_model_is_scored_deterministically_with_central_differences(small_digits):
    class WithDropout(Classifier):
        def __init__(self):
            super().__init__(hidden=(16,))
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 10))

    cb = DiffIn(target="val", target_loader=small_digits.val)
    model = _fit(small_digits, cb, model=WithDropout().double())
    assert cb.scores.metadata["finite_difference"] == "central"
    assert torch.isfinite(cb.scores.values).all()
    assert model.net[2].training  # the module's own mode is restored after scoring


def test_datamodule_validation_loader_is_the_default_target():
    from lightning_influence.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, seed=0, dtype="float64")
    cb = DiffIn(target="val", mode="online", window=4, score_every=4)
    torch.manual_seed(0)
    model = Classifier(hidden=(8,)).double()
    quiet_trainer(callbacks=[cb], max_steps=12, limit_val_batches=0).fit(model, datamodule=dm)
    assert len(cb.scores) == min(12 * 64, len(dm.train_set))
    assert cb.scores.metadata["truncated_sweeps"] >= 1


# ---------------------------------------------------------------------------- errors
class _Plain(Classifier):
    pass


def _expect(problem, match, cb=None, model=None, **trainer_kwargs):
    cb = cb or DiffIn(target="val", target_loader=problem.val)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        _fit(problem, cb, model=model, **trainer_kwargs)


def test_module_without_mixin_is_refused(small_digits):
    import lightning as L

    class NoMixin(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def training_step(self, batch, i):
            return F.cross_entropy(self.lin(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    _expect(small_digits, "InfluenceMixin", model=NoMixin().double())


@pytest.mark.parametrize(
    "make_opt,match",
    [
        (lambda p: torch.optim.Adamax(p, lr=1e-3), "optimizer Adamax"),
        (lambda p: torch.optim.Rprop(p, lr=1e-3), "optimizer Rprop"),
        (lambda p: torch.optim.LBFGS(p, lr=0.1), "optimizer LBFGS"),
    ],
)
def test_unmodelled_optimizers_are_refused(small_digits, make_opt, match):
    class Custom(Classifier):
        def configure_optimizers(self):
            return make_opt(list(self.parameters()))

    _expect(small_digits, match + ".*supported: (one optimizer among )?torch.optim.SGD", model=Custom(hidden=(8,)).double())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(precision="bf16-true"), "precision='bf16-true'"),
        (dict(precision="16-true"), "precision='16-true'"),
    ],
)
def test_unmodelled_trainer_settings_are_refused(small_digits, kwargs, match):
    _expect(small_digits, match, model=Classifier(hidden=(8,)), **kwargs)


def test_manual_optimization_is_refused(small_digits):
    class Manual(Classifier):
        def __init__(self):
            super().__init__(hidden=(8,))
            self.automatic_optimization = False

        def training_step(self, batch, i):
            opt = self.optimizers()
            opt.zero_grad()
            loss = self.per_sample_loss(batch).mean()
            self.manual_backward(loss)
            opt.step()

    _expect(small_digits, "manual optimization.*supported:", model=Manual().double())


def test_custom_gradient_clipping_is_refused(small_digits):
    class CustomClip(Classifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            torch.nn.utils.clip_grad_norm_(self.parameters(), 0.1)

    _expect(small_digits, "overrides configure_gradient_clipping", model=CustomClip(hidden=(8,)).double())


def test_gradients_changed_after_the_callback_read_them_are_detected(small_digits):
    """The module's own on_before_optimizer_step runs after the callbacks': DiffIn checks the
    real update against its model of it on the first steps instead of scoring a different run."""

    class Rescaled(Classifier):
        def on_before_optimizer_step(self, optimizer):
            for p in self.parameters():
                p.grad.mul_(0.5)

    with pytest.raises(RuntimeError, match="disagrees with the real update at step 0"):
        _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), model=Rescaled(hidden=(8,)).double())


def test_per_sample_loss_whose_mean_is_not_the_training_loss_names_both_values(small_digits):
    class Scaled(Classifier):
        def training_step(self, batch, i):
            return 2.0 * self.per_sample_loss(batch).mean()

    with pytest.raises(ValueError, match=r"per_sample_loss\(batch\)\.mean\(\) = [0-9.]+ but training_step returned loss [0-9.]+"):
        _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), model=Scaled(hidden=(8,)).double())


def test_per_sample_loss_of_wrong_shape_is_refused(small_digits):
    class Reduced(Classifier):
        def per_sample_loss(self, batch):
            return super().per_sample_loss(batch).mean()

        def training_step(self, batch, i):
            return self.per_sample_loss(batch)

    _expect(small_digits, r"unreduced Tensor\[B\] with B = 16", model=Reduced(hidden=(8,)).double())


@pytest.mark.parametrize(
    "transform,match",
    [
        (lambda b: (b[0], b[1]), "duplicate sample ids.*IndexedDataset"),
        (lambda b: (b[0], b[1], b[2].double()), "integer Tensor"),
        (lambda b: (b[0], b[1], torch.zeros_like(b[2])), "duplicate sample ids"),
        (lambda b: (b[0], b[1], b[2] - 1000), "must be >= 0"),
        (lambda b: {"x": b[0], "y": b[1]}, "no sample ids"),
    ],
)
def test_bad_sample_ids_are_refused(small_digits, transform, match):
    class DictAware(Classifier):
        def per_sample_loss(self, batch):
            if isinstance(batch, dict):
                return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
            return super().per_sample_loss(batch)

    bad = FixedBatches([transform(b) for b in small_digits.train.batches])
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        torch.manual_seed(0)
        quiet_trainer(callbacks=[DiffIn(target="val", target_loader=small_digits.val)]).fit(
            DictAware(hidden=(8,)).double(), train_dataloaders=bad
        )


def test_validation_target_without_a_loader_is_refused(small_digits):
    _expect(small_digits, "needs a validation loader", cb=DiffIn(target="val"))


def test_constructor_validates_options():
    with pytest.raises(ValueError, match="target must be one of"):
        DiffIn(target="test")
    with pytest.raises(ValueError, match="target_loader"):
        DiffIn(target="query")
    with pytest.raises(ValueError, match="mode must be"):
        DiffIn(mode="exact")
    with pytest.raises(ValueError, match="hessian_every must be a positive int, got 0"):
        DiffIn(hessian_every=0)
    with pytest.raises(ValueError, match="multiples of checkpoint_every"):
        DiffIn(mode="online", window=10, checkpoint_every=4)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int or None"):
        DiffIn(checkpoint_every=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        DiffIn(chunk_size=0)
    with pytest.raises(ValueError, match="per_sample must be"):
        DiffIn(per_sample="exact")
    for step in (0.0, -1e-3, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"fd_rel_step must be None .* in \(0, 1\)"):
            DiffIn(fd_rel_step=step)
    for name, value in [("window", "abc"), ("window", 8.5), ("window", True), ("score_every", 2.0), ("target_samples", "10")]:
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            DiffIn(mode="online", **{name: value})
    with pytest.raises(ValueError, match="storage must be 'memory' or 'disk'"):
        DiffIn(storage="ssd")


@pytest.mark.parametrize("kwargs", [{"max_steps": 0}, {"limit_train_batches": 0}], ids=str)
def test_a_fit_without_steps_warns_and_gives_empty_scores(small_digits, kwargs):
    cb = DiffIn(target="val", target_loader=small_digits.val)
    with pytest.warns(UserWarning, match="DiffIn scored no sample: the fit took no optimizer step"):
        _fit(small_digits, cb, **kwargs)
    assert cb.scores is not None and len(cb.scores) == 0


@pytest.mark.parametrize("kind", ["diffin", "tracin"])
def test_a_fit_called_again_after_max_epochs_keeps_the_first_fits_score_file_and_influence(small_digits, tmp_path, kind):
    """Trainer.fit called again on a Trainer that already reached max_epochs (a notebook cell run twice)
    trains nothing: its empty result warns and leaves the score file and the module's influence of the
    first fit as they were (QA: the file was replaced by an empty one)."""
    path = tmp_path / "scores.pt"
    make = {"diffin": DiffIn, "tracin": TracIn}[kind]
    cb = make(target="val", target_loader=small_digits.val, save_path=path)
    torch.manual_seed(0)
    model = Classifier(hidden=(16,), lr=0.1).double()
    trainer = quiet_trainer(callbacks=[cb])
    trainer.fit(model, train_dataloaders=small_digits.train)
    first = InfluenceScores.load(path)
    assert len(first) > 0 and model.influence is cb.scores
    with pytest.warns(UserWarning, match=rf"{make.__name__} scored no sample.*already reached its max_epochs.*and so is {path}"):
        trainer.fit(model, train_dataloaders=small_digits.train)
    assert len(cb.scores) == 0 and len(model.influence) == len(first)
    again = InfluenceScores.load(path)
    assert torch.equal(again.ids, first.ids) and torch.equal(again.values, first.values)


def test_a_second_fit_scores_the_new_run_only(small_digits):
    cb = DiffIn(target="val", target_loader=small_digits.val)
    _fit(small_digits, cb)
    first = cb.scores.values.clone()
    _fit(small_digits, cb)  # same seed, same data: the same run again
    torch.testing.assert_close(cb.scores.values, first, rtol=0, atol=0)
    assert cb.scores.metadata["steps_seen"] == len(small_digits.train)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_online_memory_stays_bounded_over_many_sweeps(optimizer):
    """The compact online trajectory recycles what it records and rebuilds: over 16 sweeps the
    pooled free vectors and the records' parameter vectors stay within one window's worth."""
    problem = digits_problem(n=256, batch_size=16, epochs=8)  # 128 steps
    cb = DiffIn(target="val", target_loader=problem.val, mode="online", window=8, score_every=8, checkpoint_every=4)
    held = []

    class Probe(L.Callback):
        def on_train_batch_end(self, *args):  # type: ignore[no-untyped-def]
            trajectory = cb._trajectory
            records = list(trajectory._records)
            pooled = len(trajectory.pool._free) if trajectory.pool is not None else 0
            held.append((pooled, sum(r.theta is not None for r in records)))

    torch.manual_seed(0)
    model = Classifier(hidden=(8,), lr=0.01 if optimizer == "adam" else 0.1, optimizer=optimizer).double()
    quiet_trainer(callbacks=[cb, Probe()]).fit(model, train_dataloaders=problem.train)
    assert cb.truncated_sweeps >= 14
    window = cb.window + cb.score_every
    assert max(p for p, _ in held) <= 2 * window  # grew by ~7 vectors per sweep before
    assert max(t for _, t in held) <= window // 4 + 1


def test_recorded_trajectory_memory_is_freed_after_fit(small_digits):
    import gc
    import weakref

    refs = []

    class Watching(DiffIn):
        def on_train_end(self, trainer, pl_module):
            refs.append(weakref.ref(self._trajectory))
            refs.extend(weakref.ref(v) for v in self._trajectory.pool._free)
            refs.append(weakref.ref(self._trajectory._records[0].theta))
            super().on_train_end(trainer, pl_module)

    cb = Watching(target="val", target_loader=small_digits.val)
    _fit(small_digits, cb)
    gc.collect()
    assert len(refs) >= 2 and all(r() is None for r in refs)
    assert len(cb.scores) == small_digits.n


def test_summary_statistics_reach_the_loggers_without_touching_the_users_metrics(small_digits, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def run(**kwargs):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = Classifier(hidden=(8,)).double()
        cb = DiffIn(target="val", mode="online", window=8, score_every=8, **kwargs)
        logger = CSVLogger(tmp_path, name="run", version=len(kwargs))
        trainer = quiet_trainer(callbacks=[cb], logger=logger, log_every_n_steps=1, max_epochs=1)
        trainer.fit(model, train_dataloaders=small_digits.train, val_dataloaders=small_digits.val)
        return cb, trainer, list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))

    cb, trainer, rows = run()
    assert "diffin/score_std" not in trainer.callback_metrics and "val_loss" in trainer.callback_metrics
    final = [r for r in rows if r.get("diffin/score_std")]
    assert len(final) == 1
    summary = cb.scores.summary()
    for key in ("mean", "std", "min", "median", "max"):
        assert float(final[0][f"diffin/score_{key}"]) == pytest.approx(summary[key], rel=1e-9)
    assert float(final[0]["diffin/harmful_fraction"]) == pytest.approx(summary["harmful_fraction"])
    assert float(final[0]["diffin/callback_seconds_per_step"]) > 0
    blocks = [r for r in rows if r.get("diffin/steps_scored") and not r.get("diffin/score_std")]
    assert len(blocks) == cb.truncated_sweeps > 0  # one row per online block
    assert any(r.get("train_loss") for r in rows) and any(r.get("val_loss") for r in rows)  # the user's own metrics

    _, _, quiet = run(log_summary=False)
    assert not any(k.startswith("diffin/") for r in quiet for k, v in r.items() if v)


def test_an_unstable_propagation_is_flagged_not_silently_scored():
    """hessian_every=8 at lr 1.0 approximates prod (I - lr H) by I - 8 lr H, whose eigenvalues
    leave the unit circle: the adjoint explodes. Exact products at the same rate stay bounded."""
    problem = digits_problem(n=256, batch_size=16, epochs=6)
    exact = DiffIn(target="val", target_loader=problem.val)
    blocked = DiffIn(target="val", target_loader=problem.val, hessian_every=8)
    blocked._generate_state_key = lambda **kw: "blocked"
    with pytest.warns(RuntimeWarning, match=r"grew .*-fold.*unstable.*hessian_every=1.*max_adjoint_growth"):
        _fit(problem, exact, blocked, model=Classifier(hidden=(16,), lr=1.0).double())
    assert blocked.scores.metadata["max_adjoint_growth"] > 1e3
    assert exact.scores.metadata["max_adjoint_growth"] < 100


def test_kinked_networks_get_central_differences_with_a_larger_step(small_digits):
    cnn = DiffIn(target="val", target_loader=small_digits.val)
    _fit(small_digits, cnn, model=SmallCNN(channels=(2, 4), lr=0.05).double())
    meta = cnn.scores.metadata
    assert meta["kinks"] == ["relu"] and meta["finite_difference"] == "central" and meta["fd_rel_step"] == 5e-3
    smooth = DiffIn(target="val", target_loader=small_digits.val)
    _fit(small_digits, smooth)
    meta = smooth.scores.metadata
    assert meta["kinks"] == [] and meta["finite_difference"] == "forward" and meta["fd_rel_step"] is None
    given = DiffIn(target="val", target_loader=small_digits.val, finite_difference="central", fd_rel_step=1e-3)
    _fit(small_digits, given, model=SmallCNN(channels=(2, 4), lr=0.05).double())
    meta = given.scores.metadata
    assert meta["kinks"] is None and meta["finite_difference"] == "central" and meta["fd_rel_step"] == 1e-3  # not traced


class _FunctionalReLU(Classifier):
    """The MLP with its ReLU written as a function call in forward: no ReLU layer to see."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        hidden, out = self.net[0], self.net[2]
        return out(F.relu(hidden(x)))


def test_a_functional_relu_is_scored_like_the_relu_layer(small_digits):
    layer, functional = (DiffIn(target="val", target_loader=small_digits.val) for _ in range(2))
    for cb, make in ((layer, Classifier), (functional, _FunctionalReLU)):
        torch.manual_seed(0)  # the same initial weights, whatever ran before this test
        _fit(small_digits, cb, model=make(hidden=(16,), activation="relu", lr=0.1).double())
    for cb in (layer, functional):
        meta = cb.scores.metadata
        assert meta["kinks"] == ["relu"] and meta["finite_difference"] == "central" and meta["fd_rel_step"] == 5e-3
    torch.testing.assert_close(functional.scores.values, layer.scores.values, rtol=0, atol=0)




def test_target_loaders_leave_the_training_run_as_it_was(small_digits):
    """Iterating a shuffling loader for the target (the training loader of target='train', or a
    shuffled validation loader) draws from a fork of the random generator: training is unchanged."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence import IndexedDataset

    from torch.utils.data import WeightedRandomSampler

    x, y = small_digits.x[:128], small_digits.y[:128]

    def loader(kind: str) -> DataLoader:
        dataset = IndexedDataset(TensorDataset(x, y))
        if kind == "own generator":
            return DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
        if kind == "weighted sampler":
            sampler = WeightedRandomSampler(torch.ones(128, dtype=torch.float64), 128, generator=torch.Generator().manual_seed(5))
            return DataLoader(dataset, batch_size=16, sampler=sampler)
        return DataLoader(dataset, batch_size=16, shuffle=True)  # the global generator

    def final_parameters(kind, cb):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = Classifier(hidden=(8,), lr=0.1).double()
        quiet_trainer(callbacks=[cb] if cb else [], max_epochs=3).fit(model, loader(kind))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    for kind in ("global generator", "own generator", "weighted sampler"):
        plain = final_parameters(kind, None)
        for cb in (
            DiffIn(target="train", mode="online", window=4, score_every=4),
            DiffIn(target="val", mode="online", window=4, score_every=4, target_loader=loader(kind)),
        ):
            torch.testing.assert_close(final_parameters(kind, cb), plain, rtol=0, atol=0, msg=kind)


class _TwoValidationLoaders(Classifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
        return super().validation_step(batch, batch_idx)


def test_several_validation_loaders_need_the_target_named(small_digits):
    with pytest.raises(ValueError, match=r"found 2 validation loaders.*target_loader=\.\.\..*list of their batches"):
        quiet_trainer(callbacks=[DiffIn(target="val")], max_steps=2).fit(
            _TwoValidationLoaders(hidden=(8,)).double(), train_dataloaders=small_digits.train, val_dataloaders=[small_digits.val, small_digits.val]
        )
    single = DiffIn(target="val")
    quiet_trainer(callbacks=[single], max_steps=2).fit(
        Classifier(hidden=(8,)).double(), train_dataloaders=small_digits.train, val_dataloaders=[small_digits.val]
    )
    assert single.scores is not None


class _Checkpointed(Classifier):
    """The output layer under activation checkpointing: its backward recomputes the layer with the
    module's own weights, whatever parameters a functional call passed in."""

    def __init__(self, use_reentrant: bool, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.use_reentrant = use_reentrant

    def forward(self, x):  # type: ignore[no-untyped-def]
        from torch.utils.checkpoint import checkpoint

        hidden = self.net[1](self.net[0](x))
        return checkpoint(lambda t: self.net[2](t), hidden, use_reentrant=self.use_reentrant)


class _CachedWeight(Classifier):
    """Keeps its own reference to the output weight and multiplies by it directly."""

    def on_fit_start(self):  # type: ignore[no-untyped-def]
        self.cached = [self.net[2].weight]  # in a list: not registered, so functional calls cannot swap it

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net[1](self.net[0](x)) @ self.cached[0].T + self.net[2].bias


@pytest.mark.parametrize(
    "make", [lambda: _Checkpointed(False, hidden=(16,)), lambda: _Checkpointed(True, hidden=(16,)), lambda: _CachedWeight(hidden=(16,))],
    ids=["checkpoint", "checkpoint-reentrant", "cached-weight"],
)
def test_a_loss_that_reads_the_modules_own_parameters_is_refused_before_training(small_digits, make):
    torch.manual_seed(0)
    model = make().double()
    before = [p.detach().clone() for p in model.parameters()]
    cb = DiffIn(target="val", target_loader=small_digits.val)
    with pytest.raises(ValueError, match="DiffIn evaluates .*per_sample_loss functionally.*activation checkpointing"):
        quiet_trainer(callbacks=[cb]).fit(model, train_dataloaders=small_digits.train)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before the first step


def test_the_functional_check_restores_the_module_bit_for_bit(small_digits):
    from lightning_influence.kernels import module_gradient, shifted_point

    torch.manual_seed(0)
    model = Classifier(hidden=(16,)).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.net[0].weight.grad = marker = torch.ones_like(model.net[0].weight)
    point = shifted_point(before)
    grads = module_gradient(model, point, small_digits.train.batches[0])
    assert grads is not None and set(grads) == set(before)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.net[0].weight.grad is marker and model.net[2].weight.grad is None


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_spectral_normalisation_is_warned_about(small_digits, api):
    torch.manual_seed(0)
    model = Classifier(hidden=(16,)).double()
    wrap = torch.nn.utils.spectral_norm if api == "hook" else torch.nn.utils.parametrizations.spectral_norm
    model.net[0] = wrap(model.net[0])
    cb = DiffIn(target="val", target_loader=small_digits.val)
    with pytest.warns(UserWarning, match=r"net\.0 use spectral normalisation"):
        quiet_trainer(callbacks=[cb], max_steps=4).fit(model, train_dataloaders=small_digits.train)
    assert cb.scores is not None and len(cb.scores) > 0


class _Float32Loss(Classifier):
    """A float64 network whose loss is computed in float32 (``F.cross_entropy(logits.float(), y)``)."""

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        return F.cross_entropy(self(batch[0]).float(), batch[1], reduction="none")


@pytest.mark.parametrize("finite_difference", ["auto", "central"])
def test_a_loss_rounded_below_the_parameters_precision_takes_that_precisions_steps(small_digits, finite_difference):
    """Finite differences at float64's steps of losses (and gradients) that carry float32's precision
    are rounding noise (before: scores 7x too large, Spearman 0.39 against leave-one-out). The steps
    follow the losses' dtype, seen on the first batch; the scores then track leave-one-out
    retraining as a float32 model's do."""
    from lightning_influence.evaluation import StepRecorder, leave_one_out, spearman
    from lightning_influence.kernels import default_rel_step

    cb = DiffIn(target="val", target_loader=small_digits.val, finite_difference=finite_difference)
    recorder = StepRecorder()
    model = _fit(small_digits, recorder, cb, model=_Float32Loss(hidden=(16,), lr=0.1).double())
    meta = cb.scores.metadata
    assert meta["loss_dtype"] == "float32" and meta["fd_rel_step"] == default_rel_step(torch.float32, meta["finite_difference"])
    ids = torch.arange(0, 256, 4)
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, small_digits.val)
    predicted = torch.stack([cb.scores[int(i)] for i in ids])
    assert spearman(predicted, truth) > 0.97
    assert 0.8 < float((predicted * truth).sum() / (predicted * predicted).sum()) < 1.25  # LOO / score


class _DecayTenfoldPerEpoch(Classifier):
    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)}


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-3), ("sgd", 0.1), ("sgd-decaying", 0.1)])
def test_a_step_that_dominates_the_scores_is_warned_about(optimizer, lr):
    """Adam's first step on digits (many exact zeros) is close to sign descent: where a batch
    gradient nearly cancels, its linearisation overshoots leave-one-out many times, and that one
    step decides its samples' scores (measured: 154x the median step's contributions, scores 100x
    the real effects). The sweep compares every step's contributions with the median step's and
    warns; plain SGD on the same batches stays far below the limit, also when its learning rate
    falls tenfold per epoch (1e5-fold over the fit): contributions are compared per unit learning rate."""
    import warnings

    from lightning_influence.estimators.diffin_sweep import STEP_DOMINANCE_LIMIT

    from torch.utils.data import DataLoader, TensorDataset

    from lightning_influence.data import IndexedDataset, load_digits_tensors

    x, y = load_digits_tensors(torch.float64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:512], perm[512:712]
    loader = DataLoader(
        IndexedDataset(TensorDataset(x[train], y[train])), batch_size=32, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(1),
    )
    cb = DiffIn(target="val", target_loader=DataLoader(TensorDataset(x[val], y[val]), batch_size=100))
    torch.manual_seed(0)
    model = (_DecayTenfoldPerEpoch if optimizer == "sgd-decaying" else Classifier)(hidden=(32,), lr=lr, optimizer=optimizer.split("-")[0]).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[cb], max_epochs=6).fit(model, train_dataloaders=loader)
    dominance = [w for w in caught if "the median step's" in str(w.message)]
    meta = cb.scores.metadata
    if optimizer == "adam":
        assert meta["max_step_ratio"] > STEP_DOMINANCE_LIMIT and meta["dominant_step"] == 0
        assert len(dominance) == 1 and "optimizer step 0" in str(dominance[0].message)
    else:
        assert meta["max_step_ratio"] < STEP_DOMINANCE_LIMIT / 3 and not dominance


def test_the_last_steps_large_terms_are_recorded_not_warned_about_under_adam():
    """The run's last steps have large terms by design (no later product damps them), under any
    optimizer: a regression with heavy outliers under Adam, 800 steps, whose largest ratio (167x the
    median) is at step 785, scores 0.991 against leave-one-out (QA) and is not warned about; the
    ratio is recorded. The first steps' overshoot is the oldest of its sweep, and still warned
    about (the test above)."""
    import warnings

    from lightning_influence.estimators.diffin_sweep import STEP_DOMINANCE_LIMIT

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(456, 8, generator=g, dtype=torch.float64)
    y = torch.sin(x @ w / 2) + 0.1 * torch.randn(456, generator=g, dtype=torch.float64)
    outliers = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:6]
    y[outliers] += 0.25 * torch.tensor([30.0, -30.0, 25.0, -25.0, 40.0, -40.0], dtype=torch.float64)
    batches = []
    for _ in range(50):
        order = torch.randperm(256, generator=g)
        batches += [(x[order[i : i + 16]], y[order[i : i + 16]], order[i : i + 16]) for i in range(0, 256, 16)]
    held_out = [(x[256 + i : 356 + i], y[256 + i : 356 + i], torch.arange(i, i + 100)) for i in (0, 100)]

    class Regression(InfluenceMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

        def per_sample_loss(self, batch):
            return F.mse_loss(self.net(batch[0]).squeeze(-1), batch[1], reduction="none")

        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    callback = DiffIn(target="val", target_loader=FixedBatches(held_out))
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[callback]).fit(Regression().double(), train_dataloaders=FixedBatches(batches))
    meta = callback.scores.metadata
    assert meta["max_step_ratio"] > STEP_DOMINANCE_LIMIT and meta["dominant_step"] >= 750  # measured 167, step 785
    assert not [w for w in caught if "the median step's" in str(w.message)]


@pytest.mark.parametrize("target,sampler", [("query", "random"), ("val", "random"), ("val", "subset")])
def test_a_shuffling_target_loader_is_read_in_order(small_digits, target, sampler):
    """Query columns and target_samples subsets are by position, and every online sweep reads the
    target again: a shuffling target loader would score a different column order (or subset) each
    time. It is read in order, so its scores equal those of the same loader without shuffling."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from lightning_influence import IndexedDataset

    x, y = small_digits.x, small_digits.y
    data = IndexedDataset(TensorDataset(x[:24], y[:24]))
    subset = [5, 1, 17, 9, 12, 3, 20]
    shuffled = (
        DataLoader(data, batch_size=4, shuffle=True) if sampler == "random"
        else DataLoader(data, batch_size=4, sampler=SubsetRandomSampler(subset))
    )
    ordered = DataLoader(data, batch_size=4) if sampler == "random" else DataLoader(data, batch_size=4, sampler=sorted(subset))
    options = {"target_samples": 5} if target == "val" else {}
    results = []
    for loader in (ordered, shuffled):
        for mode in ("replay", "online"):
            cb = DiffIn(target=target, target_loader=loader, mode=mode, window=8, score_every=8, **options)
            torch.manual_seed(0)
            _fit(small_digits, cb, model=Classifier(hidden=(8,), lr=0.1).double())
            results.append(cb.scores.values)
    for expected, got in zip(results[:2], results[2:]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_unread_hand_over_file_of_an_earlier_spawned_fit_does_not_replace_the_next_fits_scores(small_digits):
    """Under ddp_spawn rank zero hands the scores to the launching process in a file; one left
    unread must not stand for the scores of the next fit with the same callback."""
    cb = DiffIn(target="val", target_loader=small_digits.val)
    stale = InfluenceScores(torch.arange(3), torch.ones(3), {"steps_seen": 99})
    stale.save(cb._handoff)
    _fit(small_digits, cb, model=Classifier(hidden=(8,), lr=0.1).double())
    assert cb.scores.metadata["steps_seen"] == len(small_digits.train) and len(cb.scores) == small_digits.n
    assert not cb._handoff.exists()


def test_the_training_target_of_a_subset_sampler_is_its_subset(small_digits):
    """target='train' is the mean loss over the training set: for a SubsetRandomSampler, the samples
    it draws from (read in order, every pass), as a target loader over them gives."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from lightning_influence import IndexedDataset

    data = IndexedDataset(TensorDataset(small_digits.x[:64], small_digits.y[:64]))
    subset = list(range(0, 64, 2))
    results = []
    for options in ({"target": "train"}, {"target": "val", "target_loader": DataLoader(data, batch_size=8, sampler=subset)}):
        cb = DiffIn(**options)
        torch.manual_seed(0)
        model = Classifier(hidden=(8,), lr=0.1).double()
        quiet_trainer(callbacks=[cb], max_epochs=2).fit(model, train_dataloaders=DataLoader(data, batch_size=8, sampler=SubsetRandomSampler(subset)))
        results.append(cb.scores)
    assert torch.equal(results[0].ids, torch.tensor(subset))
    torch.testing.assert_close(results[0].values, results[1].values, rtol=1e-10, atol=1e-14)


def test_params_patterns_match_a_tied_parameter_under_any_of_its_names(small_digits):
    """``params=["out.*"]`` on a module whose ``out.weight`` is ``emb.weight`` (tied) attributes
    both of ``out``'s parameters, in DiffIn and in the post-hoc estimators' ``attributed_space``."""
    from lightning_influence.estimators.base import attributed_space

    class Tied(Classifier):
        def __init__(self) -> None:
            super().__init__(hidden=(8,))
            self.emb = torch.nn.Embedding(10, 8)
            self.out = torch.nn.Linear(8, 10)
            self.out.weight = self.emb.weight  # tied: named_parameters() lists it as emb.weight only

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.out(torch.tanh(self.net[0](x)))

    torch.manual_seed(0)
    model = Tied().double()
    assert [n for n, _ in model.named_parameters() if n.startswith(("emb", "out"))] == ["emb.weight", "out.bias"]
    space = attributed_space(model, ["out.*"])[0]
    assert sorted(space.names) == ["emb.weight", "out.bias"]
    cb = DiffIn(target="val", target_loader=small_digits.val, params=["out.*"])
    attributed, context = cb._split_parameters(model, model.configure_optimizers())
    assert sorted(n for n, _ in attributed) == ["emb.weight", "out.bias"]
    assert sorted(n for n, _ in context) == sorted(n for n, _ in model.named_parameters() if n.startswith("net."))
    quiet_trainer(callbacks=[cb], max_epochs=1).fit(model, train_dataloaders=small_digits.train)
    assert len(cb.scores) == small_digits.n and bool(cb.scores.values.ne(0).any())


def test_two_named_callbacks_with_the_same_options_share_a_trainer(small_digits):
    """Two targets of one kind read from different loaders (here validation and a held-out half of
    it) need a name each (Lightning requires unique state keys); each gets exactly the scores of
    its own fit, and so does TracIn next to them."""
    test = FixedBatches(list(small_digits.val)[1:])
    alone_val, alone_test = DiffIn(target="val", target_loader=small_digits.val), DiffIn(target="val", target_loader=test)
    alone_tracin = TracIn(target="val", target_loader=test)
    for cb in (alone_val, alone_test, alone_tracin):
        _fit(small_digits, cb)
    val = DiffIn(target="val", target_loader=small_digits.val, name="val")
    held_out = DiffIn(target="val", target_loader=test, name="test")
    tracin = TracIn(target="val", target_loader=test, name="test")
    _fit(small_digits, val, held_out, tracin)
    assert len({val.state_key, held_out.state_key, tracin.state_key}) == 3
    assert (val.scores.metadata["name"], held_out.scores.metadata["name"], alone_val.scores.metadata["name"]) == ("val", "test", None)
    for together, alone in ((val, alone_val), (held_out, alone_test), (tracin, alone_tracin)):
        torch.testing.assert_close(_values(together), _values(alone), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="state_key"):
        _fit(small_digits, DiffIn(target="val", target_loader=small_digits.val), DiffIn(target="val", target_loader=test))
    with pytest.raises(ValueError, match="name must be None or a non-empty string"):
        DiffIn(name="")


def test_query_columns_name_the_query_samples_they_score(small_digits):
    """A query target's score column j is the query sample at loader position
    ``metadata["column_positions"][j]``: with a ``target_samples`` subset, column j equals the
    scores of a query loader holding that one sample (DiffIn, TracIn and an influence function)."""
    from lightning_influence.estimators import Target
    from lightning_influence.estimators.influence_functions import InfluenceFunction

    first = small_digits.val.batches[0]
    query = FixedBatches([tuple(t[:3] for t in first), tuple(t[3:5] for t in first)])  # positions 0..4
    subset = dict(target="query", target_loader=query, target_samples=3, seed=1)
    diffin, tracin = DiffIn(**subset), TracIn(**subset)
    model = _fit(small_digits, diffin, tracin)
    positions = diffin.scores.metadata["column_positions"]
    assert len(positions) == 3 and positions == sorted(set(positions)) and tracin.scores.metadata["column_positions"] == positions
    whole = DiffIn(target="query", target_loader=query)
    _fit(small_digits, whole)
    assert whole.scores.metadata["column_positions"] == [0, 1, 2, 3, 4]
    for j, position in enumerate(positions):
        torch.testing.assert_close(diffin.scores.values[:, j], whole.scores.values[:, position], rtol=0, atol=0)
        alone = TracIn(target="query", target_loader=FixedBatches([tuple(t[position : position + 1] for t in first)]))
        _fit(small_digits, alone)
        torch.testing.assert_close(tracin.scores.values[:, j], alone.scores.values[:, 0], rtol=1e-12, atol=0)
    target = Target("query", query, sample_count=3, seed=1)
    one_epoch = FixedBatches(small_digits.train.batches[: small_digits.n // 16])  # batches of 16
    influence = InfluenceFunction(solver="exact").scores(model, one_epoch, target)
    assert influence.metadata["column_positions"] == positions
    single = InfluenceFunction(solver="exact").scores(model, one_epoch, Target("query", FixedBatches([tuple(t[positions[0] : positions[0] + 1] for t in first)])))
    torch.testing.assert_close(influence.values[:, 0], single.values[:, 0], rtol=1e-9, atol=0)
    assert _fit(small_digits, DiffIn(target="val", target_loader=query)) is not None


class _BagOfTokens(InfluenceMixin, L.LightningModule):
    """``nn.EmbeddingBag`` over flat tokens with offsets (the PyTorch text-classification layout), or an
    embedding over sequence-first ``[T, B]`` tokens: batches whose first tensor is not per sample."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.bag = nn.EmbeddingBag(20, 6, mode="mean")
        self.head = nn.Linear(6, 2)

    def per_sample_loss(self, batch):
        if self.layout == "sequence-first":
            tokens, labels, _ = batch
            hidden = self.bag(tokens.t())  # [B, T]: a bag per row
        else:
            hidden, labels = self.bag(batch["text"], batch["offsets"]), batch["label"]
        return F.cross_entropy(self.head(torch.tanh(hidden)), labels, reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _token_batches(layout: str, n: int, start: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 20, (n, 5), generator=g)
    labels = (tokens[:, 0] > 10).long()
    batches = []
    for i in range(0, n, 16):
        rows, ids = tokens[i : i + 16], torch.arange(start + i, start + min(i + 16, n))
        if layout == "sequence-first":
            batches.append((rows.t().contiguous(), labels[i : i + 16], ids))
        else:  # flat tokens first: 80 of them for 16 samples
            text = {"text": rows.reshape(-1), "offsets": torch.arange(0, rows.numel(), 5)}
            label = {"label": labels[i : i + 16], "index": ids}
            batches.append({**text, **label} if layout == "tokens-first" else {**label, **text})
    return batches


@pytest.mark.parametrize("layout", ["tokens-first", "sequence-first"])
@pytest.mark.parametrize("target", ["val", "query"])
def test_target_batches_whose_first_tensor_is_not_per_sample_are_counted_by_their_sample_ids(layout, target):
    """A target batch's samples are counted by its ids (``sample_ids``), not by its first tensor: flat
    tokens with offsets, or ``[T, B]`` tokens, were refused as a loss "of the wrong shape" before
    training, naming the token count as the batch size. The scores (a subset drawn by position, or
    query columns) equal those of the same data laid out with a per-sample tensor first."""
    scores = {}
    for order in (layout, "labels-first"):
        train = FixedBatches(_token_batches(order, 64, 0, seed=0) * 2)
        held_out = _token_batches(order, 40, 1000, seed=1)
        options = dict(target_samples=25) if target == "val" else dict(target_samples=7)
        if order == "labels-first" and layout == "sequence-first":  # the same data, batch-first
            to_rows = lambda batches: [{"label": y, "index": i, "text": t.t().reshape(-1), "offsets": torch.arange(0, t.numel(), t.shape[0])} for t, y, i in batches]
            train, held_out = FixedBatches(to_rows(_token_batches(layout, 64, 0, seed=0)) * 2), to_rows(_token_batches(layout, 40, 1000, seed=1))
        callback = DiffIn(target=target, target_loader=FixedBatches(held_out), **options)
        torch.manual_seed(0)
        model = _BagOfTokens("sequence-first" if order == "sequence-first" else "flat").double()
        quiet_trainer(callbacks=[callback]).fit(model, train_dataloaders=train)
        scores[order] = callback.scores
    assert torch.equal(scores[layout].ids, scores["labels-first"].ids)
    torch.testing.assert_close(scores[layout].values, scores["labels-first"].values, rtol=1e-9, atol=1e-12)
