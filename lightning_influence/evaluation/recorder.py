"""Record what a Trainer run did, so that it can be retrained exactly without chosen samples."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_influence.batch_norm import batch_statistics_layers, is_batch_statistics_layer, running_statistics
from lightning_influence.evaluation._checks import _shown
from lightning_influence.evaluation.retraining import (
    OptimizerSpec,
    TrainingStep,
    _unwrap,
    check_replayable,
    hyperparameter_changes,
    optimizer_lrs,
    retrain,
)
from lightning_influence.callbacks.hooks import BackwardWatch, OptimizerStepWatch
from lightning_influence.checks import FirstLossCheck, coupling_message, undeclared_coupling
from lightning_influence.kernels import BufferWatch, per_sample_loss_function


class _ModeWatch:
    """The mode (training or evaluation) each watched layer ran in at its last call since :meth:`arm`:
    forward pre-hooks, so that what is recorded is what a forward really ran, not the mode a hook left
    the layer in afterwards. Layers not called since :meth:`arm` report their current mode."""

    def __init__(self) -> None:
        self._layers: list[tuple[str, torch.nn.Module]] = []
        self._handles: list[Any] = []
        self._armed = False
        self._seen: dict[str, bool] = {}

    def watch(self, layers: list[tuple[str, torch.nn.Module]]) -> None:
        """Watch ``layers`` (name, layer), in place of any watched before."""
        self.close()
        self._layers = list(layers)
        self._handles = [layer.register_forward_pre_hook(self._hook(name, layer)) for name, layer in self._layers]

    def _hook(self, name: str, watched: torch.nn.Module) -> Any:
        def seen(layer: torch.nn.Module, args: Any) -> None:
            if self._armed and layer is watched:  # not a deep copy of the model, which carries the hook along
                self._seen[name] = layer.training

        return seen

    def arm(self) -> None:
        """A micro-batch starts: forget the modes seen so far."""
        self._seen = {}
        self._armed = True

    def disarm(self) -> dict[str, bool]:
        """Stop watching this micro-batch; each watched layer's mode (``True``: training) at its last call."""
        self._armed = False
        return {name: self._seen.get(name, layer.training) for name, layer in self._layers}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False


class StepRecorder(Callback):
    """Records the initial parameters, the optimizer and clipping, and each optimizer step's
    micro-batches and learning rates.

    The learning rates are read as each step's ``optimizer.step`` starts
    (:class:`~lightning_influence.callbacks.hooks.OptimizerStepWatch`), after every
    ``on_before_optimizer_step`` (the callbacks' and the module's) and clipping: the ones the
    step really uses, whoever set them.

    After ``fit``: :attr:`initial_params` (the parameters at the start of fit, and the running
    statistics of batch norm and instance norm layers, by buffer name), :attr:`steps` (a
    :class:`TrainingStep` per optimizer step that really ran, its micro-batches exactly as
    ``training_step`` saw them) and
    :attr:`optimizer` (an :class:`OptimizerSpec`), ready for
    ``leave_one_out(module, recorder.initial_params, recorder.steps, recorder.optimizer, ...)``.
    A step whose gradients are not all finite (one that ``torch.amp.GradScaler`` skips under
    ``precision='16-mixed'``) is not recorded; :attr:`skipped_steps` counts them.

    Refuses (``ValueError``, at the start of fit or at the offending step) what the retraining
    would not reproduce: manual optimization, more than one optimizer, an optimizer outside
    :data:`~lightning_influence.evaluation.RETRAINABLE_OPTIMIZERS`, an overridden
    ``configure_gradient_clipping``, a scheduler changing anything but learning rates (e.g.
    ``OneCycleLR(cycle_momentum=True)``), parameter groups changing during fit, and a trained
    parameter that receives no gradient. ``training_step`` must return the mean of
    ``per_sample_loss(batch)``, or ``None`` to leave the batch out: a micro-batch whose loss
    was not backpropagated is not recorded, and a step left out entirely is counted in
    :attr:`empty_steps` (torch.optim leaves the parameters as they were). A buffer or untrained parameter that training changes (outside
    normalisation layers: an annealed temperature, an EMA teacher) is recorded with every step
    (``TrainingStep.varying``), so the retraining evaluates each step with the values it trained
    with; one removed from the module is refused. A buffer that the training forward itself writes
    (spectral normalisation's power iteration) is recorded too, but the retraining refuses such a
    module: each run would need its own values. Memory: every batch of the run, and a copy of
    each such tensor per step in which it was written to.

    Which parameters train is recorded at the first batch (``OptimizerSpec.trained``: freezing the
    model after fit does not change the ground truth); freezing or unfreezing parameters during fit is
    refused at the step it shows. Batch-statistics layers that a step ran in evaluation mode (a frozen
    backbone's batch norm) are recorded with the step (``TrainingStep.eval_layers``) and replayed so; the
    mode recorded is the one ``training_step``'s forward ran them in (forward pre-hooks), also when a hook
    switches them later in the batch (``on_before_backward``); a switch between the micro-batches of one
    step is refused.

    A model the retraining cannot replay (dropout with ``p > 0``, ``nn.SyncBatchNorm``, spectral
    normalisation) is refused when fit starts (batch norm is replayed: :func:`retrain`);
    ``training_step``'s loss is compared with the mean
    of ``per_sample_loss`` on the first batch, evaluated after ``training_step``'s forward with its layers in
    the modes that forward ran them in. ``verify`` (default): when training ends, the recorded
    run is retrained with nothing removed and must reproduce the trained parameters and the running
    statistics of its normalisation layers (to 1e-7 of how far they moved in float64, 1e-3 in
    float32, plus 64 roundings; ``num_batches_tracked`` exactly; not under mixed precision, whose
    autocast the float32 retraining does not replay, nor for half-precision parameters), raised at
    the end of fit, after every callback's ``on_train_end``: a run that trained otherwise than recorded (a loss that is
    not the mean of ``per_sample_loss`` at a later step, augmentation inside ``training_step``,
    gradients edited in a hook, batch tensors changed in place, a training-mode forward outside
    ``training_step`` that updated batch norm's running statistics) raises ``ValueError`` instead of
    giving a ground truth of another run. Costs one retraining run.
    """

    def __init__(self, verify: bool = True) -> None:
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be True or False, got {verify!r}")
        self.verify = verify
        self.final_gap: float | None = None  # verify: how far the retraining's baseline ended from the trained parameters
        self.initial_params: dict[str, Tensor] = {}
        self.steps: list[TrainingStep] = []
        self.optimizer: OptimizerSpec | None = None
        self.skipped_steps = 0
        self.empty_steps = 0
        self._batches: list[Any] = []
        self._pending: Any = None
        self._batch_open = False  # a training batch started and has not ended
        self._norm_layers: list[tuple[str, torch.nn.Module]] = []  # batch-statistics layers, by name
        self._pending_eval: frozenset[str] = frozenset()  # those in evaluation mode when the pending micro-batch ran
        self._modes = _ModeWatch()  # the mode each of them ran in during the pending micro-batch's forward
        self._eval_layers: list[frozenset[str]] = []  # per kept micro-batch of the step being gathered
        self._last_eval: frozenset[str] = frozenset()  # the previous step's set, shared when unchanged
        self._backward = BackwardWatch()  # did the pending micro-batch's backward run?
        self._group_ids: list[tuple[int, ...]] = []
        self._trained_ids: set[int] = set()  # the parameters requiring a gradient at the first batch
        self._watch: BufferWatch | None = None
        self._step_watch = OptimizerStepWatch(self._on_step, "StepRecorder", carries_state=True)
        self._awaiting: int | None = None  # the step recorded at on_before_optimizer_step, until its optimizer.step starts
        self._first_loss = FirstLossCheck()
        self._batch_start_state: tuple[dict[str, Tensor], list[Tensor]] | None = None  # buffers, random states
        self._verdict: str | None = None  # the replay check's refusal, raised once every on_train_end has run

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            raise ValueError(
                f"StepRecorder records the batches one process sees, and under {type(trainer.strategy).__name__} with "
                f"{trainer.world_size} processes each sees only its shard: the retraining would follow a trajectory "
                "of part of the data. Record the ground-truth run on one device (devices=1); DiffIn's scores do not "
                "depend on the number of processes (README, DDP)"
            )
        if not pl_module.automatic_optimization:
            raise ValueError("StepRecorder reproduces Lightning's automatic optimization only, not manual optimization")
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"StepRecorder reproduces runs with exactly one optimizer; configure_optimizers gave {len(trainer.optimizers)}"
            )
        if type(pl_module).configure_gradient_clipping is not L.LightningModule.configure_gradient_clipping:
            raise ValueError(
                f"{type(pl_module).__name__} overrides configure_gradient_clipping: StepRecorder reproduces only the "
                "Trainer's gradient_clip_val / gradient_clip_algorithm clipping"
            )
        check_replayable(pl_module)
        optimizer = _unwrap(trainer.optimizers[0])
        self.optimizer = OptimizerSpec.from_optimizer(
            pl_module, optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        )
        self._group_ids = [tuple(id(p) for p in group["params"]) for group in optimizer.param_groups]
        buffers = dict(pl_module.named_buffers())
        self.initial_params = {
            **{n: p.detach().clone() for n, p in pl_module.named_parameters()},
            **{n: buffers[n].detach().clone() for n in running_statistics(pl_module)},
        }
        self.steps = []
        self.skipped_steps = 0
        self.empty_steps = 0
        self._batches = []
        self._pending = None
        self._batch_open = False
        self._norm_layers = [(name, pl_module.get_submodule(name) if name else pl_module) for name, sub in pl_module.named_modules() if is_batch_statistics_layer(sub)]
        self._pending_eval = frozenset()
        self._modes.watch(self._norm_layers)
        self._eval_layers = []
        self._last_eval = frozenset()
        self._backward.watch([p for group in optimizer.param_groups for p in group["params"]])
        self._step_watch.watch(optimizer)
        self._awaiting = None
        self._watch = None
        self._first_loss.reset()
        self._mixed = str(trainer.precision) in ("bf16-mixed", "16-mixed")
        self.final_gap = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._drop_unstepped()
        self._keep_pending()
        self._pending = batch
        self._backward.arm()
        if self._watch is None:  # at the first batch, after setup hooks that may set buffers

            # a model with batch-statistics layers is retrained as coupled whatever it declares
            change = None if batch_statistics_layers(pl_module) else undeclared_coupling(pl_module, batch)
            if change is not None:
                warnings.warn(coupling_message(pl_module, change), UserWarning, stacklevel=2)
            trained = {id(p) for group in _unwrap(trainer.optimizers[0]).param_groups for p in group["params"] if p.requires_grad}
            self._trained_ids = trained
            if self.optimizer is not None:  # the parameters training updates, whatever their flags say after fit
                names = [n for n, p in pl_module.named_parameters() if id(p) in trained]
                self.optimizer = replace(self.optimizer, trained=tuple(names))
            self._watch = BufferWatch(pl_module, [n for n, p in pl_module.named_parameters() if id(p) not in trained])
        self._batch_start_state = self._state(pl_module) if self._first_loss.pending else None
        self._modes.arm()  # last: the forwards of training_step (and of the later hooks before it) are watched
        self._batch_open = True  # until on_train_batch_end: not reached when the module's on_train_batch_start returns -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_open = False
        self._first_loss.batch_end(trainer, outputs)  # the retraining's loss is the mean of per_sample_loss: the run's must be too

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch_open:
            # The epoch ended at a batch that never ran (on_train_batch_start returned -1): it and the micro-batches of
            # an unfinished accumulation before it took no optimizer step (Lightning zeroes their gradients).
            self._batch_open, self._pending, self._batches, self._eval_layers = False, None, [], []
            self._pending_eval = frozenset()
            self._modes.disarm()

    def _keep_pending(self) -> None:
        # A micro-batch trains only if its loss was backpropagated: training_step returning None skips it
        # (Lightning's way of leaving a batch out), and the step is then the other micro-batches' alone.
        if self._pending is not None and self._backward.ran:
            self._batches.append(self._pending)
            self._eval_layers.append(self._pending_eval)
        self._pending = None
        self._pending_eval = frozenset()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # after training_step's forward: the batch-statistics layers it ran in evaluation mode (a frozen backbone's),
        # as that forward ran them, whatever a hook switched since
        modes = self._modes.disarm()
        self._pending_eval = frozenset(name for name, training in modes.items() if not training)
        state, self._batch_start_state = self._batch_start_state, None
        if self._first_loss.pending and self._pending is not None and state is not None:
            # the first step's check: the loss that training_step returned against per_sample_loss as it ran
            self._first_loss.batch_start(pl_module, self._pending, self._losses_as_trained(pl_module, self._pending, modes, state))

    @staticmethod
    def _state(pl_module: L.LightningModule) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Copies of the module's buffers and the random generators' states, as the micro-batch starts."""
        buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        rng = [torch.get_rng_state()]
        if pl_module.device.type == "cuda":
            rng.append(torch.cuda.get_rng_state(pl_module.device))
        return buffers, rng

    def _losses_as_trained(
        self, pl_module: L.LightningModule, batch: Any, modes: dict[str, bool], state: tuple[dict[str, Tensor], list[Tensor]]
    ) -> Tensor:
        """``per_sample_loss(batch)`` as training_step's forward computed it, evaluated after that forward
        (before its backward): each batch-statistics layer in the mode that forward ran it in (``modes``; a
        hook may have switched it since), the buffers and random states as the micro-batch started
        (``state``, from :meth:`_state`). The buffers are passed as those copies, so nothing of the module
        is written (the pending backward may need the originals as they are); the random stream is forked."""
        buffers, rng = state
        layers = dict(self._norm_layers)
        saved = {name: layer.training for name, layer in layers.items()}
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            for name, training in modes.items():
                layers[name].training = training
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(rng[0])
                if devices:
                    torch.cuda.set_rng_state(rng[1], pl_module.device)
                if not buffers:
                    return pl_module.per_sample_loss(batch).detach()  # type: ignore[operator]
                return per_sample_loss_function(pl_module)(buffers, batch).detach()
        finally:
            for name, training in saved.items():
                layers[name].training = training

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._backward.close()
        self._step_watch.close()
        self._modes.close()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drop_unstepped()
        self._backward.close()
        self._step_watch.close()
        self._modes.close()
        self._verdict = None
        if self.verify and self.steps and self.optimizer is not None and not self._mixed:
            self._verdict = self._verify_replay(pl_module)  # on the training device, before Lightning's teardown

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_watch.close()  # also when the training loop never ran
        self._modes.close()
        # Raised after every callback's on_train_end (DiffIn's end-of-fit sweep among them), which it would stop.
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            raise ValueError(verdict)

    def _verify_replay(self, pl_module: L.LightningModule) -> str | None:
        """The recorded run, retrained with nothing removed, must end at the trained parameters and
        running statistics: within ``1e-7`` (float64; ``1e-3`` in float32) of how far each kind moved
        (parameters, running statistics), plus 64 roundings of their size; the batch counts exactly.
        Parameters below float32 are not checked (their rounding is as large as a step). Returns the
        refusal's message, or ``None``."""
        assert self.optimizer is not None
        trained = dict(pl_module.named_parameters())
        dtype = next(iter(trained.values())).dtype
        if torch.finfo(dtype).bits < 32:
            return None
        try:
            final = retrain(pl_module, self.initial_params, self.steps, self.optimizer, [()])
        except (ValueError, TypeError) as err:  # a module the retraining refuses: raised at the end of fit too
            return str(err)
        buffers = dict(pl_module.named_buffers())
        running = [n for n in final if n not in trained]
        gap, worst, moved = self._gap(final, trained, [n for n in final if n in trained], dtype)
        self.final_gap = gap
        if worst is not None:
            return (
                f"StepRecorder: the recorded run, retrained with nothing removed, ends {gap:.3g} away from the trained "
                f"parameters (most in {worst!r}; training moved them by up to {moved:.3g}): the fit trained otherwise than "
                "the retraining replays it, so its leave-one-out ground truth would be that of another run. "
                + self._likely_cause(pl_module, worst)
                + "The retraining takes each step's gradient as the mean of per_sample_loss over the recorded micro-batches: "
                "look for a training_step loss that is not that mean at some step (weights, regularisers, a sum), "
                "randomness or augmentation inside training_step, gradients changed in a hook (on_after_backward, "
                "on_before_optimizer_step), or batch tensors changed in place. A run that diverges or is chaotic (a "
                "learning rate too large: the training loss growing, DiffIn's adjoint-growth warning) amplifies the "
                "rounding of the stacked retraining's gradients alike, so no retraining reproduces it: lower the learning "
                "rate. StepRecorder(verify=False) skips this check"
            )
        stat_gap, stat_worst, stat_moved = self._gap(final, buffers, running, dtype)
        if stat_worst is not None:
            return (
                f"StepRecorder: the recorded run, retrained with nothing removed, reaches the trained parameters but its "
                f"normalisation running statistics end {stat_gap:.3g} away from the trained ones (most in {stat_worst!r}; "
                f"training moved them by up to {stat_moved:.3g}): the running statistics were updated otherwise than by "
                "one training-mode forward of each recorded micro-batch, so the eval-mode target loss of the retrained "
                "runs would be that of another model. Look for a forward in training mode outside training_step (a "
                "callback or hook evaluating the model while it trains), training_step running the model more than once "
                "per batch, batch norm momentum changed during training, or running statistics reset or edited in a "
                "hook. StepRecorder(verify=False) skips this check"
            )
        return None

    def _likely_cause(self, pl_module: L.LightningModule, worst: str) -> str:
        """The likely cause of a parameter gap, when the run shows one, as a sentence; else ``""``.

        A bias feeding batch norm (``Conv2d(bias=True)`` then ``BatchNorm2d``) has an exact gradient of 0:
        the normalisation subtracts the batch mean, bias included. Its computed gradient is rounding noise,
        which differs between the fit and the retraining, and an adaptive optimizer (Adam, RMSprop, ...)
        divides it by its own running size, so each run takes steps of the learning rate's size in
        directions that are noise."""
        assert self.optimizer is not None
        adaptive = self.optimizer.optimizer_class is not torch.optim.SGD
        if adaptive and self._norm_layers and worst.rsplit(".", 1)[-1] == "bias":
            return (
                f"Likely cause: {worst!r} is a bias in a model with batch norm, trained by "
                f"{self.optimizer.optimizer_class.__name__}: when it feeds a batch norm layer, batch norm cancels this "
                "bias's gradient (exactly 0, computed as rounding noise), and the adaptive update turns that rounding into "
                "steps of the learning rate's size, different in every run. Build the layer before batch norm with "
                "bias=False, freeze that bias, or train in float64. "
            )
        return ""

    def _gap(
        self, final: dict[str, Tensor], actual: dict[str, Tensor], names: list[str], dtype: torch.dtype
    ) -> tuple[float, str | None, float]:
        """The largest difference between the retrained ``final`` values (run 0) and the ``actual``
        tensors of ``names``, and how far training moved them; the name that differs most when the
        difference is beyond the tolerance (or an integer count differs at all), else ``None``."""
        gap = moved = size = 0.0
        worst = ""
        for name in names:
            value = actual[name].detach()
            if not value.numel():
                continue
            retrained = final[name][0].to(value.device, value.dtype)
            start = self.initial_params[name].to(value.device, value.dtype)
            if not value.is_floating_point():  # a count (num_batches_tracked): exactly
                if not torch.equal(retrained, value):
                    return float((retrained - value).abs().max()), name, float((value - start).abs().max())
                continue
            difference = float((retrained - value).abs().max())
            moved = max(moved, float((value - start).abs().max()))
            size = max(size, float(value.abs().max()))
            if difference > gap:
                gap, worst = difference, name
        tolerance = (1e-7 if dtype == torch.float64 else 1e-3) * moved + 64 * torch.finfo(dtype).eps * (1.0 + size)
        return gap, (worst if not gap <= tolerance else None), moved

    def _drop_unstepped(self) -> None:
        """A recorded step whose ``optimizer.step`` never ran (under 16-mixed, a last micro-batch left
        out skips the scaler's step) moved nothing: it is taken back and counted as skipped."""
        if self._awaiting is not None:
            del self.steps[self._awaiting]
            self._awaiting = None
            self.skipped_steps += 1

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The recorded step's ``optimizer.step`` starts: its learning rates (and the other
        hyperparameters' check) as the step uses them."""
        if self._awaiting is None or self.optimizer is None:
            return
        index, self._awaiting = self._awaiting, None
        self._check_optimizer(optimizer, index + self.skipped_steps + self.empty_steps)
        self.steps[index] = replace(self.steps[index], lrs=optimizer_lrs(optimizer))

    def _check_optimizer(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        assert self.optimizer is not None
        if [tuple(id(p) for p in group["params"]) for group in optimizer.param_groups] != self._group_ids:
            raise ValueError(f"the optimizer's parameter groups changed during fit (at step {step}): StepRecorder cannot follow")
        changes = hyperparameter_changes(self.optimizer, optimizer)
        if changes:
            raise ValueError(
                f"optimizer hyperparameters other than the learning rate changed at step {step} ({'; '.join(changes)}): "
                "the retraining reproduces learning-rate schedules only (e.g. OneCycleLR needs cycle_momentum=False)"
            )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after the backward passes of the step's micro-batches (and after
        # unscaling under 16-mixed), before clipping and before optimizer.step(); the learning rates are read when
        # optimizer.step starts (_on_step), after the module's own on_before_optimizer_step and the later callbacks'
        self._drop_unstepped()
        self._keep_pending()
        batches, self._batches = self._batches, []
        modes, self._eval_layers = self._eval_layers, []
        if self.optimizer is None:
            return
        if not batches:
            # Every micro-batch of the step was left out: no gradient, and torch.optim leaves the parameters
            # (and their state) as they are. The retraining takes no step here either.
            if any(p.grad is not None for group in _unwrap(optimizer).param_groups for p in group["params"]):
                raise ValueError(
                    "an optimizer step received gradients although no micro-batch of it was backpropagated through "
                    "training_step's loss (gradients kept from an earlier step, or written by a hook): StepRecorder "
                    "cannot reproduce it"
                )
            self.empty_steps += 1
            return
        optimizer = _unwrap(optimizer)
        step = len(self.steps) + self.skipped_steps + self.empty_steps
        if step == 0 and any(float(st.get("step", 1)) != 0 for st in optimizer.state.values()):  # Adagrad starts with state at step 0
            raise ValueError(
                "the optimizer already has state at the first step (a resumed run?): StepRecorder reproduces runs "
                "that start from a fresh optimizer"
            )
        self._check_optimizer(optimizer, step)
        trained_now = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        if trained_now != self._trained_ids:
            named = {id(p): n for n, p in pl_module.named_parameters()}
            frozen = [named.get(i, "?") for i in self._trained_ids - trained_now]
            unfrozen = [named.get(i, "?") for i in trained_now - self._trained_ids]
            raise ValueError(
                f"the trained parameters changed during fit (at step {step}: "
                + "; ".join(
                    part
                    for part in (
                        f"frozen since the first batch: {', '.join(frozen[:4])}" if frozen else "",
                        f"trained now, not at the first batch: {', '.join(unfrozen[:4])}" if unfrozen else "",
                    )
                    if part
                )
                + "): the retraining trains one set of parameters throughout. Record a run that freezes (or "
                "unfreezes) before fit, not during it"
            )
        flags = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    raise ValueError(
                        f"a trained parameter of shape {tuple(p.shape)} received no gradient at step {step}: the "
                        "retraining gives every trained parameter a gradient; freeze it (requires_grad=False) or leave "
                        "it out of the optimizer"
                    )
                if p.grad.is_sparse:
                    name = next((n for n, q in pl_module.named_parameters() if q is p), f"of shape {tuple(p.shape)}")
                    raise ValueError(
                        f"parameter {name!r} has a sparse gradient (nn.Embedding or nn.EmbeddingBag with sparse=True): the "
                        "retraining replays dense optimizer steps, and DiffIn models dense ones. Use sparse=False "
                        "(torch.optim.SGD, Adam and AdamW take the dense gradient)"
                    )
                flags.append(torch.isfinite(p.grad).all())
        if flags and not bool(torch.stack(flags).all()):  # GradScaler skips this step: no update, no state change
            self.skipped_steps += 1
            return
        varying = self._varying(step)  # first: it may rewrite the earlier steps
        eval_layers = self._step_eval_layers(modes, step)
        self.steps.append(
            TrainingStep(tuple(batches), optimizer_lrs(optimizer), int(trainer.accumulate_grad_batches), varying, eval_layers)
        )
        self._awaiting = len(self.steps) - 1

    def _step_eval_layers(self, modes: list[frozenset[str]], step: int) -> frozenset[str]:
        """The batch-statistics layers in evaluation mode at this step (the previous step's set
        object when unchanged: one set for a whole run that never switches)."""
        if len(set(modes)) > 1:
            raise ValueError(
                f"batch-statistics layers switched between training and evaluation mode between the micro-batches of "
                f"step {step} ({_shown(sorted(set().union(*modes) - set.intersection(*map(set, modes))), 4)}): the "
                "retraining runs each step's layers in one mode. Switch modes at step boundaries (e.g. in "
                "on_train_epoch_start)"
            )
        current = modes[0] if modes else frozenset()
        if current != self._last_eval:
            self._last_eval = current
        return self._last_eval

    def _varying(self, step: int) -> dict[str, Tensor]:
        """The values this step trains with of the tensors training changes outside the optimizer;
        a tensor's first change gives the earlier steps its value from before."""
        if self._watch is None:
            return {}
        found = self._watch.check()
        if self._watch.removed:
            raise ValueError(
                f"training removed {self._watch.removed[:4]} from the module by step {step}: StepRecorder cannot "
                "reproduce the steps that read them"
            )
        for name in found:
            initial = self._watch.initial[name]
            self.steps[:] = [replace(s, varying={**s.varying, name: initial}) for s in self.steps]
        return self._watch.values()
