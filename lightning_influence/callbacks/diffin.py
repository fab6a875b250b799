"""The ``DiffIn`` callback: Diff-In influence scores computed while ``Trainer.fit`` runs."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_influence.estimators.diffin import DiffInSweep, ScoreAccumulator
from lightning_influence.kernels import (
    FiniteDifference,
    ParameterSpace,
    all_finite,
    batch_gradient,
    has_mode_dependent_layers,
    per_sample_loss_function,
)
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.scores import InfluenceScores
from lightning_influence.targets import TARGET_KINDS, TargetGradient, TargetKind
from lightning_influence.trajectory import Storage, StepRecord, Trajectory

Mode = Literal["replay", "online"]
SUPPORTED = (
    "supported: one torch.optim.SGD optimizer without momentum or weight decay (any learning-rate "
    "scheduler, several parameter groups), automatic optimization, accumulate_grad_batches=1, no gradient "
    "clipping, precision '32-true' or '64-true', a single-device strategy"
)


class DiffIn(Callback):
    """Diff-In influence of every training sample on a target loss, computed during ``fit``.

    Scores are the predicted change of the target loss when the sample is removed from training
    (positive: the sample helps; negative: it hurts), in the target loss's units. After ``fit``
    they are in :attr:`scores` and ``pl_module.influence``.

    Args:
        target: ``"train"`` (mean training loss), ``"val"`` (mean loss on the trainer's validation
            loader, or ``target_loader``) or ``"query"`` (one score column per sample of
            ``target_loader``).
        mode: ``"replay"`` records the trajectory and sweeps it in reverse at the end of fit: the
            exact linearised leave-one-out answer. ``"online"`` scores each block of
            ``score_every`` steps once ``window`` further steps have run, propagating exactly over
            them and using the target gradient at the window's end; memory stays bounded by
            ``window + score_every`` steps. The end of fit scores the remaining steps exactly.
        target_loader: the loader for ``"query"`` (required) or ``"val"`` (optional).
        target_samples: score against a fixed random subset of this many target samples.
        window: online mode's minimum propagation length, in optimizer steps.
        score_every: online mode's block length (default: ``window``). Each block costs
            ``(window + score_every) / score_every`` Hessian products per step.
        storage: keep recorded steps in ``"memory"`` or spill them to ``"disk"`` (``spill_dir``).
        checkpoint_every: store parameters every k steps only and recompute the ones between
            during the sweep (one extra gradient per step; needs a model without dropout/batch norm).
        finite_difference: scheme of the Hessian-vector products. ``"auto"`` uses ``"forward"``
            differences against the gradient recorded in training when the model has no
            dropout/batch-norm layers (one backward pass per product), else ``"central"`` (two).
        fd_rel_step: relative finite-difference step (default: from the parameters' dtype).
        hessian_every: propagate through blocks of k steps with one Hessian product each (at one
            step's batch, with the block's summed step sizes: ``prod (I - H_s L_s) ~ I - H_t sum L_s``),
            k times fewer products; exact propagation is ``1``. Accuracy cost in the README.
        save_path: write the scores there at the end of fit (global rank zero).
    """

    def __init__(
        self,
        target: TargetKind = "val",
        mode: Mode = "replay",
        *,
        target_loader: Iterable[Any] | None = None,
        target_samples: int | None = None,
        seed: int = 0,
        window: int = 128,
        score_every: int | None = None,
        storage: Storage = "memory",
        spill_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        finite_difference: Literal["auto", "forward", "central"] = "auto",
        fd_rel_step: float | None = None,
        hessian_every: int = 1,
        save_path: str | Path | None = None,
    ) -> None:
        if target not in TARGET_KINDS:
            raise ValueError(f"target must be one of {TARGET_KINDS}, got {target!r}")
        if target == "query" and target_loader is None:
            raise ValueError("target='query' needs target_loader=<loader of the query samples>")
        if target == "train" and target_loader is not None:
            raise ValueError("target='train' uses the training loader; target_loader is for 'val' or 'query'")
        if mode not in ("replay", "online"):
            raise ValueError(f"mode must be 'replay' or 'online', got {mode!r}")
        if window < 1 or (score_every is not None and score_every < 1):
            raise ValueError(f"window and score_every must be >= 1, got window={window}, score_every={score_every}")
        if target_samples is not None and target_samples < 1:
            raise ValueError(f"target_samples must be >= 1, got {target_samples}")
        if finite_difference not in ("auto", "forward", "central"):
            raise ValueError(f"finite_difference must be 'auto', 'forward' or 'central', got {finite_difference!r}")
        if mode == "online" and checkpoint_every > 1 and (window % checkpoint_every or (score_every or window) % checkpoint_every):
            raise ValueError("in online mode, window and score_every must be multiples of checkpoint_every")
        self.target: TargetKind = target
        self.mode: Mode = mode
        self.target_loader = target_loader
        self.target_samples = target_samples
        self.seed = seed
        self.window = window
        self.score_every = score_every or window
        self.storage: Storage = storage
        self.spill_dir = spill_dir
        self.checkpoint_every = checkpoint_every
        self.finite_difference = finite_difference
        self.fd_rel_step = fd_rel_step
        if hessian_every < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        self.hessian_every = hessian_every
        self.save_path = Path(save_path) if save_path is not None else None
        self.scores: InfluenceScores | None = None
        self.steps_seen = 0
        self.steps_scored = 0
        self.truncated_sweeps = 0
        self.steps_scored_truncated = 0
        self.seconds = 0.0
        self._accumulator: ScoreAccumulator | None = None
        self._trajectory: Trajectory | None = None
        self._sweep: DiffInSweep | None = None
        self._space: ParameterSpace | None = None
        self._groups: list[list[int]] = []
        self._pending: tuple[Any, Tensor] | None = None
        self._loss_check: Tensor | None = None
        self._loss_checked = False
        self._restored = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target, mode=self.mode)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, InfluenceMixin):
            raise TypeError(
                f"{type(pl_module).__name__} is not influence-aware: add lightning_influence.InfluenceMixin to its "
                "bases and implement per_sample_loss(batch) -> Tensor[B] (and sample_ids if batches are not "
                "IndexedDataset tuples/dicts)"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(f"DiffIn does not model manual optimization yet; {SUPPORTED}")
        if not isinstance(trainer.strategy, SingleDeviceStrategy):
            raise ValueError(f"DiffIn does not support strategy {type(trainer.strategy).__name__} yet; {SUPPORTED}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"DiffIn does not model accumulate_grad_batches={trainer.accumulate_grad_batches} yet; {SUPPORTED}")
        if trainer.gradient_clip_val:
            raise ValueError(f"DiffIn does not model gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) yet; {SUPPORTED}")
        precision = str(trainer.precision)
        if precision not in ("32-true", "64-true", "32", "64"):
            raise ValueError(f"DiffIn does not model precision={precision!r} yet; {SUPPORTED}")
        if self.checkpoint_every > 1 and has_mode_dependent_layers(pl_module):
            raise ValueError(
                "checkpoint_every > 1 recomputes the training steps, which needs a model without dropout or batch "
                "norm; use storage='disk' instead"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"DiffIn needs exactly one optimizer, got {len(optimizers)}; {SUPPORTED}")
        optimizer = optimizers[0]
        _check_plain_sgd(optimizer)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        named: list[tuple[str, Tensor]] = []
        self._groups = []
        for group in optimizer.param_groups:
            members = []
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if id(p) not in names:
                    raise ValueError("the optimizer holds a parameter that is not a parameter of the LightningModule")
                members.append(len(named))
                named.append((names[id(p)], p))
            self._groups.append(members)
        self._space = ParameterSpace.from_parameters(named)
        self._params = [p for _, p in named]
        loss_fn = per_sample_loss_function(pl_module)
        self._loss_fn = loss_fn
        self._target = self._make_target(trainer, pl_module)
        if self.finite_difference == "auto":
            scheme: FiniteDifference = "central" if has_mode_dependent_layers(pl_module) else "forward"
            reuse = scheme == "forward"
        else:
            scheme, reuse = self.finite_difference, self.finite_difference == "forward" and not has_mode_dependent_layers(pl_module)
        self._reuse_gradient = reuse
        if not self._restored:
            # A new fit scores a new run: earlier results refer to another final model.
            self._accumulator = ScoreAccumulator(capacity=_dataset_length(trainer) or 0)
            self.steps_seen = self.steps_scored = self.truncated_sweeps = self.steps_scored_truncated = 0
            self.seconds = 0.0
        self._restored = False
        self._loss_checked = False
        if self.mode == "online" and self.target == "train" and self.target_samples is None:
            rank_zero_warn(
                "DiffIn(mode='online', target='train') evaluates the full training loss at every block of "
                f"{self.score_every} steps; pass target_samples=<k> to use a fixed subset and bound this cost"
            )
        self._sweep = DiffInSweep(
            pl_module,
            loss_fn,
            self._space,
            self._target,
            self._accumulator,
            finite_difference=scheme,
            fd_rel_step=self.fd_rel_step,
            reuse_recorded_gradient=reuse,
            hessian_every=self.hessian_every,
        )
        self._trajectory = Trajectory(self.storage, self.spill_dir, self.checkpoint_every, device=self._space.device)

    def _make_target(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TargetGradient:
        """The target's batches, resolved lazily: Lightning sets up its loaders after ``on_fit_start``."""
        val_source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if self.target == "val" and self.target_loader is None and not val_source.is_defined():
            raise ValueError(
                "target='val' needs a validation loader: pass val_dataloaders to Trainer.fit, define "
                "val_dataloader() in the module or datamodule, or give DiffIn(target_loader=...)"
            )
        strategy = trainer.strategy

        def source() -> Iterable[Any]:
            if self.target_loader is not None:
                return self.target_loader
            if self.target == "train":
                loader = trainer.train_dataloader
                return loader if loader is not None else trainer.fit_loop._data_source.dataloader()
            loader = trainer.val_dataloaders if trainer.val_dataloaders is not None else val_source.dataloader()
            if isinstance(loader, (list, tuple)) and loader and isinstance(loader[0], DataLoader):
                loader = loader[0]  # several validation loaders: the first is the target
            return loader

        def batches() -> Iterable[Any]:
            for batch in source():
                yield strategy.batch_to_device(batch)

        return TargetGradient(
            self.target,
            batches,
            sample_count=self.target_samples,
            seed=self.seed,
            sample_ids=pl_module.sample_ids if self.target == "train" else None,
        )

    # ------------------------------------------------------------------ training hooks
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        ids = torch.as_tensor(pl_module.sample_ids(batch))
        _check_ids(ids)
        self._pending = (batch, ids.detach().to("cpu", torch.long).reshape(-1))
        if not self._loss_checked:
            # Same RNG stream as training_step will draw, so dropout masks agree.
            devices = [pl_module.device] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                losses = pl_module.per_sample_loss(batch)
            _check_losses(losses, ids)
            self._loss_check = losses.detach().mean()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._pending is None:
            return
        start = time.perf_counter()
        batch, ids = self._pending
        self._pending = None
        space = self._space
        assert space is not None and self._trajectory is not None and self._accumulator is not None
        trajectory = self._trajectory
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if not all(all_finite(g) for g in grads):
            raise FloatingPointError(
                f"non-finite gradient at optimizer step {trainer.global_step}: the scores of this run would be wrong"
            )
        step_sizes = torch.empty(len(self._params), dtype=torch.float64, device=space.device)
        for group, members in zip(optimizer.param_groups, self._groups, strict=True):
            step_sizes[members] = float(group["lr"])
        keep = trajectory.keeps_theta(self.steps_seen)  # between checkpoints only the batch is kept
        record = StepRecord(
            step=self.steps_seen,
            batch=batch,
            ids=ids,
            step_sizes=step_sizes,
            theta=trajectory.flat_copy(self._params) if keep else None,
            grad=trajectory.flat_copy(grads) if keep and self._reuse_gradient else None,
        )
        trajectory.append(record)
        self._accumulator.mark_seen(ids)
        self.steps_seen += 1
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._loss_checked and self._loss_check is not None:
            self._compare_training_loss(outputs)
        if self.mode == "online" and self._trajectory is not None and len(self._trajectory) >= self.window + self.score_every:
            if _is_last_step(trainer):
                return  # the end-of-fit sweep scores every remaining step exactly
            start = time.perf_counter()
            self._run_sweep(self.score_every)
            self.truncated_sweeps += 1
            self.steps_scored_truncated += self.score_every
            self.seconds += time.perf_counter() - start

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._trajectory is None:
            return
        start = time.perf_counter()
        self._run_sweep(len(self._trajectory))
        self._trajectory.close()
        self.seconds += time.perf_counter() - start
        self.scores = self._build_scores()
        # Keep the scores only: the trajectory and the sweep hold parameter-sized buffers and batches.
        self._trajectory, self._sweep, self._pending = None, None, None
        if isinstance(pl_module, InfluenceMixin):
            pl_module.influence = self.scores
        if self.save_path is not None and trainer.is_global_zero:
            self.scores.save(self.save_path)
        rank_zero_info(
            f"DiffIn ({self.mode}, target={self.target}): scored {len(self.scores)} samples over {self.steps_scored} "
            f"steps; {self.seconds:.2f}s in the callback"
        )

    # ------------------------------------------------------------------ internals
    def _run_sweep(self, num_scored: int) -> None:
        assert self._sweep is not None and self._trajectory is not None and self._space is not None
        num_scored = min(num_scored, len(self._trajectory))
        theta_end = self._space.flatten(self._params)
        self._sweep.run(self._trajectory, theta_end, num_scored, recompute_step=self._recompute_step)
        self._trajectory.drop_oldest(num_scored)
        self.steps_scored += num_scored

    def _recompute_step(self, record: StepRecord) -> tuple[Tensor, Tensor]:
        """Re-run one plain-SGD update from ``record.theta`` (train mode, as in fit)."""
        assert self._space is not None and record.theta is not None
        grad = batch_gradient(self._loss_fn, self._space, record.theta, record.batch)
        step = self._space.expand(record.step_sizes.to(record.theta.dtype)) * grad
        return grad, record.theta - step

    def _compare_training_loss(self, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._loss_checked = True
        if not isinstance(loss, Tensor):
            return
        expected, got = float(loss.detach()), float(self._loss_check)  # type: ignore[arg-type]
        tol = 1e-4 if loss.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        if not math.isclose(expected, got, rel_tol=tol, abs_tol=tol):
            raise ValueError(
                f"per_sample_loss(batch).mean() = {got!r} but training_step returned loss {expected!r} on the first "
                "step: the per-sample losses must be the unreduced terms of the training loss (same reduction, "
                "same regularisers, no extra weighting)"
            )

    def _build_scores(self) -> InfluenceScores:
        assert self._accumulator is not None and self._sweep is not None
        ids, values = self._accumulator.result()
        meta = {
            "estimator": "diffin",
            "mode": self.mode,
            "target": self.target,
            "target_samples": self.target_samples,
            "window": self.window if self.mode == "online" else None,
            "score_every": self.score_every if self.mode == "online" else None,
            "steps_seen": self.steps_seen,
            "steps_scored": self.steps_scored,
            "truncated_sweeps": self.truncated_sweeps,
            "steps_scored_truncated": self.steps_scored_truncated,
            "finite_difference": self._sweep.finite_difference,
            "hessian_every": self.hessian_every,
            "hessian_products": self._sweep.hessian_products,
            "forward_mode_passes": self._sweep.forward_mode_passes,
            "target_gradients": self._sweep.target_gradients,
            "callback_seconds": round(self.seconds, 6),
        }
        return InfluenceScores(ids, values, meta)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        pending = len(self._trajectory) if self._trajectory is not None else 0
        return {
            "steps_seen": self.steps_seen,
            "steps_scored": self.steps_scored,
            "truncated_sweeps": self.truncated_sweeps,
            "steps_scored_truncated": self.steps_scored_truncated,
            "pending_steps": pending,
            "accumulator": self._accumulator.state_dict() if self._accumulator is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("pending_steps", 0):
            raise ValueError(
                f"this checkpoint was saved with {state_dict['pending_steps']} recorded steps not yet scored by DiffIn; "
                "resuming would lose their contribution. Resume from a checkpoint of a run without DiffIn, or rerun"
            )
        self.steps_seen = int(state_dict["steps_seen"])
        self.steps_scored = int(state_dict["steps_scored"])
        self.truncated_sweeps = int(state_dict.get("truncated_sweeps", 0))
        self.steps_scored_truncated = int(state_dict.get("steps_scored_truncated", 0))
        if state_dict.get("accumulator") is not None:
            self._accumulator = ScoreAccumulator()
            self._accumulator.load_state_dict(state_dict["accumulator"])
        self._restored = True


def _check_plain_sgd(optimizer: Any) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner) is not torch.optim.SGD:
        raise ValueError(f"DiffIn does not model optimizer {type(inner).__name__} yet; {SUPPORTED}")
    for i, group in enumerate(inner.param_groups):
        bad = {k: group.get(k) for k in ("momentum", "weight_decay") if group.get(k)}
        if group.get("nesterov") or group.get("maximize"):
            bad.update({k: True for k in ("nesterov", "maximize") if group.get(k)})
        if bad:
            raise ValueError(f"DiffIn does not model SGD with {bad} (parameter group {i}) yet; {SUPPORTED}")


def _check_ids(ids: Tensor) -> None:
    if ids.dim() != 1 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"sample_ids(batch) must be an integer Tensor[B], got dtype {ids.dtype} and shape {tuple(ids.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"sample ids must be >= 0, got {int(ids.min())}")
    if ids.unique().numel() != ids.numel():
        dup = ids[torch.cat([ids.sort().values.diff() == 0, torch.tensor([False], device=ids.device)])]
        raise ValueError(
            f"duplicate sample ids in one batch: {dup.unique().tolist()[:10]}; each sample may appear once per step. "
            "If the batches carry no ids, the default sample_ids(batch) reads the last tuple element (labels?): "
            "wrap the dataset in lightning_influence.IndexedDataset or override sample_ids(batch)"
        )


def _check_losses(losses: Any, ids: Tensor) -> None:
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != ids.numel():
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"per_sample_loss(batch) must return an unreduced Tensor[B] with B = {ids.numel()} (one loss per sample "
            f"id), got {shape}"
        )
    if not losses.is_floating_point():
        raise ValueError(f"per_sample_loss(batch) must return floating-point losses, got dtype {losses.dtype}")


def _is_last_step(trainer: L.Trainer) -> bool:
    """True when the optimizer step just taken is the last of this fit (max_steps or max_epochs)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return bool(trainer.is_last_batch) and 0 < max_epochs <= trainer.current_epoch + 1


def _dataset_length(trainer: L.Trainer) -> int | None:
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None
