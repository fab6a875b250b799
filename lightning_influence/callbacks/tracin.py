"""The ``TracIn`` callback: first-order influence accumulated at every optimizer step of ``fit``.

At optimizer step ``t`` (parameters ``theta_t``, learning rate ``eta_g`` per parameter group,
micro-batches ``B_tk`` of ``b_tk`` samples, Lightning's accumulation normaliser ``n``), removing
sample ``z`` of micro-batch ``k`` takes ``grad l_z / (n b_tk)`` out of the step's gradient, so a
plain SGD step moves the parameters by ``+Lambda_t grad l_z / (n b_tk)`` instead (``Lambda_t``:
the learning rate of each coordinate's group). To first order the target ``F`` changes by

    TracIn(z) = sum_{t: z in B_t} < Lambda_t grad F(theta_t), grad l_z(theta_t) > / (n b_tk)

Units and sign: the predicted change of the target loss when ``z`` is removed (positive: ``z``
helps), as every score in the library. Per step: one target gradient (or one per
``target_every`` steps, reused in between) and one forward-mode pass per micro-batch
(:func:`~lightning_influence.kernels.directional_derivatives` along ``Lambda_t grad F``), in eval
mode. No checkpoints are stored.

The learning rate is read from the optimizer's parameter groups as each step's ``optimizer.step`` starts
(:class:`~lightning_influence.callbacks.hooks.OptimizerStepWatch`): after every
``on_before_optimizer_step`` (the callbacks' and the module's) and clipping, so any scheduler and any
hook that sets it count. The set of trained parameters is the optimizer's at fit start: one frozen
or unfrozen since (``BackboneFinetuning`` adds a parameter group) is refused at the step that shows it. With
momentum, Adam or gradient clipping the score is still this plain-SGD first-order view: the update's
preconditioning, clipping and the later reuse of the gradient through momentum are not modelled
(Diff-In models them), so the magnitudes are off (measured ~15x under Adam, ~10x under clipping)
and the metadata says ``calibrated: False`` (:func:`~lightning_influence.callbacks.checkpoints.first_order_calibration`).
Classic TracIn (``batch_removal="drop"``, the default) does not re-average the batch either: its
term is the first-order change for the sample's term dropped with the batch's ``1 / b`` kept,
while retraining without ``z`` averages over the other ``b - 1`` samples; ``batch_removal="reaverage"``
takes ``(s_z - mean_k s) / (n (b - 1))`` instead (``s_z`` the directional derivative above), the
first-order change of that retraining, and only then, under plain unclipped SGD, says
``calibrated: True``. The propagation of the removal's effect through later steps is not modelled
(Diff-In models it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from lightning_influence.callbacks.checkpoints import first_order_calibration, first_order_units
from lightning_influence.callbacks.resume import check_same_setup, setup_signature, target_signature
from lightning_influence.callbacks.hooks import BackwardWatch, EpochRepeats, OptimizerStepWatch, SubsetNumbering, warn_no_step
from lightning_influence.batches import BatchRemoval, check_batch_removal
from lightning_influence.checks import (
    FirstLossCheck,
    check_id_type,
    check_id_values,
    check_ids,
    check_influence_aware,
    check_losses,
    check_single_device,
    check_trained_parameters,
    check_training_dataset,
    coupling_message,
    dataset_length,
    draws_with_replacement,
    mid_accumulation_resume_error,
    repeats_unsupported,
    training_mode_losses,
    undeclared_coupling,
)
from lightning_influence.callbacks.target_data import (
    target_gradient,
    check_target_arguments,
    check_target_data,
)
from lightning_influence.kernels import (
    ParameterSpace,
    directional_derivatives,
    evaluation_mode,
    finite_flag,
    per_sample_loss_function,
)
from lightning_influence.host import HostCopy
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.optimizers import torch_optimizer, trainable_parameters
from lightning_influence.scores import InfluenceScores, ScoreAccumulator, check_writable
from lightning_influence.targets import TargetGradient, TargetKind
from lightning_influence.validation import check_callback_name, check_count, check_seed

STATE_FORMAT = 1


class TracIn(Callback):
    """Online TracIn: sum over the steps containing each sample of ``eta_t / (n b_t)`` times the inner
    product of its gradient with the target gradient, both at ``theta_t`` (see the module docstring).

    Args:
        target: ``"train"`` (mean training loss), ``"val"`` (the trainer's validation loader or
            ``target_loader``) or ``"query"`` (one score column per sample of ``target_loader``).
        target_loader: loader of the ``"query"`` samples (required) or of the ``"val"`` target.
        target_samples: use a fixed random subset of this many target samples (``seed``).
        target_every: compute the target gradient every k optimizer steps and reuse it in between
            (``1``: at every step, the exact TracIn sum).
        batch_removal: ``"drop"`` (classic TracIn, ``s_z / (n b)``) or ``"reaverage"`` (centred on the
            batch mean, ``(s_z - mean s) / (n (b - 1))``: the first-order change of retraining
            without the sample, calibrated under plain SGD), see the module docstring.
        save_path: write the scores there at the end of fit.
        name: a name for this callback, needed only to put two ``TracIn`` with the same options into
            one Trainer (their checkpoint states need unique keys); recorded in ``metadata["name"]``.

    After ``fit`` the scores are in :attr:`scores` and ``pl_module.influence``.
    """

    def __init__(
        self,
        target: TargetKind = "val",
        *,
        target_loader: Iterable[Any] | None = None,
        target_samples: int | None = None,
        seed: int = 0,
        target_every: int = 1,
        batch_removal: BatchRemoval = "drop",
        save_path: str | Path | None = None,
        name: str | None = None,
    ) -> None:
        check_target_arguments(target, target_loader, target_samples)
        check_callback_name(name)
        self.name = name
        check_count("target_every", target_every)
        check_seed("seed", seed)  # the draw of target_samples
        self.target: TargetKind = target
        self.target_loader = target_loader
        self.target_samples = target_samples
        self.seed = seed
        self.target_every = target_every
        check_batch_removal(batch_removal)
        self.batch_removal: BatchRemoval = batch_removal
        self.save_path = Path(save_path) if save_path is not None else None
        self.scores: InfluenceScores | None = None
        self.steps_seen = 0
        self.skipped_steps = 0
        self.target_gradients = 0
        self.forward_mode_passes = 0
        self.seconds = 0.0
        # Read by the shared first-batch checks (callbacks/target_data.check_target_data).
        self.hessian_every = 1
        self._model = None
        self._space: ParameterSpace | None = None
        self._target_source: Any = None
        self._accumulator: ScoreAccumulator | None = None
        self._micro: list[tuple[Any, Tensor]] = []
        self._batch_open = False  # a training batch started and has not ended
        self._backward = BackwardWatch()  # did the last micro-batch's backward run?
        self._epoch_repeats = EpochRepeats("TracIn")  # ids that come back within an epoch (ids that are not dataset positions)
        self._subset_numbering = SubsetNumbering()  # a training IndexedDataset numbering a subset that changes
        self._step_watch = OptimizerStepWatch(self._on_step, "TracIn")  # scores each step as optimizer.step starts
        self._stepping: tuple[list[tuple[Any, Tensor]], Any, int] | None = None  # the step between its hooks and optimizer.step
        self._cached_gradient: Tensor | None = None
        self._cached_at = -1
        self._checks_pending = False
        self._first_loss = FirstLossCheck()
        self._held: tuple[HostCopy, list[Tensor], int, Any] | None = None  # the last step, until its host values arrive
        self._num_samples: int | None = None  # the training dataset's length (set at fit start)
        self._restored = False
        self._target: TargetGradient | None = None
        self._signature: dict[str, Any] = {}  # the fit's setup, compared on resume (callbacks.resume)
        self._target_print: dict[str, Any] | None = None  # the target data's signature, once a fit
        self._restored_signature: dict[str, Any] | None = None  # the checkpoint's, compared at the first batch

    @property
    def state_key(self) -> str:
        # A checkpoint of another target subset is not resumed as if it were this one (the keys of the defaults stay).
        extra: dict[str, Any] = {}
        if self.target_samples is not None:
            extra.update(target_samples=self.target_samples, seed=self.seed)
        if self.name is not None:
            extra["name"] = self.name
        if self.batch_removal != "drop":
            extra["batch_removal"] = self.batch_removal
        return self._generate_state_key(target=self.target, target_every=self.target_every, **extra)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_influence_aware(pl_module)
        if not pl_module.automatic_optimization:
            raise ValueError("TracIn follows Lightning's automatic optimization only, not manual optimization")
        check_single_device(trainer, "TracIn")
        if self.save_path is not None:
            check_writable(self.save_path, "TracIn")
        if getattr(pl_module, "coupled_batch_loss", False):
            rank_zero_warn(
                f"{type(pl_module).__name__} declares coupled_batch_loss: removing a sample also changes the other "
                "samples' losses in its batch (in-batch negatives), which TracIn, a sum of each sample's own gradient "
                "products, does not see. DiffIn scores coupled removals"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_repeats.reset()
        self._subset_numbering.reset()
        if len(trainer.optimizers) != 1:
            raise ValueError(f"TracIn needs exactly one optimizer, got {len(trainer.optimizers)}")
        optimizer = torch_optimizer(trainer.optimizers[0], "TracIn")
        trained = trainable_parameters(pl_module, optimizer)
        self._space = ParameterSpace.from_parameters([(name, p) for name, p, _ in trained])
        self._params = [p for _, p, _ in trained]
        self._group_of = torch.tensor([g for _, _, g in trained], dtype=torch.long)
        self._loss_fn = per_sample_loss_function(pl_module)
        self._target = self._make_target(trainer, pl_module)
        options = {
            "target": self.target,
            "target_loader": "given" if self.target_loader is not None else "trainer's",
            "target_every": self.target_every,
            "batch_removal": self.batch_removal,
        }
        self._signature = setup_signature(trainer, [(name, p) for name, p, _ in trained], options, optimizer=type(optimizer).__name__)
        self._target_print = None
        if not self._restored:
            self._restored_signature = None
            self._accumulator = ScoreAccumulator(capacity=dataset_length(trainer) or 0)
            self.steps_seen = self.skipped_steps = self.target_gradients = self.forward_mode_passes = 0
            self.seconds = 0.0
        self._restored = False
        self._micro, self._cached_gradient, self._cached_at = [], None, -1
        self._backward.watch(self._params)
        self._step_watch.watch(trainer.optimizers[0])
        self._stepping = None
        self._held = None
        self._num_samples = dataset_length(trainer)
        self._checks_pending = True
        self._first_loss.reset()
        self.scores = None
        if self.target == "train" and self.target_samples is None:
            rank_zero_warn(
                f"TracIn(target='train') evaluates the full training loss every {self.target_every} step(s); pass "
                "target_samples=<k> (a fixed subset) or target_every=<k> to bound this cost"
            )

    def _make_target(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TargetGradient:
        self._target_source, gradient = target_gradient(
            "TracIn", trainer, pl_module, self.target, self.target_loader, self.target_samples, self.seed
        )
        return gradient

    # ------------------------------------------------------------------ training hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._subset_numbering.check(trainer, "TracIn")
        self._epoch_repeats.start(trainer, pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_repeats.end(trainer.current_epoch)  # one host read an epoch
        if self._batch_open:
            # The epoch ended at a batch that never ran (on_train_batch_start returned -1): it and the micro-batches
            # of an unfinished accumulation before it took no optimizer step (Lightning zeroes their gradients).
            self._batch_open, self._micro = False, []
            self._backward.arm()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._close_unstepped()
        self._drop_unbackpropagated(pl_module)
        ids = torch.as_tensor(pl_module.sample_ids(batch))  # type: ignore[operator]
        if self._checks_pending:
            saved, self._restored_signature = self._restored_signature, None
            check_same_setup("TracIn", saved, {**self._signature, **(self._target_signature() if saved and "target data" in saved else {})})
            check_training_dataset(trainer, pl_module)
            if draws_with_replacement(trainer):  # refused before a duplicate shows up mid-training
                raise ValueError(f"the training loader's sampler draws with replacement. {repeats_unsupported('TracIn')}")
        if ids.numel() == 0:
            raise ValueError(
                f"training batch {batch_idx} has no samples (sample_ids(batch) returned no ids): TracIn attributes each "
                "step to the samples of its batch; drop empty batches before training_step"
            )
        first = self._checks_pending
        if first:
            check_ids(ids, self._num_samples, pl_module, batch, owner="TracIn")
        else:  # values checked when they reach the host, at the next step (_settle): no wait for the device here
            check_id_type(ids, pl_module, batch)
        self._epoch_repeats.add(ids.detach())
        if self._checks_pending:
            self._checks_pending = False
            losses = training_mode_losses(pl_module, batch)  # as training_step computes them (compared at the batch end)
            check_losses(losses, ids, device=pl_module.device, requires_grad=True, owner="TracIn", batch=batch, module=pl_module)
            self._first_loss.batch_start(pl_module, batch, losses)
            change = undeclared_coupling(pl_module, batch)
            if change is not None:
                rank_zero_warn(coupling_message(pl_module, change) + ". (TracIn itself scores each sample's own loss only)")
            check_target_data(self, trainer)  # type: ignore[arg-type]
        else:
            self._first_loss.batch_start(pl_module, batch)  # while training_step left the first batches out
        self._micro.append((batch, ids.detach().reshape(-1)))
        self._backward.arm()  # training_step may return None: then no backward runs for this micro-batch
        self._batch_open = True  # until on_train_batch_end: not reached when the module's on_train_batch_start returns -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_open = False
        self._first_loss.batch_end(trainer, outputs)  # training_step must optimise the mean of per_sample_loss

    def _drop_unbackpropagated(self, pl_module: L.LightningModule) -> None:
        """Take the last micro-batch out of its step if no backward ran for it (``training_step``
        returned ``None``): it did not move the parameters, so its samples get nothing here. Its
        ids, not yet checked on the host (see :meth:`_settle`), are checked now."""
        taken = self._backward.take_skipped(self._micro)
        if taken is not None:
            batch, ids = taken
            ids = ids.to("cpu", torch.long)  # a rare event: read at once
            check_id_values(ids, self._num_samples, pl_module, batch, owner="TracIn")
            assert self._accumulator is not None
            self._accumulator.mark_seen(ids)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # The step's micro-batches are complete; it is scored when optimizer.step starts (_on_step), after the
        # module's own on_before_optimizer_step, the later callbacks' and clipping, with the hyperparameters it uses.
        self._close_unstepped()
        self._drop_unbackpropagated(pl_module)
        if not self._micro:
            return
        micro, self._micro = self._micro, []
        self._stepping = (micro, pl_module, int(trainer.accumulate_grad_batches))

    def _close_unstepped(self) -> None:
        """A step whose ``optimizer.step`` never ran (the gradient scaler skipped it, or under 16-mixed
        its last ``training_step`` returned ``None``): it moved nothing, so its samples are marked seen
        with nothing added, counted in ``skipped_steps`` (at the next settle)."""
        if self._stepping is None:
            return
        (micro, pl_module, _), self._stepping = self._stepping, None
        self._settle()
        step = self.steps_seen
        self.steps_seen += 1
        flags = [torch.zeros((), dtype=torch.bool), torch.ones((), dtype=torch.bool)]
        self._held = (HostCopy([*flags, *(ids for _, ids in micro)]), [], step, (pl_module, [b for b, _ in micro]))

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Score the step whose micro-batches :meth:`on_before_optimizer_step` took, as its
        ``optimizer.step`` starts: parameters ``theta_t``, the final (clipped) gradients, and the
        learning rates the step really uses."""
        if self._stepping is None:
            return  # a step none of whose micro-batches was backpropagated, or one TracIn did not see begin
        (micro, pl_module, normalizer), self._stepping = self._stepping, None
        start = time.perf_counter()
        self._settle()
        space = self._space
        assert space is not None
        step = self.steps_seen
        self.steps_seen += 1
        check_trained_parameters("TracIn", space.names, self._params, self._params, optimizer, step)
        grads = [p.grad for p in self._params if p.grad is not None]
        theta = space.flatten(self._params)
        # maximize=True steps along +lr * gradient: the sign of the step's first-order change flips
        lrs = torch.tensor([-float(g["lr"]) if g.get("maximize", False) else float(g["lr"]) for g in optimizer.param_groups], dtype=torch.float64)
        per_coordinate = space.expand(lrs[self._group_of].to(theta.device))
        with evaluation_mode(pl_module):
            if self._cached_gradient is None or step - self._cached_at >= self.target_every:
                self._cached_gradient = self._target(self._loss_fn, space, theta)
                self._cached_at = step
                self.target_gradients += 1
            target = self._cached_gradient.reshape(space.size, -1)
            params = space.unflatten(theta)
            contributions = []
            for batch, ids in micro:
                columns = []
                for q in range(target.shape[1]):
                    tangent = space.unflatten((per_coordinate * target[:, q]).to(space.dtype))
                    _, s = directional_derivatives(self._loss_fn, params, batch, tangent)
                    self.forward_mode_passes += 1
                    columns.append(s.double())
                values = torch.stack(columns, dim=1)
                b = ids.numel()
                if self.batch_removal == "reaverage" and b > 1:
                    values = (values - values.mean(dim=0, keepdim=True)) / ((b - 1) * normalizer)
                else:
                    values = values / ((1 if self.batch_removal == "reaverage" else b) * normalizer)
                if values.shape[0] != ids.numel():
                    raise ValueError(f"per_sample_loss returned {values.shape[0]} values for a batch of {ids.numel()} sample ids at step {step}")
                contributions.append(values[:, 0] if self._cached_gradient.dim() == 1 else values)
        # Attributed at the next step, once the ids and the finiteness flags have reached the host (_settle).
        flags = [finite_flag(grads) if grads else torch.ones((), dtype=torch.bool), finite_flag(contributions)]
        self._held = (HostCopy([*flags, *(ids for _, ids in micro)]), contributions, step, (pl_module, [b for b, _ in micro]))
        self.seconds += time.perf_counter() - start

    def _settle(self) -> None:
        """Attribute the step held back by :meth:`on_before_optimizer_step`: check its ids on the
        host and add its contributions, or skip it if its gradients were not finite (the gradient
        scaler skipped it under 16-mixed, or training diverges)."""
        if self._held is None:
            return
        (values, contributions, step, (module, batches)), self._held = self._held, None
        assert self._accumulator is not None
        grads_finite, values_finite, *ids = values.wait()
        ids = [i.to(torch.long) for i in ids]
        for batch, step_ids in zip(batches, ids, strict=True):
            check_id_values(step_ids, self._num_samples, module, batch, owner="TracIn")
            self._accumulator.mark_seen(step_ids)
        if not bool(grads_finite):
            self.skipped_steps += 1
            return
        if not bool(values_finite):
            raise FloatingPointError(f"non-finite per-sample directional derivatives at optimizer step {step}")
        for step_ids, contribution in zip(ids, contributions, strict=True):
            self._accumulator.add(step_ids, contribution)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._backward.close()  # no hooks left on the parameters or the optimizer of a fit that failed
        self._step_watch.close()
        self._stepping = None
        if self.scores is None and isinstance(pl_module, InfluenceMixin) and pl_module.influence is not None:
            pl_module.influence = None  # an earlier fit's scores describe parameters this fit has changed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit with nothing to train (max_steps=0, a resume with no epochs left) skips the training loop and
        # its on_train_end: the scores are finished here.
        self._finish(trainer, pl_module)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The scores of this fit (once per fit), on the callback and the module."""
        self._backward.close()
        self._step_watch.close()
        if self._accumulator is None or self.scores is not None:
            return
        self._close_unstepped()
        self._settle()
        keep_earlier = self.steps_seen == 0 and warn_no_step("TracIn", self.save_path if trainer.is_global_zero else None)
        ids, values = self._accumulator.result()
        plain_sgd, update = first_order_calibration(trainer, trainer.optimizers[0])
        self.scores = InfluenceScores(
            ids,
            values,
            {
                "estimator": "tracin",
                "name": self.name,
                "mode": "online",
                "target": self.target,
                "target_samples": self.target_samples,
                "column_positions": self._target.sample_positions() if self.target == "query" else None,
                "target_every": self.target_every,
                "steps_seen": self.steps_seen,
                "skipped_steps": self.skipped_steps,
                "target_gradients": self.target_gradients,
                "forward_mode_passes": self.forward_mode_passes,
                "optimizer": type(torch_optimizer(trainer.optimizers[0], "TracIn")).__name__,
                "update_model": "plain SGD, first order (learning rate read from the optimizer as each step starts)",
                # in the units of the retraining change only for plain SGD with the batch re-averaged (first_order_units;
                # the deletion recipe reads this)
                "calibrated": plain_sgd and self.batch_removal == "reaverage",
                "units": first_order_units(plain_sgd, update, reaveraged=self.batch_removal == "reaverage"),
                "batch_removal": self.batch_removal,
                "callback_seconds": round(self.seconds, 6),
            },
        )
        self._micro, self._cached_gradient = [], None
        if isinstance(pl_module, InfluenceMixin) and (self.steps_seen > 0 or pl_module.influence is None):
            pl_module.influence = self.scores
        if self.save_path is not None and trainer.is_global_zero and not keep_earlier:
            self.scores.save(self.save_path)
        rank_zero_info(f"TracIn (online, target={self.target}): scored {len(self.scores)} samples over {self.steps_seen} steps")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        if self._micro:
            # A checkpoint between the micro-batches of one optimizer step (validation mid-accumulation, e.g.
            # val_check_interval=3 with accumulate_grad_batches=2): training goes on; resuming from it is refused.
            return {"format": STATE_FORMAT, "mid_accumulation": True}
        self._close_unstepped()
        self._settle()  # the step held back for its host values belongs to the checkpoint
        return {
            "format": STATE_FORMAT,
            "steps_seen": self.steps_seen,
            "skipped_steps": self.skipped_steps,
            "target_gradients": self.target_gradients,
            "forward_mode_passes": self.forward_mode_passes,
            "accumulator": self._accumulator.state_dict() if self._accumulator is not None else None,
            "signature": {**self._signature, **self._target_signature()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"TracIn state of format {state_dict.get('format')!r}; this version reads {STATE_FORMAT}")
        if state_dict.get("mid_accumulation"):
            raise mid_accumulation_resume_error("TracIn")
        for key in ("steps_seen", "skipped_steps", "target_gradients", "forward_mode_passes"):
            setattr(self, key, int(state_dict[key]))
        self._accumulator = ScoreAccumulator()
        if state_dict["accumulator"] is not None:
            self._accumulator.load_state_dict(dict(state_dict["accumulator"]))
        signature = state_dict.get("signature")
        self._restored_signature = dict(signature) if isinstance(signature, Mapping) else None
        self._restored = True

    def _target_signature(self) -> dict[str, Any]:
        """The target data's fingerprint (:func:`~lightning_influence.callbacks.resume.target_signature`), read once per fit."""
        if self._target_print is None:
            self._target_print = target_signature(self._target, self._target_source)
        return self._target_print
