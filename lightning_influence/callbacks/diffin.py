"""The ``DiffIn`` callback: Diff-In influence scores computed while ``Trainer.fit`` runs."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, XLAStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_influence.batches import BatchRemoval, check_batch_removal
from lightning_influence.checks import (
    check_id_type,
    check_id_values,
    check_ids,
    check_influence_aware,
    check_losses,
    check_trained_parameters,
    check_training_dataset,
    coupling_message,
    dataset_length,
    draws_with_replacement,
    check_training_loss,
    loss_tolerance,
    mid_accumulation_resume_error,
    seeded_losses,
    training_mode_losses,
    undeclared_coupling,
)
from lightning_influence.callbacks.target_data import (
    target_gradient,
    check_target_arguments,
    check_target_data,
)
from lightning_influence.callbacks.resume import check_same_setup, parameter_signature, setup_signature, target_signature
from lightning_influence.callbacks.hooks import BackwardWatch, EpochRepeats, OptimizerStepWatch, SubsetNumbering, draws_each_sample_once, warn_no_step
from lightning_influence.data import FixedBatches
from lightning_influence.batch_norm import fixed_statistics, removal_gap
from lightning_influence.distributed import Collective, rank_zero_buffers
from lightning_influence.estimators.diffin_batch_norm import (
    BATCH_NORM_REMOVALS,
    BatchNormMode,
    BatchNormRemoval,
    BatchNormTrace,
    check_batch_norm_mode,
    resolve_batch_norm_mode,
)
from lightning_influence.estimators.diffin_sweep import (
    CHECKED_GRADIENT_EVERY,
    LINEAR_REMOVAL_MIN_SAMPLES,
    DiffInSweep,
    PerSampleDerivatives,
    step_losses_and_gradient,
)
from lightning_influence.kernels import (
    FUNCTIONAL_CALL_ADVICE,
    KINKED_REL_STEP,
    BufferWatch,
    FiniteDifference,
    ParameterSpace,
    all_finite,
    check_functional_gradient,
    finite_flag,
    default_rel_step,
    evaluation_mode,
    has_mode_dependent_layers,
    is_mode_dependent,
    matches_any,
    parameter_names,
    kinked_operations,
    losses_and_gradient,
    per_sample_loss_function,
    spectral_norm_layers,
)
from lightning_influence.host import HostCopy
from lightning_influence.mixin import InfluenceMixin
from lightning_influence.optimizers import MODELLED_OPTIMIZERS, SecondMoment, StepModel, UnsupportedOptimizer, trainable_parameters
from lightning_influence.scores import InfluenceScores, ScoreAccumulator, check_writable
from lightning_influence.targets import TargetGradient, TargetKind
from lightning_influence.trajectory import Storage, StepRecord, Trajectory
from lightning_influence.validation import check_callback_name, check_count, check_seed

Mode = Literal["replay", "online"]
SUPPORTED = (
    f"supported: one optimizer among {MODELLED_OPTIMIZERS}, with any learning-rate scheduler and parameter "
    "groups; automatic optimization; gradient accumulation; Lightning's gradient clipping by norm or value; "
    "precision '32-true', '64-true', 'bf16-mixed' or '16-mixed'; a single-device strategy or DDP ('ddp', "
    "'ddp_spawn', 'ddp_fork', any number of processes and nodes)"
)
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "32", "64")
try:  # Lightning >= 2.5: the general averaging callback (EMAWeightAveraging is one)
    from lightning.pytorch.callbacks import WeightAveraging

    _WEIGHT_AVERAGING: tuple[type, ...] = (StochasticWeightAveraging, WeightAveraging)
except ImportError:  # pragma: no cover
    _WEIGHT_AVERAGING = (StochasticWeightAveraging,)
RANDOM_REDRAWS = 8
"""Training-mode re-evaluations of the first batch's losses under other random states that decide
whether a loss that differs between the modes is random (dropout-like) or deterministic."""

STATE_FORMAT = 2
"""Version of the callback's checkpoint state (``state_dict``)."""
CHECKPOINT_EVERY = 8
"""Default spacing of stored parameters, in steps (online: at most this; rebuilt in between from kept gradients)."""
VERIFIED_STEPS = 3
"""The first steps of every fit are re-run through the step model and compared with the real update."""


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
        window: online mode's minimum propagation length, in optimizer steps (default 256).
        score_every: online mode's block length (default: ``2 * window``). Each block costs
            ``(window + score_every) / score_every`` Hessian products per step; memory holds
            ``window + score_every`` recorded steps.
        storage: keep recorded steps in ``"memory"`` or spill them to ``"disk"`` (``spill_dir``).
        checkpoint_every: store parameters (and optimizer state) every k steps only and rebuild the
            steps in between during the sweep by re-running the optimizer from the last checkpoint.
            Default: 8 (online: the largest k <= 8 dividing ``window`` and ``score_every``), which
            with ``recompute="updates"`` keeps about one parameter-sized vector per step instead of
            two (four with Adam) for a few percent more time in the sweep; ``1`` records every
            step's parameters (no rebuild: scores differ from the default's only by the rebuild's
            rounding).
        recompute: how the steps between checkpoints are rebuilt. ``"updates"`` (default) keeps
            each step's gradient and re-runs only the optimizer's update (parameter-sized vector
            operations; memory per step: one gradient instead of parameters + gradient (+ Adam's
            two moments), plus those every k steps). ``"gradients"`` keeps only the batches and
            recomputes each step's gradient too (one extra gradient pass per step; needs a model
            without dropout/batch norm, full precision and no parameter subset).
        finite_difference: scheme of the Hessian-vector products. ``"auto"`` uses ``"forward"``
            differences against the gradient recorded in training when the model has no
            dropout/batch-norm layers (one backward pass per product), else ``"central"`` (two);
            also ``"central"`` for networks with kinks (ReLU-like activations, max pooling).
        fd_rel_step: relative finite-difference step (default: from the parameters' dtype; at
            least 5e-3 for networks with kinks, whose gradient jumps across them: about float32's
            default, so that the curvature is averaged over the same width in either dtype).
        per_sample: how each step's per-sample directional derivatives ``<grad l_i, v>`` are taken.
            ``"finite_difference"``: differences of the per-sample losses along ``v``. The Hessian
            product's gradient pass at ``theta + eps v`` computes one side; the other is the
            losses ``training_step`` computed at ``theta`` (through ``InfluenceMixin``'s loss tap,
            when training runs the same network: no dropout/batch norm, no autocast), else a
            plain forward pass at ``theta - eps v`` (central differences; about a third of a
            forward-mode pass on an MLP). The scores match forward mode's to about 2e-8
            (float64) and 4e-4 (float32) relative to their norm and reach the same Spearman
            against retraining (README).
            ``"forward_mode"``: one forward-mode pass per micro-batch, exact.
            A step without a product of its own (``hessian_every > 1``) takes a forward difference
            from training_step's losses: one forward pass without autograd.
            ``"auto"`` (default): finite differences, except forward mode for coupled losses (their
            removal derivatives need it), parameters below float32 (half precision cannot resolve
            the loss differences) and ``hessian_every > 1`` where training's network is not the
            sweep's (no training losses to difference against: two forward passes a step).
        chunk_size: evaluate each micro-batch in chunks of at most this many samples in the
            sweep's passes (forward-mode, gradient and loss passes; gradients are weighted by chunk
            size), bounding their memory independently of the batch size; the scores are the same.
            ``None`` (default): one pass per micro-batch. Not for ``coupled`` losses.
        hessian_every: propagate through blocks of k steps with one Hessian product each (at one
            step's batch, with the block's summed step sizes: ``prod (I - H_s L_s) ~ I - H_t sum L_s``),
            k times fewer products; exact propagation is ``1``. Accuracy cost in the README.
        params: attribute through these parameters only (``fnmatch`` patterns on the names of
            ``named_parameters()``, e.g. ``["head.*"]``; a tied parameter matches under any of its
            names, e.g. ``out.weight`` for an output layer sharing ``emb.weight``): derivatives, Hessian products and the
            propagated target gradient live in that subset; the other trainable parameters follow
            their recorded trajectory (stored with each step) but the removed sample's effect on
            them is not carried. Cheaper for large models; exact when the others are frozen.
        second_moment: Adam's preconditioner: ``"linearized"`` carries the removed sample's effect on
            the second-moment estimate, ``"frozen"`` treats ``lr / (sqrt(v_hat) + eps)`` as fixed.
        save_path: write the scores there at the end of fit (global rank zero).
        coupled: whether the module's per-sample losses are coupled within a batch (contrastive
            in-batch negatives); ``None`` (default) reads ``pl_module.coupled_batch_loss``. Coupled:
            removing ``z`` re-evaluates each batch's loss on the batch without ``z``
            (``pl_module.remove_from_batch``), at ``b`` extra forward-mode passes over sub-batches of
            ``b - 1`` per micro-batch and scored step (vectorised with ``vmap``); single process only.
            ``False`` on a coupled module scores it as if the losses were independent (only for
            comparisons: it is not the leave-one-out effect).
        batch_removal: what removing ``z`` from a batch of ``b`` means: ``"reaverage"`` (default) the
            batch's mean loss over the other ``b - 1`` samples, as retraining without ``z`` computes
            it; ``"drop"`` ``z``'s term dropped and the batch's ``1 / b`` kept, the counterfactual of
            SGD-influence (Hara et al., 2019), whose first-order step term is TracIn's. Judge each
            against :func:`~lightning_influence.evaluation.leave_one_out` with the same option.
            Not for coupled losses.
        batch_norm: how batch-norm layers are scored. ``"batch"``: as trained: each step's losses
            and Hessian products with the batch's own statistics, each sample's removal taken out
            of its batch's statistics (see ``batch_norm_removal``), and the running statistics
            carried through the sweep as part of the state (their own adjoint; each sample's
            effect on its step's statistics), so the target, read in evaluation mode, sees how
            removing a sample moves them. Micro-batches of at least two samples, one training
            forward per micro-batch, ``nn.BatchNorm1d/2d/3d`` (not ``SyncBatchNorm``) trained in
            training mode; not with ``chunk_size`` or ``batch_removal="drop"``. Under DDP each rank's
            shard is normalised with its own statistics, as DDP trains, and the running statistics
            are rank zero's (the ones DDP broadcasts and rank zero saves), moved by its shards alone;
            the linear removal only there.
            ``"running"``: in evaluation mode with the
            running statistics, like every other layer: exact for batch norm frozen in evaluation
            mode throughout, and a poor approximation of batch norm trained with batch statistics
            (Spearman 0.12 to 0.86 against true leave-one-out on digits MLP and CNN, against 0.95 to 0.998 as trained:
            ``benchmarks/batch_norm.py``).
            ``"auto"`` (default): ``"batch"`` for a model with batch norm where the run allows it;
            ``"running"`` where every batch norm layer is in evaluation mode from the first batch on
            (a frozen backbone's), or, with a warning naming why, where the run rules ``"batch"`` out.
        batch_norm_removal: how ``batch_norm="batch"`` takes a sample out of its batch's statistics.
            ``"linear"``: each sample's rows of the batch-norm inputs weighted, and the weights'
            gradient taken in the sweep's own gradient passes (the removal losses of
            :func:`~lightning_influence.kernels.removal_losses`): about the cost of the model without
            batch norm, first order in ``1 / (b - 1)`` (the running statistics' change exact, the
            network's response to it linearised: a few percent per step on batches of 32, the same
            Spearman as ``"exact"`` from batches of 16 on, 0.964 against 0.980 on batches of 8 in
            ``benchmarks/batch_norm.py``); micro-batches of fewer than 8 samples (a short last batch)
            are removed exactly all the same (in one process; linearly under DDP). Needs the batch-norm inputs' rows to be the batch's
            samples in order, their outputs to reach the loss through autograd (both checked on the
            first batch), and finite-difference per-sample derivatives. ``"exact"``: the batch
            re-evaluated without each sample (``remove_from_batch``; ``b`` forward-mode passes over
            sub-batches of ``b - 1`` per micro-batch and scored step, cost growing as ``b^2``), as
            for ``coupled`` losses; not with ``per_sample="finite_difference"`` or ``coupled=False``,
            nor under DDP.
            ``"auto"`` (default): ``"linear"``, except ``"exact"`` for a module whose loss couples its
            samples itself (``coupled_batch_loss``), with ``per_sample="forward_mode"``, or with
            parameters below float32.
        name: a name for this callback, needed only to put two ``DiffIn`` with the same options
            (e.g. two targets of the same kind read from different loaders) into one Trainer: it
            tells their checkpoint states apart (Lightning requires unique state keys) and is
            recorded in the scores' ``metadata["name"]``. ``pl_module.influence`` then holds the
            scores of the callback that finished last; read each one's :attr:`scores`.
        log_summary: send summary statistics to the Trainer's loggers (``diffin/...`` keys, written
            with ``logger.log_metrics`` so the module's own logged metrics and ``callback_metrics``
            are untouched): after each online block, the steps scored and the seconds spent in the
            callback; at the end of fit, the score spread (mean, std, min, quartiles, max, in
            target-loss units), the fraction of harmful (negative) samples, the callback seconds
            per optimizer step and the skipped steps.

    Distributed data parallel (``strategy="ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``; gloo or NCCL):
    the scores are those of the single-process run over the same sequence of *global* batches
    (the union of the ranks' shards of each step; DDP's averaged gradient is their mean; batch
    norm scored as trained normalises each rank's shard on its own, as DDP does). Every
    rank records its own shard; per-sample sums, the batch means of the score formula, target
    gradients over sharded loaders and Hessian products are reduced across ranks, so each rank
    does ``1 / world_size`` of the per-sample work. Samples that ``DistributedSampler`` repeats to
    pad an epoch (when the world size does not divide the dataset) really are trained on twice:
    each copy adds its own contribution, and the removal of ``z`` that a score predicts removes
    every copy (a global batch holding ``z`` twice shrinks by two); the sampler's padding copies
    are not counted twice in a ``"train"``/``"val"`` target. Only global rank zero writes files;
    under ``ddp_spawn``/``ddp_fork`` the scores reach the launching process through a file, and
    :attr:`scores` there reads them (``pl_module.influence`` is set in the worker processes). A
    checkpoint holds every rank's recorded shards (gathered into rank zero's callback state) and
    the score sums reduced over ranks; it resumes under the same number of processes. Training
    batches whose shards differ in size between ranks (custom batch samplers) are weighted by
    DDP per rank, not per sample: the scores then treat the global batch mean as the step's (a
    warning says so). FSDP, DeepSpeed and other strategies are refused.

    The optimizer step is modelled exactly (:class:`~lightning_influence.optimizers.StepModel`):
    the optimizers of :data:`~lightning_influence.optimizers.MODELLED_OPTIMIZERS` (SGD with
    momentum/Nesterov/weight decay, Adam, AdamW, RMSprop, Adagrad, NAdam, RAdam), any scheduler,
    gradient accumulation (one step over several micro-batches), Lightning's gradient clipping, and mixed precision
    (the unscaled gradients the optimizer used; steps the gradient scaler skipped, or any step
    with non-finite gradients, contribute nothing and are counted in ``skipped_steps``; steps
    without any gradient, e.g. where ``training_step`` returned ``None``, change nothing and are
    counted in ``empty_steps``). Parameters frozen or unfrozen during fit are refused. The
    derivatives themselves are evaluated in full precision, outside autocast, in eval mode
    (dropout off, batch-norm running statistics): with dropout or batch norm the scores are the
    influence through the deterministic (eval-mode) network along the recorded trajectory,
    except batch norm, which ``batch_norm="auto"`` scores as trained where it can (batch
    statistics, running statistics carried through the sweep).
    """

    def __init__(
        self,
        target: TargetKind = "val",
        mode: Mode = "replay",
        *,
        target_loader: Iterable[Any] | None = None,
        target_samples: int | None = None,
        seed: int = 0,
        window: int = 256,
        score_every: int | None = None,
        storage: Storage = "memory",
        spill_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        recompute: Literal["updates", "gradients"] = "updates",
        finite_difference: Literal["auto", "forward", "central"] = "auto",
        fd_rel_step: float | None = None,
        per_sample: PerSampleDerivatives | Literal["auto"] = "auto",
        chunk_size: int | None = None,
        hessian_every: int = 1,
        params: Sequence[str] | None = None,
        second_moment: SecondMoment = "linearized",
        save_path: str | Path | None = None,
        log_summary: bool = True,
        coupled: bool | None = None,
        batch_removal: BatchRemoval = "reaverage",
        batch_norm: BatchNormMode = "auto",
        batch_norm_removal: BatchNormRemoval = "auto",
        name: str | None = None,
    ) -> None:
        check_target_arguments(target, target_loader, target_samples)
        check_callback_name(name)
        if mode not in ("replay", "online"):
            raise ValueError(f"mode must be 'replay' or 'online', got {mode!r}")
        check_count("window", window)
        check_count("score_every", score_every, none_ok=True)
        check_count("checkpoint_every", checkpoint_every, none_ok=True)
        check_count("chunk_size", chunk_size, none_ok=True)
        check_count("hessian_every", hessian_every)
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        if finite_difference not in ("auto", "forward", "central"):
            raise ValueError(f"finite_difference must be 'auto', 'forward' or 'central', got {finite_difference!r}")
        score_every = score_every or 2 * window
        if checkpoint_every is None:
            checkpoint_every = math.gcd(window, score_every, CHECKPOINT_EVERY) if mode == "online" else CHECKPOINT_EVERY
        if mode == "online" and checkpoint_every > 1 and (window % checkpoint_every or score_every % checkpoint_every):
            raise ValueError(
                f"in online mode, window and score_every must be multiples of checkpoint_every, got window={window}, "
                f"score_every={score_every}, checkpoint_every={checkpoint_every}"
            )
        self.target: TargetKind = target
        self.mode: Mode = mode
        self.target_loader = target_loader
        self.target_samples = target_samples
        self.seed = seed
        self.window = window
        self.score_every = score_every
        self.storage: Storage = storage
        self.spill_dir = spill_dir
        self.checkpoint_every = checkpoint_every
        if recompute not in ("updates", "gradients"):
            raise ValueError(f"recompute must be 'updates' or 'gradients', got {recompute!r}")
        self.recompute: Literal["updates", "gradients"] = recompute
        self.finite_difference = finite_difference
        if fd_rel_step is not None and (isinstance(fd_rel_step, bool) or not 0.0 < fd_rel_step < 1.0):
            raise ValueError(
                f"fd_rel_step must be None (the default for the parameters' dtype) or a relative step in (0, 1), "
                f"e.g. 5e-3; got {fd_rel_step!r}"
            )
        self.fd_rel_step = fd_rel_step
        if per_sample not in ("auto", "forward_mode", "finite_difference"):
            raise ValueError(f"per_sample must be 'auto', 'forward_mode' or 'finite_difference', got {per_sample!r}")
        self.per_sample: PerSampleDerivatives | Literal["auto"] = per_sample
        self._per_sample: PerSampleDerivatives = "forward_mode"  # the method in use (resolved in on_fit_start)
        self.chunk_size = chunk_size
        self.hessian_every = hessian_every
        if isinstance(params, str):
            params = [params]  # one pattern (as a Hydra command line gives it)
        if params is not None and (not params or not all(isinstance(p, str) for p in params)):
            raise ValueError(f"params must be a non-empty list of name patterns such as ['head.*'], got {params!r}")
        self.params = list(params) if params is not None else None
        if second_moment not in ("linearized", "frozen"):
            raise ValueError(f"second_moment must be 'linearized' or 'frozen', got {second_moment!r}")
        self.second_moment: SecondMoment = second_moment
        self.save_path = Path(save_path) if save_path is not None else None
        if not isinstance(log_summary, bool):
            raise ValueError(f"log_summary must be True or False, got {log_summary!r} ({type(log_summary).__name__})")
        check_seed("seed", seed)  # the draw of target_samples
        self.log_summary = log_summary
        if coupled is not None and not isinstance(coupled, bool):
            raise ValueError(f"coupled must be None (the module's coupled_batch_loss), True or False, got {coupled!r}")
        self.coupled = coupled
        check_batch_removal(batch_removal)
        if batch_removal == "drop" and coupled:
            raise ValueError("batch_removal='drop' is defined for losses that are a sum of per-sample terms, not for coupled=True")
        self.batch_removal: BatchRemoval = batch_removal
        check_batch_norm_mode(batch_norm)
        if batch_norm_removal not in BATCH_NORM_REMOVALS:
            raise ValueError(
                f"batch_norm_removal must be 'auto', 'linear' (sample weights in the batch-norm statistics) or 'exact' (each "
                f"batch re-evaluated without each sample), got {batch_norm_removal!r}"
            )
        if batch_norm_removal == "linear" and (coupled or per_sample == "forward_mode"):
            raise ValueError(
                "batch_norm_removal='linear' differentiates sample weights in the batch-norm layers along the finite-difference "
                f"passes, which {'coupled=True (a loss that couples samples itself)' if coupled else 'per_sample=forward_mode'} "
                "rules out: use batch_norm_removal='exact' (or 'auto')"
            )
        if batch_norm == "batch":
            named = [k for k, v in _batch_norm_option_obstacles(coupled, batch_removal, chunk_size, per_sample, batch_norm_removal).items() if v]
            if named:
                raise ValueError(
                    f"batch_norm='batch' scores each batch's loss with its own statistics, a coupled batch loss whose removal "
                    f"takes the sample out of the whole batch's statistics, which {', '.join(named)} does not allow: leave it "
                    "at its default, or use batch_norm='running'"
                )
        self.batch_norm: BatchNormMode = batch_norm
        self.batch_norm_removal: BatchNormRemoval = batch_norm_removal
        self._batch_norm: Literal["running", "batch"] = "running"  # batch_norm as resolved for this fit (setup)
        self._batch_norm_removal: Literal["linear", "exact"] = "exact"  # batch_norm_removal as resolved (setup)
        self._batch_norm_trace: BatchNormTrace | None = None
        self._batch_norm_pending = False  # "auto" looks at the layers' modes once more at the first batch
        self.name = name
        self._coupled = False
        self._kinks: list[str] | None = None  # kinked operations of the loss (traced on the first batch)
        self._kinks_pending = False
        self._functional_check_pending = False
        self._batch_norm_checks_pending = False
        self._cancelled_check_pending = False
        self._theta_at_start: list[Tensor] | None = None  # the parameters at a verified step's first micro-batch
        self._restored_kinks: list[str] | None = None
        self._recorded_is_exact = True
        self._random_training = False  # the loss is random in training mode only (dropout written as a function)
        self._restored_random_training = False
        self._inexact_rebuild = False  # the modelled update misses the real one by more than a product's step
        self._buffer_watch: BufferWatch | None = None  # started at the first batch
        self._changed_buffers: list[str] = []  # buffers/untrained parameters training changed (recorded per step)
        self._removed_buffers: list[str] = []  # those of them removed from the module (not recorded)
        self._varying_defaults: dict[str, Tensor] = {}  # their values before they first changed
        self._restored_changed: tuple[list[str], list[str], dict[str, Tensor]] = ([], [], {})
        self._scores: InfluenceScores | None = None
        # ddp_spawn / ddp_fork: rank zero hands the scores to this (launching) process through this file.
        self._owner_pid = os.getpid()
        self._handoff = Path(tempfile.gettempdir()) / f"lightning-influence-diffin-{self._owner_pid}-{uuid.uuid4().hex}.pt"
        weakref.finalize(self, _remove_handoff, self._handoff, self._owner_pid)
        self._collective = Collective()
        self._restored_world = 1
        self._restored_rank_records: list[list[dict[str, Any]]] | None = None
        self._uneven_warned = False
        self._repeats = False  # the training loader may repeat a sample within a batch (set at the first batch)
        self.steps_seen = 0
        self.steps_scored = 0
        self.truncated_sweeps = 0
        self.steps_scored_truncated = 0
        self.skipped_steps = 0
        self.empty_steps = 0
        self.singleton_steps = 0
        self.seconds = 0.0
        self._accumulator: ScoreAccumulator | None = None
        self._trajectory: Trajectory | None = None
        self._sweep: DiffInSweep | None = None
        self._target: TargetGradient | None = None
        self._space: ParameterSpace | None = None
        self._context_space: ParameterSpace | None = None
        self._model: StepModel | None = None
        self._micro_batches: list[tuple[Any, Tensor]] = []
        self._capture_losses = False  # reuse training_step's per-sample losses (set in on_fit_start)
        self._micro_losses: dict[int, Tensor] = {}  # micro-batch position -> its per-sample losses at theta_t
        self._batch_open = False  # a training batch started and has not ended
        self._tap_losses = False  # see training_step's per-sample losses (an InfluenceMixin module; set in on_fit_start)
        self._loss_pairs: list[tuple[Tensor, float]] = []  # per micro-batch: (training_step's loss, their mean, mean |loss|), tolerance
        self._unverified: StepRecord | None = None
        self._held: _HeldStep | None = None  # the last step, until its ids and finiteness reach the host
        self._first_skipped: str | None = None  # where the first step with non-finite gradients was (for messages)
        self._num_samples: int | None = None  # the training dataset's length (set at the first batch)
        self._loss_check: Tensor | None = None
        self._loss_scale = 0.0  # mean |per-sample loss| of the first batch: the scale of the first-step loss check
        self._loss_checked = False
        self._first_batch_checked = False  # the first batch's checks ran (its loss comparison may still be pending)
        self._loss_dtype: torch.dtype | None = None
        """The per-sample losses' dtype (seen on the first batch): finite differences of a loss rounded to a
        lower precision than the parameters' (e.g. ``F.cross_entropy(logits.float(), y)`` on a float64
        model) take that precision's steps."""
        self._restored_loss_dtype: torch.dtype | None = None
        self._restored = False
        self._restored_records: list[dict[str, Any]] = []
        self._restored_verified = 0
        self._restored_loss_checked = False
        self._restored_finished = False  # the checkpoint was saved after the end-of-fit sweep
        self._finished = False
        self._resume_check_pending = False
        self._store_resumed_step = False
        self._signature: dict[str, Any] = {}  # the fit's setup, compared on resume (_setup_signature)
        self._estimator_name = "diffin"  # metadata["estimator"] (the sgd_influence estimator sets its own)
        self._target_print: dict[str, Any] | None = None  # the target data's signature (_target_signature), once a fit
        self._restored_signature: dict[str, Any] | None = None
        self._epoch_start_step = 0  # the index (steps_seen) of the current epoch's first step
        self._restored_epoch_start: int | None = None
        self._restored_steps_ids: list[tuple[int, list[Tensor]]] = []  # (step, ids per micro-batch) restored on resume
        self._resumed_epoch_batches: list[Tensor] = []  # ids of the resumed epoch's batches before the checkpoint
        self._resume_once = False  # whether the resumed epoch's sampler yields each sample once
        self._resumed_fixed: list[FixedBatches] = []  # the resumed fit's FixedBatches training loaders
        self._backward = BackwardWatch()  # did the last micro-batch's backward run?
        self._epoch_repeats = EpochRepeats("DiffIn")  # ids that come back within an epoch (ids that are not dataset positions)
        self._subset_numbering = SubsetNumbering()  # a training IndexedDataset numbering a subset that changes
        # The hyperparameters are read again where optimizer.step starts its update (after every
        # on_before_optimizer_step and clipping): a learning rate changed after DiffIn's hook is the one used.
        self._step_watch = OptimizerStepWatch(self._on_optimizer_step, "DiffIn", carries_state=True)
        self._stepping: tuple[StepRecord, float] | None = None  # the record of the step about to be taken, its rest
        self._to_append: StepRecord | None = None  # a record appended once its step has started (hyper final)
        self._saved_parameters: dict[str, Tensor] | None = None  # the resumed checkpoint's, until the first batch
        self._verified_steps = 0
        self._data_checks_pending = False  # set per fit: first-batch checks of the training and target data
        self._target_checks_pending = False
        self._target_source: Any = None

    @property
    def scores(self) -> InfluenceScores | None:
        """The scores of the last fit (``None`` before). Under ``ddp_spawn``/``ddp_fork`` they are
        read, in the launching process, from the file rank zero handed them over in (reading them
        there also sets the counters ``steps_seen``, ``steps_scored``, ... and ``seconds`` from the
        workers' run)."""
        if os.getpid() == self._owner_pid and self._handoff.exists():
            scores = InfluenceScores.load(self._handoff)
            self._handoff.unlink(missing_ok=True)
            self._scores = scores
            meta = scores.metadata
            for name in ("steps_seen", "steps_scored", "truncated_sweeps", "steps_scored_truncated", "skipped_steps", "empty_steps", "singleton_steps"):
                setattr(self, name, int(meta[name]))  # type: ignore[arg-type]
            self.seconds = float(meta["callback_seconds"])  # type: ignore[arg-type]
        return self._scores

    @scores.setter
    def scores(self, value: InfluenceScores | None) -> None:
        self._scores = value

    @property
    def state_key(self) -> str:
        extra: dict[str, Any] = {} if self.coupled is None else {"coupled": self.coupled}
        if self.name is not None:
            extra["name"] = self.name
        # Options that change what the state means, named when not the default (so the keys of the defaults stay):
        # a checkpoint of another target subset or block length is not resumed as if it were this one.
        if self.target_samples is not None:
            extra.update(target_samples=self.target_samples, seed=self.seed)
        if self.mode == "online" and self.score_every != 2 * self.window:
            extra["score_every"] = self.score_every
        if self.batch_removal != "reaverage":
            extra["batch_removal"] = self.batch_removal
        if self.batch_norm != "auto":
            extra["batch_norm"] = self.batch_norm
        if self.batch_norm_removal != "auto":
            extra["batch_norm_removal"] = self.batch_norm_removal
        return self._generate_state_key(
            target=self.target, mode=self.mode, window=self.window, hessian_every=self.hessian_every, params=self.params, **extra
        )

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._scores, self._finished = None, False  # this fit's, once it ends (a refusal below leaves none)
        check_influence_aware(pl_module)
        global_zero = bool(getattr(trainer, "is_global_zero", True))
        if global_zero:
            # A hand-over file an earlier ddp_spawn fit left unread must not stand for this fit's scores.
            self._handoff.unlink(missing_ok=True)
        if not pl_module.automatic_optimization:
            raise ValueError(f"DiffIn does not model manual optimization; {SUPPORTED}")
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, (DeepSpeedStrategy, XLAStrategy)):
            raise ValueError(
                f"DiffIn does not support strategy {type(strategy).__name__}: it models the optimizer step on full, "
                f"replicated parameters (sharded strategies such as FSDP and DeepSpeed are not modelled); {SUPPORTED}"
            )
        averaging = [type(cb).__name__ for cb in getattr(trainer, "callbacks", []) if isinstance(cb, _WEIGHT_AVERAGING)]
        if averaging:
            raise ValueError(
                f"DiffIn does not model {', '.join(averaging)}: it replaces the trained parameters with an average of the "
                "trajectory's (at the end of fit, and for validation), so the model the fit ends with is not the one at "
                "the end of the trajectory that DiffIn scores, and the scores would predict removals for neither. Score "
                f"the run without the averaging callback; {SUPPORTED}"
            )
        spectral = spectral_norm_layers(pl_module)
        if spectral:
            rank_zero_warn(
                f"DiffIn: {', '.join(spectral[:4])} use spectral normalisation, whose power iteration changes its u/v "
                "vectors with the weights at every training forward. DiffIn records them per step and scores the run "
                "as if they were given (not how they follow the weights): the scores predict removals in a run with "
                "those vectors held, which can differ much from real retraining when the top singular values are "
                "close (benchmarks/approximations.py, digits MLP: Spearman 0.998-0.999 against the held-vector "
                "retraining, 0.09-0.61 against true leave-one-out). A stateless normalisation (W / torch.linalg.matrix_norm(W, ord=2)) is "
                "scored exactly"
            )
        self._coupled = bool(pl_module.coupled_batch_loss if self.coupled is None else self.coupled)
        self._batch_norm = self._resolve_batch_norm(trainer, pl_module)
        if self._batch_norm == "batch":
            BatchNormTrace(pl_module)  # refuses a model without batch norm, or with layers it does not model
            if _syncs_batch_norm(trainer):
                raise ValueError(
                    "DiffIn(batch_norm='batch') models each rank's shard normalised on its own, and Trainer(sync_batchnorm="
                    "True) makes the model's batch norm SyncBatchNorm (statistics over every rank's shard), which is not "
                    "modelled: train without sync_batchnorm, or use batch_norm='running' (evaluation mode, an approximation)"
                )
            if str(trainer.precision) == "16-mixed":
                raise ValueError(f"DiffIn(batch_norm='batch') does not model {SIXTEEN_MIXED}: use batch_norm='running'")
            self._batch_norm_removal = self._resolve_batch_norm_removal(pl_module)
            if self._batch_norm_removal == "exact" and int(getattr(trainer, "world_size", 1) or 1) > 1:
                raise ValueError(
                    "DiffIn(batch_norm='batch'): under DDP batch norm is scored with batch_norm_removal='linear' only (the "
                    "exact removal re-evaluates each batch without each sample, in one process), and this run needs the "
                    "exact one (batch_norm_removal='exact', a loss declaring coupled_batch_loss, per_sample='forward_mode' "
                    "or parameters below float32). Use batch_norm_removal='linear', train on one device (devices=1) for "
                    "scoring, or use batch_norm='running'"
                )
            if self._batch_norm_removal == "exact":
                self._coupled = True  # each batch's loss depends on the whole batch through its statistics: sub-batches
        if self._coupled and self.batch_removal == "drop":
            raise ValueError(
                f"{type(pl_module).__name__} declares coupled_batch_loss, and batch_removal='drop' is defined for losses that "
                "are a sum of per-sample terms: use batch_removal='reaverage' (the batch loss recomputed without the sample)"
            )
        if self._coupled and int(getattr(trainer, "world_size", 1) or 1) > 1:
            raise ValueError(
                f"{type(pl_module).__name__} declares coupled_batch_loss (each sample's loss depends on its batch): "
                "DiffIn scores coupled losses in a single process only, since removing a sample changes the losses of "
                "the whole global batch, which DDP shards across ranks. Train on one device (devices=1) for scoring"
            )
        precision = str(trainer.precision)
        if precision not in PRECISIONS:
            raise ValueError(f"DiffIn does not model precision={precision!r}; {SUPPORTED}")
        if type(pl_module).configure_gradient_clipping is not L.LightningModule.configure_gradient_clipping:
            raise ValueError(
                f"{type(pl_module).__name__} overrides configure_gradient_clipping, which DiffIn cannot model; use the "
                f"Trainer's gradient_clip_val / gradient_clip_algorithm instead ({SUPPORTED})"
            )
        if type(pl_module).optimizer_zero_grad is not L.LightningModule.optimizer_zero_grad:
            raise ValueError(
                f"{type(pl_module).__name__} overrides optimizer_zero_grad: DiffIn reads each optimizer step's gradient "
                "as the sum over that step's micro-batches, and a hook that keeps gradients across steps (hand-made "
                "accumulation) or clears them differently would be scored as another run. Remove the override and use "
                f"Trainer(accumulate_grad_batches=k) for accumulation ({SUPPORTED})"
            )
        if self.save_path is not None and global_zero:
            check_writable(self.save_path, "DiffIn")
        if self.checkpoint_every > 1 and self.recompute == "gradients":
            why = None
            if has_mode_dependent_layers(pl_module):
                why = "a model with dropout or batch norm"
            elif self.params is not None:
                why = "a parameter subset (params=...)"
            elif precision in ("bf16-mixed", "16-mixed"):
                why = f"precision={precision!r} (the training gradients came from autocast)"
            if why:
                raise ValueError(
                    f"checkpoint_every > 1 with recompute='gradients' recomputes the training gradients exactly, which is "
                    f"not possible with {why}; use recompute='updates' (keeps each step's gradient) or checkpoint_every=1 (stores every step)"
                )

    def _needs_exact_removal(self, pl_module: L.LightningModule) -> bool:
        """Whether ``batch_norm_removal`` resolves to ``"exact"`` for this module and these options."""
        coupled = bool(pl_module.coupled_batch_loss if self.coupled is None else self.coupled)  # type: ignore[attr-defined]
        low_precision = any(torch.finfo(p.dtype).bits < 32 for p in pl_module.parameters() if p.is_floating_point())
        return self.batch_norm_removal == "exact" or (self.batch_norm_removal == "auto" and (coupled or low_precision or self.per_sample == "forward_mode"))

    def _resolve_batch_norm_removal(self, pl_module: L.LightningModule) -> Literal["linear", "exact"]:
        """``batch_norm_removal`` for a fit that scores batch norm as trained: ``"auto"`` takes the sample
        weights (``"linear"``) unless the loss couples its samples itself (``coupled``), forward-mode
        derivatives are asked for, or the parameters are below float32 (too coarse for the differences)."""
        coupled = bool(pl_module.coupled_batch_loss if self.coupled is None else self.coupled)  # type: ignore[attr-defined]
        low_precision = any(torch.finfo(p.dtype).bits < 32 for p in pl_module.parameters() if p.is_floating_point())
        if self.batch_norm_removal == "linear" and (coupled or low_precision):
            why = "declares coupled_batch_loss (a loss that couples samples itself)" if coupled else "has parameters below float32"
            raise ValueError(
                f"DiffIn(batch_norm_removal='linear'): {type(pl_module).__name__} {why}, which the sample weights in the "
                "batch-norm layers do not model: use batch_norm_removal='exact' (or 'auto')"
            )
        return "exact" if self._needs_exact_removal(pl_module) else "linear"

    def _resolve_batch_norm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Literal["running", "batch"]:
        """``batch_norm`` for this fit: ``"auto"`` scores a batch-norm model as trained unless the run or
        the options rule it out, and then warns that the scores are an approximation."""
        if self.batch_norm != "auto":
            return self.batch_norm
        mode, reasons = resolve_batch_norm_mode(
            pl_module,
            {
                "training runs in several processes (DDP), where batch norm is removed linearly only, and this run "
                "needs the exact removal": int(getattr(trainer, "world_size", 1) or 1) > 1 and self._needs_exact_removal(pl_module),
                "Trainer(sync_batchnorm=True) makes its batch norm SyncBatchNorm (statistics over every rank's shard), "
                "which is not modelled": _syncs_batch_norm(trainer),
                SIXTEEN_MIXED: str(trainer.precision) == "16-mixed",
                **_batch_norm_option_obstacles(self.coupled, self.batch_removal, self.chunk_size, self.per_sample, self.batch_norm_removal),
            },
        )
        if reasons:
            rank_zero_warn(
                f"DiffIn: {type(pl_module).__name__} has batch norm, which batch_norm='auto' scores as trained (batch "
                f"statistics, running statistics carried) where it can; here {'; '.join(reasons)}, so it is scored in "
                "evaluation mode with the running statistics (batch_norm='running'), a poor approximation of batch norm "
                "trained with batch statistics (Spearman 0.12 to 0.86 against true leave-one-out on digits MLP and CNN, "
                "benchmarks/batch_norm.py). Pass batch_norm='running' to silence this"
            )
        return mode

    def _settle_batch_norm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``batch_norm="auto"`` at the first batch of a fit, once the hooks that run before it have set
        the modules' modes and the training loader exists. Batch norm that training runs in evaluation
        mode throughout (a frozen backbone's, e.g. ``.eval()`` in ``on_train_epoch_start``) normalises
        with fixed running statistics, which ``"running"`` models exactly, without the coupled removal.
        A loader whose last batch leaves batch norm no batch once a sample is removed (one sample;
        two with ``BatchNorm1d``, whose inputs may hold one value per channel) rules ``"batch"`` out:
        ``"running"``, with a warning. Layers frozen later, or only some of them, are refused at their
        step (``BatchNormTrace.check_training``). An explicit ``batch_norm="batch"`` refuses such a
        loader here, before training."""
        trace, sweep = self._batch_norm_trace, self._sweep
        if trace is None or sweep is None:
            return
        frozen = not any(layer.training for _, layer in trace.layers)
        short = _last_batch_size(trainer)
        if self._collective.distributed:
            # Every rank decides alike (a rank scoring in another mode would wait in other collectives): the
            # shortest last batch of any rank (each rank's loader is its own), frozen only where frozen everywhere.
            sizes = self._collective.gather(torch.tensor([short or 0, int(frozen)], device=pl_module.device))
            shorts = [int(t[0]) for t in sizes if int(t[0]) > 0]
            short, frozen = (min(shorts) if shorts else None), all(bool(t[1]) for t in sizes)
        one_d = any(isinstance(layer, nn.BatchNorm1d) for _, layer in trace.layers)
        too_short = short == 1 or (short == 2 and one_d)
        if self.batch_norm == "batch" and too_short and not frozen:
            raise ValueError(
                f"DiffIn(batch_norm='batch'): the training loader's last batch holds {short} sample(s), too few for batch "
                "norm once one is removed (a batch of one has no statistics; BatchNorm1d on two leaves one value per "
                "channel). Use DataLoader(drop_last=True), or batch_norm='running' (evaluation mode, an approximation)"
            )
        if not frozen and not too_short and short is not None and short < LINEAR_REMOVAL_MIN_SAMPLES:
            rank_zero_warn(
                f"DiffIn: the training loader's last batch holds {short} samples, and batch norm is scored as trained: "
                f"removing one of them moves that batch's statistics by about 1/{short - 1} of themselves, where the "
                "network's curvature in them is large, and the linearised steps follow that poorly, which can lower the "
                "accuracy of every score of the run, not only those of that batch's samples. DataLoader(drop_last=True) "
                "avoids it (README, 'Batch norm')"
            )
        size = getattr(trainer.train_dataloader, "batch_size", None)
        if self._collective.distributed and not frozen and not too_short and size is not None and size < LINEAR_REMOVAL_MIN_SAMPLES:
            rank_zero_warn(
                f"DiffIn: each rank's micro-batches hold {size} samples and batch norm is scored as trained: under DDP every "
                f"micro-batch is removed linearly (in one process those of fewer than {LINEAR_REMOVAL_MIN_SAMPLES} are removed "
                "exactly), first order in 1/(b-1) of its statistics, which loses accuracy on batches this small (README, "
                "'Batch norm'). Larger per-rank batches avoid it"
            )
        if self.batch_norm == "batch" or (not frozen and not too_short):
            return
        if not frozen:
            rank_zero_warn(
                f"DiffIn: the training loader's last batch holds {short} sample(s), too few for batch norm once one is "
                "removed, so batch_norm='auto' scores batch norm in evaluation mode with the running statistics "
                "(batch_norm='running'), a poor approximation of batch norm trained with batch statistics (Spearman 0.12 "
                "to 0.86 against true leave-one-out on digits MLP and CNN, benchmarks/batch_norm.py). "
                "DataLoader(drop_last=True) lets it score batch norm as trained"
            )
        self._batch_norm, self._batch_norm_trace, sweep.batch_norm = "running", None, None
        sweep.verify_recorded = sweep.verify_recorded and not self._mode_dependent(pl_module, as_swept=True)  # now evaluation mode
        self._coupled = bool(pl_module.coupled_batch_loss if self.coupled is None else self.coupled)  # type: ignore[attr-defined]
        if not self._coupled:
            sweep.remove = None
        # what on_fit_start resolved for the coupled path: as an explicit batch_norm="running" resolves it
        self._per_sample = self._resolve_per_sample()
        sweep.per_sample = self._per_sample
        self._set_differences(pl_module, *self._differences(self._kinks or []))
        options = dict(self._signature["options"])
        options.pop("batch_norm", None)
        options.pop("batch_norm_removal", None)
        self._signature = {**self._signature, "options": options}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_repeats.reset()
        self._subset_numbering.reset()
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"DiffIn needs exactly one optimizer, got {len(optimizers)}; {SUPPORTED}")
        optimizer = optimizers[0]
        attributed, context = self._split_parameters(pl_module, optimizer)
        self._space = ParameterSpace.from_parameters(attributed)
        self._params = [p for _, p in attributed]
        self._context_space = ParameterSpace.from_parameters(context) if context else None
        self._context = [p for _, p in context]
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
        self._model = StepModel(
            optimizer,
            self._params,
            clip_val=trainer.gradient_clip_val,
            clip_algorithm=algorithm,
            second_moment=self.second_moment,
        )
        self._mixed = str(trainer.precision) in ("bf16-mixed", "16-mixed")
        if torch.finfo(self._space.dtype).bits < 32 and self._model.is_adaptive:
            raise UnsupportedOptimizer(
                f"DiffIn: the module's parameters are {self._space.dtype} and the optimizer is "
                f"{type(self._model.optimizer).__name__}: its update divides by sqrt(v) + eps, which in a half-precision "
                "dtype DiffIn's model of the step reproduces only to that dtype's rounding, too coarsely for the rebuilt "
                "steps and the update's check. Keep the parameters in float32 and train with precision='bf16-mixed' "
                "(or '16-mixed'), or use SGD on half-precision parameters"
            )
        self._collective = Collective.from_trainer(trainer)
        loss_fn = per_sample_loss_function(pl_module)
        self._loss_fn = loss_fn
        self._target = self._make_target(trainer, pl_module)
        self._signature, self._target_print = self._setup_signature(trainer, attributed, context), None
        # The gradient recorded in training is the forward difference's base when it equals the one the
        # sweep would compute: same network (no dropout/batch norm) and full precision (no autocast).
        if not self._restored:
            self._inexact_rebuild = False
        # Found on the first batch (_check_mode_independent_losses); a resumed fit keeps the finding of the run it continues.
        self._random_training = self._restored_random_training if self._restored else False
        self._recorded_is_exact = not self._mode_dependent(pl_module) and not self._mixed and not self._inexact_rebuild
        # Kinks (ReLU, max pooling, clamps, L1 losses) are found by tracing the loss on the first batch; until then
        # (and for good when the scheme and the step are both given) the loss counts as smooth. A resumed fit
        # keeps the decision of the run it continues.
        kinks, self._restored_kinks = self._restored_kinks, None
        self._kinks = kinks
        self._kinks_pending = kinks is None and (self.finite_difference == "auto" or self.fd_rel_step is None)
        self._functional_check_pending = True
        self._batch_norm_checks_pending = True
        self._cancelled_check_pending = self._model.second_moment_starts_at_zero and has_mode_dependent_layers(pl_module)
        # Tensors that an earlier part of a resumed run changed are recorded from the start (removed ones keep
        # the products off the recorded gradients).
        self._buffer_watch = None
        (self._changed_buffers, self._removed_buffers, defaults), self._restored_changed = self._restored_changed, ([], [], {})
        self._varying_defaults = {name: value.to(self._space.device) for name, value in defaults.items()}
        if self._removed_buffers:
            self._recorded_is_exact = False
        self._loss_dtype, self._restored_loss_dtype = self._restored_loss_dtype, None
        scheme, rel_step, reuse = self._differences(kinks or [])
        self._per_sample = self._resolve_per_sample()
        self._micro_losses, self._loss_pairs = {}, []
        # Every step compares training_step's loss with the mean of the per-sample losses it computed (the tap):
        # on the device, read with the step's other host values. Not under mixed precision, whose scaler hands
        # on_before_backward the scaled loss (the first step's check covers it).
        self._tap_losses = isinstance(pl_module, InfluenceMixin) and not self._mixed
        self._scores = None  # a fit that fails leaves no earlier fit's scores behind (set again at its end)
        if not self._restored:
            # A new fit scores a new run: earlier results refer to another final model.
            self._accumulator = ScoreAccumulator(capacity=dataset_length(trainer) or 0)
            self.steps_seen = self.steps_scored = self.truncated_sweeps = self.steps_scored_truncated = 0
            self.skipped_steps = self.empty_steps = self.singleton_steps = 0
            self._first_skipped = None
            self.seconds = 0.0
        self._loss_checked, self._loss_check, self._first_batch_checked = False, None, False
        self._verified_steps = 0
        self._micro_batches, self._unverified, self._held = [], None, None
        self._stepping, self._to_append = None, None
        self._backward.watch([*self._params, *self._context])
        self._step_watch.watch(optimizer)
        restored_records: list[dict[str, Any]] = []
        if self._restored:  # resuming: carry on with the restored scores and recorded steps
            self._loss_checked, self._verified_steps = self._restored_loss_checked, self._restored_verified
            restored_records, self._restored_records = self._take_rank_part(self._restored_records), []
            self._restored_steps_ids = [(int(r["step"]), list(r["ids"])) for r in restored_records]
            self._resume_check_pending = True  # checked at the first batch, once Lightning has restored its loops
        self._restored, self._finished = False, False
        if self.mode == "online" and self.target == "train" and self.target_samples is None:
            rank_zero_warn(
                "DiffIn(mode='online', target='train') evaluates the full training loss at every block of "
                f"{self.score_every} steps; pass target_samples=<k> to use a fixed subset and bound this cost"
            )
        self._batch_norm_trace = BatchNormTrace(pl_module) if self._batch_norm == "batch" else None
        self._batch_norm_pending = self._batch_norm_trace is not None  # settled (or checked) at the first batch
        self._sweep = DiffInSweep(
            pl_module,
            loss_fn,
            self._space,
            self._target,
            self._accumulator,
            self._model,
            context_space=self._context_space,
            finite_difference=scheme,
            fd_rel_step=rel_step,
            reuse_recorded_gradient=reuse,
            hessian_every=self.hessian_every,
            collective=self._collective,
            remove=pl_module.remove_from_batch if self._coupled else None,  # type: ignore[attr-defined]
            batch_removal=self.batch_removal,
            per_sample=self._per_sample,
            chunk_size=self.chunk_size,
            batch_norm=self._batch_norm_trace,
            batch_norm_removal=self._batch_norm_removal,
        )
        self._sweep.varying_defaults = self._varying_defaults  # the same dict: filled as tensors start to change
        # Training's loss is the sweep's (no dropout, batch norm in evaluation mode or autocast): each sweep checks a
        # recorded gradient.
        self._sweep.verify_recorded = not self._mode_dependent(pl_module, as_swept=True) and not self._mixed and not self._removed_buffers
        self._sweep.rebuilt_exactly = not self._inexact_rebuild
        if self._batch_norm == "batch" and self._batch_norm_removal == "linear":
            # short micro-batches (fewer than LINEAR_REMOVAL_MIN_SAMPLES) are removed exactly, through the sub-batches
            self._sweep.small_batch_remove = getattr(pl_module, "remove_from_batch", None)
        self._set_differences(pl_module, scheme, rel_step, reuse)
        self._trajectory = Trajectory(
            self.storage,
            self.spill_dir,
            self.checkpoint_every,
            device=self._space.device,
            keep_gradients=self.checkpoint_every > 1 and self.recompute == "updates",
        )
        self._trajectory.restore(restored_records)

    def _mode_dependent(self, pl_module: L.LightningModule, as_swept: bool = False) -> bool:
        """Whether training's network differs from evaluation mode: dropout or batch-norm layers, or a
        loss found random in training mode only on the first batch. ``as_swept``: from the sweep's
        network instead, which runs batch norm scored as trained (``batch_norm="batch"``) with batch
        statistics, as training did: then only the other layers count."""
        if self._random_training:
            return True
        if as_swept and self._batch_norm == "batch":  # (a layer frozen in evaluation mode is refused at its step)
            return any(is_mode_dependent(m) and not (isinstance(m, _BatchNorm) and m.training) for m in pl_module.modules())
        return has_mode_dependent_layers(pl_module)

    def _sweep_mode(self, pl_module: L.LightningModule) -> contextlib.AbstractContextManager[None]:
        """The mode the sweep evaluates the step losses in: evaluation mode, with batch statistics in
        batch norm scored as trained."""
        if self._batch_norm_trace is not None:
            return self._batch_norm_trace.batch_statistics_mode()
        return evaluation_mode(pl_module)

    @property
    def _loss_dtype_name(self) -> str | None:
        """The losses' dtype as metadata and checkpoint state write it (``"float32"``)."""
        return str(self._loss_dtype).removeprefix("torch.") if self._loss_dtype is not None else None

    def _differences(self, kinks: Sequence[str]) -> tuple[FiniteDifference, float | None, bool]:
        """The finite differences for a loss with these kinked operations: ``(scheme, relative step,
        whether the forward difference's base is the gradient recorded in training)``. ``"auto"``:
        forward differences against the recorded gradient where it is the sweep's (one gradient pass
        per product), else central; for a loss with kinks central, with a step of at least
        :data:`KINKED_REL_STEP` that averages over them (a tiny step that crosses one turns the
        gradient's jump into a spurious product of size jump / eps)."""
        assert self._space is not None
        if self.finite_difference == "auto":
            scheme: FiniteDifference = "forward" if self._recorded_is_exact and not kinks else "central"
        else:
            scheme = self.finite_difference
        rel_step = self.fd_rel_step
        precision = self._space.dtype
        if self._loss_dtype is not None and torch.finfo(self._loss_dtype).eps > torch.finfo(precision).eps:
            precision = self._loss_dtype  # the losses (and what they feed back) carry only this precision
            if rel_step is None:
                rel_step = default_rel_step(precision, scheme)
        if rel_step is None and kinks:
            rel_step = max(KINKED_REL_STEP, default_rel_step(precision, scheme))
        return scheme, rel_step, scheme == "forward" and self._recorded_is_exact

    def _set_differences(self, pl_module: L.LightningModule, scheme: FiniteDifference, rel_step: float | None, reuse: bool) -> None:
        assert self._sweep is not None
        self._sweep.finite_difference, self._sweep.fd_rel_step, self._sweep.reuse_recorded_gradient = scheme, rel_step, reuse
        # Forward differences of the losses need the losses at theta_t: training_step computes them
        # (through InfluenceMixin's loss tap) when training's network is the sweep's (``reuse``).
        self._capture_losses = (
            self._per_sample == "finite_difference"
            and reuse
            and not self._coupled
            and self._batch_norm_trace is None  # with batch norm as trained the sweep differences its own removal losses
            and isinstance(pl_module, InfluenceMixin)
        )

    def _find_kinks(self, pl_module: L.LightningModule, batch: Any) -> None:
        """Trace the sweep's loss on the first batch for kinked operations on parameter-dependent
        values (:func:`~lightning_influence.kernels.kinked_operations`) and set the finite
        differences for them; in distributed runs every rank takes the same decision."""
        assert self._space is not None and self._loss_fn is not None
        params = dict(zip(self._space.names, self._params, strict=True))
        with evaluation_mode(pl_module):
            kinks = kinked_operations(self._loss_fn, params, batch, pl_module)
        if self._collective.distributed:
            anywhere = self._collective.max(torch.tensor([len(kinks)], device=pl_module.device))
            if not kinks and int(anywhere[0]) > 0:
                kinks = ["(another rank's batch)"]
        self._kinks = kinks
        self._set_differences(pl_module, *self._differences(kinks))

    def _check_sample_weighting(self, pl_module: L.LightningModule, batch: Any) -> None:
        """The linear removal's assumptions on the first batch (:meth:`BatchNormTrace.check_sample_weighting`).
        Where ``remove_from_batch`` takes out more than the sample, micro-batches of fewer than
        :data:`~lightning_influence.estimators.diffin_sweep.LINEAR_REMOVAL_MIN_SAMPLES` samples are
        removed linearly like the others, with a warning."""
        trace, space, loss_fn, sweep = self._batch_norm_trace, self._space, self._loss_fn, self._sweep
        assert trace is not None and space is not None and loss_fn is not None and sweep is not None
        owner = "DiffIn(batch_norm_removal='linear'" + (", which 'auto' chooses)" if self.batch_norm_removal == "auto" else ")")
        params = dict(zip(space.names, self._params, strict=True))
        unusable = trace.check_sample_weighting(loss_fn, params, batch, getattr(pl_module, "remove_from_batch", None), owner)
        if unusable is not None and sweep.small_batch_remove is not None:
            sweep.small_batch_remove = None
            rank_zero_warn(
                f"DiffIn: {type(pl_module).__name__} has batch norm, removed linearly; micro-batches of fewer than "
                f"{LINEAR_REMOVAL_MIN_SAMPLES} samples (a short last batch) are removed exactly, through remove_from_batch, "
                f"but on the first batch {unusable}, so such micro-batches, if any, are removed linearly like the others (a "
                "coarse approximation on a few samples). Override remove_from_batch to drop the sample's rows only, or use "
                "DataLoader(drop_last=True)"
            )

    def _check_functional_call(self, pl_module: L.LightningModule, batch: Any) -> None:
        """Every product and derivative evaluates the loss at parameters DiffIn passes in; a loss
        that reads some of the module's own parameters instead would be scored meaninglessly. On
        the first batch, compare the functional gradient at a shifted point with the module's
        (:func:`~lightning_influence.kernels.check_functional_gradient`); every rank decides alike."""
        space, loss_fn = self._space, self._loss_fn
        assert space is not None and loss_fn is not None

        def functional(point: dict[str, Tensor]) -> dict[str, Tensor]:
            theta = space.flatten([point[n] for n in space.names])
            _, grads = losses_and_gradient(loss_fn, space, theta, batch, flat=False)
            return dict(zip(space.names, grads, strict=True))  # type: ignore[arg-type]

        failure: ValueError | None = None
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with evaluation_mode(pl_module), torch.random.fork_rng(devices=devices):
                check_functional_gradient(pl_module, functional, dict(zip(space.names, self._params, strict=True)), batch, owner="DiffIn")
        except ValueError as err:
            failure = err
        if self._collective.distributed:
            anywhere = self._collective.max(torch.tensor([float(failure is not None)], device=pl_module.device))
            if failure is None and float(anywhere[0]) > 0:
                failure = ValueError(f"DiffIn: another rank's first batch failed the functional-call check. {FUNCTIONAL_CALL_ADVICE}")
        if failure is not None:
            raise failure

    def _resolve_per_sample(self) -> PerSampleDerivatives:
        """``per_sample="auto"``: finite differences of the losses where they are as accurate as
        forward mode and cheaper (see the class docstring), else forward mode."""
        if self.per_sample != "auto":
            return self.per_sample
        if self._batch_norm == "batch" and self._batch_norm_removal == "linear":
            return "finite_difference"  # differences of the removal losses (sample weights in batch norm)
        assert self._space is not None
        low_precision = torch.finfo(self._space.dtype).bits < 32
        if self._coupled or low_precision:
            return "forward_mode"
        if self.hessian_every > 1 and not self._recorded_is_exact:
            # steps without a product of their own would need two forward passes (no training losses to reuse)
            return "forward_mode"
        return "finite_difference"

    def _make_target(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TargetGradient:
        source, gradient = target_gradient(
            "DiffIn", trainer, pl_module, self.target, self.target_loader, self.target_samples, self.seed, self._collective
        )
        # Checked at the first training batch, once Lightning has set up its loaders (module-level helpers).
        self._target_source = source
        self._data_checks_pending = self._target_checks_pending = True
        return gradient

    def _split_parameters(
        self, pl_module: L.LightningModule, optimizer: Any
    ) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
        """The optimizer's trainable parameters, split into the attributed ones (``params``
        patterns; all by default) and the others (recorded as context)."""
        trained = [(name, p) for name, p, _ in trainable_parameters(pl_module, optimizer)]
        if self.params is None:
            return trained, []
        names = parameter_names(pl_module)  # a tied parameter matches a pattern under any of its names
        unmatched = [pat for pat in self.params if not any(matches_any(names[id(p)], [pat]) for _, p in trained)]
        if unmatched:
            raise ValueError(
                f"params patterns {unmatched} match no trainable parameter in the optimizer; names look like "
                f"{[n for n, _ in trained[:6]]}"
            )
        attributed = [(n, p) for n, p in trained if matches_any(names[id(p)], self.params)]
        return attributed, [(n, p) for n, p in trained if (n, p) not in attributed]

    # ------------------------------------------------------------------ training hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._subset_numbering.check(trainer, "DiffIn")
        self._epoch_repeats.start(trainer, pl_module.device)
        if not self._resume_check_pending:  # a resumed epoch keeps the step it started at (restored)
            self._epoch_start_step = self.steps_seen
        if not self._data_checks_pending:
            # Lightning reloads the training loader here (reload_dataloaders_every_n_epochs): ids are checked against
            # the current dataset's length (a step held for its host values keeps the length it trained with).
            self._num_samples = dataset_length(trainer)
            self._repeats = draws_with_replacement(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_repeats.end(trainer.current_epoch)  # one host read an epoch
        if self._batch_open:
            self._discard_unstepped(pl_module)

    def _discard_unstepped(self, pl_module: L.LightningModule) -> None:
        """An epoch that ended at a batch that never ran (``on_train_batch_start`` returned -1, Lightning's
        way of ending an epoch early): that batch, and the micro-batches of an unfinished accumulation before
        it, took no optimizer step (Lightning zeroes their gradients when the next window starts), so they
        leave this fit's record without being counted as trained on."""
        self._batch_open = False
        self._micro_batches, self._micro_losses = [], {}
        self._backward.arm()
        if isinstance(pl_module, InfluenceMixin):
            pl_module.set_loss_tap(self, None)
        if not self._loss_checked:
            self._loss_check = None  # compared with the next batch that trains instead

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._batch_norm_pending:
            self._batch_norm_pending = False
            self._settle_batch_norm(trainer, pl_module)
        if self._data_checks_pending and not self._resume_check_pending and trainer.global_step > 0 and trainer.ckpt_path is not None:
            rank_zero_warn(
                f"DiffIn starts at optimizer step {trainer.global_step} of a resumed fit whose checkpoint holds no state of "
                f"this callback (state key {self.state_key!r}: saved without DiffIn, or with other options, which make "
                "another key): the scores cover only the steps from here on. To score the whole run, resume from a "
                "checkpoint saved with this same callback, or train from the start"
            )
        if self._resume_check_pending:
            self._check_resume(trainer, batch_idx)
        if self._data_checks_pending:
            # First batch of this fit: refuse what cannot be scored before any training time is spent.
            self._data_checks_pending = False
            check_training_dataset(trainer, pl_module)
            self._repeats = draws_with_replacement(trainer)
            self._num_samples = dataset_length(trainer)
            if self._repeats and self._coupled:
                why = "batch norm is removed exactly (batch_norm_removal='exact')" if self._batch_norm == "batch" else (
                    f"{type(pl_module).__name__} declares coupled_batch_loss"
                )
                raise ValueError(
                    f"DiffIn: the training sampler draws with replacement, so a batch can hold copies of a sample, and {why}: "
                    "each removal re-evaluates the batch without one position (remove_from_batch), which leaves the other "
                    "copies in. Removing every copy of a sample from a coupled batch is not modelled: use a sampler without "
                    "replacement" + (", or batch_norm_removal='linear' (the default)" if self._batch_norm == "batch" else "")
                )
        self._drop_unbackpropagated(pl_module)
        waiting = len(self._micro_batches)
        if waiting >= max(int(trainer.accumulate_grad_batches), 1):
            raise ValueError(
                f"training batch {batch_idx} starts while {waiting} earlier batch(es) still await their optimizer step "
                f"(accumulate_grad_batches={trainer.accumulate_grad_batches}): the optimizer did not step after them, "
                "which DiffIn cannot model (it would merge those batches into the next step). A custom optimizer_step "
                "that skips optimizer.step(closure=optimizer_closure) on some batches is the usual cause: to leave a "
                "batch out, return None from training_step instead (an empty step, which DiffIn counts), and use "
                f"Trainer(accumulate_grad_batches=k) for accumulation ({SUPPORTED})"
            )
        ids = torch.as_tensor(pl_module.sample_ids(batch))
        if self._resumed_epoch_batches:
            self._check_restarted_epoch(ids)
        if ids.numel() == 0:
            raise ValueError(
                f"training batch {batch_idx} has no samples (sample_ids(batch) returned no ids): DiffIn attributes each "
                "step to the samples of its batch. Drop empty batches before they reach training_step (a collate_fn "
                "that filters samples out can produce them)"
            )
        if self._lagged_reads:
            # Values checked when they reach the host, at the next step (_settle): no wait for the device here.
            check_id_type(ids, pl_module, batch)
            self._micro_batches.append((batch, ids.detach()))
        else:
            check_ids(ids, self._num_samples, pl_module, batch, repeats=self._repeats)
            self._micro_batches.append((batch, ids.detach().to("cpu", torch.long).reshape(-1)))
        self._epoch_repeats.add(ids.detach())
        self._backward.arm()  # training_step may return None: then no backward runs for this micro-batch
        self._batch_open = True  # until on_train_batch_end: not reached when the module's on_train_batch_start returns -1
        if not self._loss_checked and self._loss_check is None and self._first_batch_checked:
            # the first batches were left out (training_step returned None): only the loss comparison moves on
            self._loss_check = training_mode_losses(pl_module, batch).detach()
            self._loss_scale = float(self._loss_check.abs().mean())
        elif not self._loss_checked and self._loss_check is None:
            self._first_batch_checked = True
            # With autograd on, to check that the losses depend on the parameters.
            devices = [pl_module.device] if pl_module.device.type == "cuda" else []
            statistics_only = self._batch_norm == "batch" and not (pl_module.coupled_batch_loss or self.coupled)
            check = (lambda _: _check_removal(pl_module, batch, ids, statistics_only)) if self._coupled else None
            losses = training_mode_losses(pl_module, batch, check)
            check_losses(
                losses, ids, device=pl_module.device, requires_grad=any(p.requires_grad for p in self._params), batch=batch, module=pl_module
            )
            if self.coupled is None and not self._coupled:
                # batch norm scored as trained is modelled coupling: its layers without running statistics, which
                # normalise over the batch in evaluation mode too, are given fixed ones for the check
                with fixed_statistics(pl_module) if self._batch_norm == "batch" else contextlib.nullcontext():
                    change = undeclared_coupling(pl_module, batch)
                if change is not None:
                    rank_zero_warn(coupling_message(pl_module, change))
            self._loss_check = losses.detach()
            self._loss_scale = float(losses.detach().abs().mean())
            if not self._mixed and not self._mode_dependent(pl_module, as_swept=True) and not spectral_norm_layers(pl_module):
                self._check_mode_independent_losses(pl_module, batch, losses.detach(), devices)
            if losses.dtype != self._loss_dtype:
                self._loss_dtype = losses.dtype
                if not self._kinks_pending:  # else set with the kinks, below
                    self._set_differences(pl_module, *self._differences(self._kinks or []))
        if self._batch_norm_checks_pending:
            self._batch_norm_checks_pending = False
            trace = self._batch_norm_trace
            if trace is not None and trace.tracked and self._space is not None and self._loss_fn is not None:
                # the statistics pass of the sweep, once now: a layer run twice per forward, or not at all, is refused
                # before training rather than at the end-of-fit sweep
                params = dict(zip(self._space.names, self._params, strict=True))
                with torch.no_grad(), trace.batch_statistics_mode():
                    trace.statistics_function(self._loss_fn)(params, batch)
            if trace is not None and self._batch_norm_removal == "linear":
                self._check_sample_weighting(pl_module, batch)
        if self._kinks_pending:  # after the losses' own checks, which say more about a wrong shape
            self._kinks_pending = False
            self._find_kinks(pl_module, batch)
        if self._functional_check_pending:
            self._functional_check_pending = False
            self._check_functional_call(pl_module, batch)
        if self._target_checks_pending:
            self._target_checks_pending = False
            check_target_data(self, trainer)
        if self._buffer_watch is None:  # after the first batch's checks, which write buffers back
            trained = {id(p) for p in self._params} | {id(p) for p in self._context}
            fixed = [n for n, p in pl_module.named_parameters() if id(p) not in trained]
            varying = [n for n in self._changed_buffers if n not in self._removed_buffers]
            self._buffer_watch = BufferWatch(pl_module, fixed, varying=varying)
        if len(self._micro_batches) == 1 and self._verified_steps < VERIFIED_STEPS:
            # The verified steps also check that forward and backward leave the parameters alone (values, not
            # version counters: checks like the ones above write them back bit for bit, in any callback).
            self._theta_at_start = [p.detach().clone() for p in (*self._params, *self._context)]
        if self._capture_losses or self._tap_losses:
            position, size = len(self._micro_batches) - 1, ids.numel()

            def tap(seen: Any, losses: Any) -> None:
                if seen is batch and isinstance(losses, Tensor) and losses.shape == (size,) and losses.is_floating_point():
                    self._micro_losses[position] = losses.detach()

            pl_module.set_loss_tap(self, tap)  # type: ignore[attr-defined]

    @property
    def _lagged_reads(self) -> bool:
        """Whether this step's ids and gradient finiteness are read on the host one step later
        (:meth:`_settle`) instead of at once: after the first, verified steps (whose checks read
        the device anyway), in single-process runs (DDP steps exchange them by collectives)."""
        return self._verified_steps >= VERIFIED_STEPS and self._loss_checked and not self._collective.distributed

    def _drop_unbackpropagated(self, pl_module: L.LightningModule) -> bool:
        """Take the last micro-batch out of its step if no backward ran for it (``training_step``
        returned ``None``: Lightning's way of leaving a batch out): the step is the other
        micro-batches' alone, and its samples are seen with nothing added (removing them changes
        nothing there). Returns whether one was taken out."""
        taken = self._backward.take_skipped(self._micro_batches)
        if taken is None:
            return False
        batch, ids = taken
        self._micro_losses.pop(len(self._micro_batches), None)
        ids = ids.to("cpu", torch.long).reshape(-1)  # a rare event: read at once
        if self._lagged_reads:
            check_id_values(ids, self._num_samples, pl_module, batch, repeats=self._repeats)
        assert self._accumulator is not None
        self._accumulator.mark_seen(ids)
        return True

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_unbackpropagated(pl_module) and not self._micro_batches:
            self.empty_steps += 1  # every micro-batch of the step left out: no gradient, nothing moves
            return
        if not self._micro_batches:
            return
        start = time.perf_counter()
        self._settle()
        micro, self._micro_batches = self._micro_batches, []
        captured, self._micro_losses = (self._micro_losses if self._capture_losses else {}), {}
        pairs, self._loss_pairs = self._loss_pairs, []
        loss_values = torch.stack([pair for pair, _ in pairs]) if pairs else None
        loss_tols = [tol for _, tol in pairs]
        space, model = self._space, self._model
        assert space is not None and model is not None and self._trajectory is not None and self._accumulator is not None
        trajectory = self._trajectory
        check_trained_parameters("DiffIn", space.names, self._params, [*self._params, *self._context], optimizer, trainer.global_step)
        self._check_parameters_unwritten(trainer)
        self._check_buffers(trainer, pl_module)
        missing = [i for i, p in enumerate(self._params) if p.grad is None]
        sparse = [n for n, p in zip(self._space.names, self._params, strict=True) if p.grad is not None and p.grad.is_sparse]
        if sparse:
            raise ValueError(
                f"parameter {sparse[0]!r} has a sparse gradient (nn.Embedding or nn.EmbeddingBag with sparse=True): DiffIn models "
                "dense optimizer steps. Use sparse=False (torch.optim.SGD, Adam and AdamW take the dense gradient)"
            )
        context_grads = [p.grad for p in self._context if p.grad is not None]
        if len(missing) == len(self._params) and not context_grads:
            # No gradient at all (training_step returned None): the optimizer leaves every parameter and its
            # state as they are, so removing any of these samples changes nothing at this step.
            self.empty_steps += 1
            for batch, ids in micro:
                ids = ids.to("cpu", torch.long).reshape(-1)  # a rare step: read at once
                if self._lagged_reads:
                    check_id_values(ids, self._num_samples, pl_module, batch, repeats=self._repeats)
                self._accumulator.mark_seen(ids)
            self.seconds += time.perf_counter() - start
            return
        if missing and not model.treats_missing_gradient_as_zero():
            raise ValueError(
                f"parameter {self._space.names[missing[0]]!r} received no gradient at optimizer step {trainer.global_step}: "
                f"{type(model.optimizer).__name__} then skips it (no momentum, no decay), which DiffIn does not model. "
                "Freeze it (requires_grad_(False)) or leave it out of the optimizer; a parameter that only some steps use "
                "(conditional computation) can instead get a zero gradient at every step (e.g. add 0 * param.sum() to "
                "the loss), which the optimizer then applies like any other"
            )
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if self._cancelled_check_pending:
            self._cancelled_check_pending = False
            self._check_cancelled_parameters(pl_module, micro[0][0], grads)
        lagged = self._lagged_reads
        finite = True if lagged else all_finite(grads + context_grads)
        global_ids: tuple[Tensor, ...] | None = None
        if self._collective.distributed:  # the skip decision and the global batch, on every rank alike
            finite, global_ids = self._global_step_batch(micro, finite)
        elif not lagged:
            global_ids = self._repeated_ids([ids for _, ids in micro])
        if not finite:
            self._skip_step(trainer.global_step, list(global_ids) if global_ids is not None else [ids for _, ids in micro])
            self.seconds += time.perf_counter() - start
            return
        samples = sum(int(i.numel()) for i in global_ids) if global_ids is not None else sum(int(i.numel()) for _, i in micro)
        if samples == 1:
            self.singleton_steps += 1
            if self.singleton_steps == 1:
                rank_zero_warn(
                    f"DiffIn: optimizer step {trainer.global_step} trained on a single sample (id "
                    f"{int(micro[0][1][0])}): removing it removes the whole step, a change the second-order difference "
                    "term follows less well than a one-sample share of a batch (benchmarks/approximations.py, digits "
                    "MLP: such samples' scores 0.5-6x off at SGD lr 0.1, exact at lr 0.001; one of three wrong in sign "
                    "with Adam at lr 1e-4). A last batch of one sample is the usual cause: DataLoader(drop_last=True) avoids it. "
                    "Counted in scores.metadata['singleton_steps'], warned once"
                )
        # Clipping by norm spans every parameter of the optimizer: the unattributed ones enter as a constant.
        clips_norm = model.clip_val is not None and model.clip_algorithm == "norm"
        rest = float(sum(g.double().square().sum() for g in context_grads)) if clips_norm and context_grads else 0.0
        hyper, state = model.capture(rest_norm_sq=rest)
        if self._store_resumed_step:
            self._store_resumed_step = False
            trajectory.keep_theta_at(self.steps_seen)
        keep = trajectory.keeps_theta(self.steps_seen)  # between checkpoints: the batches (and gradients, recompute="updates")
        needs_grad = (
            self._sweep.reuse_recorded_gradient
            or not model.is_stateless_sgd
            or self._verified_steps < VERIFIED_STEPS
            or trajectory.keep_gradients  # the steps between checkpoints are rebuilt from their gradients
            or (self._sweep.verify_recorded and self.steps_seen % CHECKED_GRADIENT_EVERY == 0)  # evidence for the sweeps' checks
        )
        keep_grad = needs_grad and (keep or trajectory.keep_gradients)
        if self._batch_norm_trace is not None:
            self._batch_norm_trace.check_training(self.steps_seen, [int(ids.numel()) for _, ids in micro])
        record = StepRecord(
            step=self.steps_seen,
            batches=tuple(b for b, _ in micro),
            ids=tuple(i for _, i in micro),
            normalizer=int(trainer.accumulate_grad_batches),
            hyper=hyper,
            theta=trajectory.flat_copy(self._params) if keep else None,
            grad=trajectory.flat_copy(grads) if keep_grad else None,
            state={
                name: trajectory.flat_copy([v if v is not None else torch.zeros_like(p) for v, p in zip(values, self._params)])
                for name, values in state.items()
            }
            if keep
            else {},
            context=torch.cat([p.detach().reshape(-1) for p in self._context]) if self._context and (keep or trajectory.keep_gradients) else None,
            global_ids=global_ids,
            varying=self._buffer_watch.values() if self._buffer_watch is not None else {},
            losses=tuple(captured.get(k) for k in range(len(micro))) if captured else None,
            running_counts=self._batch_norm_trace.counts() if self._batch_norm_trace is not None else None,
            running_momenta=self._batch_norm_trace.momenta() if self._batch_norm_trace is not None else None,
        )
        self.steps_seen += 1
        # Hyperparameters changed after this hook (the module's own on_before_optimizer_step, a later callback)
        # replace the record's when the step starts (_on_optimizer_step): the record reaches the trajectory after.
        self._stepping = (record, rest)
        if lagged:
            # Completed at the next step (or before a sweep): the copies then have long arrived.
            values = HostCopy([finite_flag(grads + context_grads), *record.ids, *([loss_values] if loss_values is not None else [])])
            self._held = _HeldStep(record, values, trainer.global_step, pl_module, self._num_samples, loss_tols)
        else:
            if loss_values is not None:
                self._check_step_losses(loss_values.cpu(), loss_tols, trainer.global_step)  # a step that reads the device anyway
            for ids in record.ids:
                self._accumulator.mark_seen(ids)
            if self._verified_steps < VERIFIED_STEPS and keep:
                self._unverified = record  # appended once the real update is known (on_train_batch_end)
            else:
                self._to_append = record  # appended when its step starts (or at the batch's end)
        self.seconds += time.perf_counter() - start

    def _on_optimizer_step(self, optimizer: Any) -> None:
        """``optimizer.step`` starts its update (every ``on_before_optimizer_step`` and the clipping
        have run): read the hyperparameters again, and if a hook changed them after DiffIn's (the
        LightningModule's ``on_before_optimizer_step``, a callback after DiffIn, a custom
        ``optimizer_step`` before its ``optimizer.step``), record the ones the step uses. Host values
        only (the param groups' numbers), no device read."""
        stepping, self._stepping = self._stepping, None
        if stepping is not None and self._model is not None:
            record, rest = stepping
            hyper, _ = self._model.capture(rest_norm_sq=rest)
            if hyper.shape != record.hyper.shape or not torch.equal(hyper, record.hyper):
                record.hyper = hyper  # not in the trajectory yet (held, unverified or to append)
        self._append_started()

    def _append_started(self) -> None:
        """Append the record waiting for its step to start (the step started, or the batch ended)."""
        record, self._to_append = self._to_append, None
        if record is not None and self._trajectory is not None:
            self._trajectory.append(record)

    def _settle(self) -> None:
        """Complete the step held back by :meth:`on_before_optimizer_step` for its host values:
        check its sample ids, and record it, or skip it if its gradients were not finite."""
        self._append_started()  # an earlier step's record goes first
        held, self._held = self._held, None
        if held is None:
            return
        assert self._trajectory is not None and self._accumulator is not None
        record = held.record
        flag, *host_ids = held.values.wait()
        host_ids, loss_values = host_ids[: len(record.ids)], host_ids[len(record.ids) :]
        if loss_values:
            self._check_step_losses(loss_values[0], held.loss_tols, held.global_step)
        ids = [i.to(torch.long).reshape(-1) for i in host_ids]
        for batch, step_ids in zip(record.batches, ids, strict=True):
            check_id_values(step_ids, held.num_samples, held.module, batch, repeats=self._repeats)
        if not bool(flag):
            self.steps_seen -= 1
            self._trajectory.discard(record)
            self._skip_step(held.global_step, ids)
            return
        record.ids = tuple(ids)
        record.global_ids = self._repeated_ids(ids)
        for step_ids in ids:
            self._accumulator.mark_seen(step_ids)
        self._trajectory.append(record)

    def _repeated_ids(self, ids: list[Tensor]) -> tuple[Tensor, ...] | None:
        """Single process: the step's ids as its "global" micro-batches when a sampler drawing with
        replacement put copies of a sample in one batch (the global form removes them all), else ``None``."""
        if self._repeats and any(i.unique().numel() != i.numel() for i in ids):
            return tuple(ids)
        return None

    def _skip_step(self, global_step: int, ids: list[Tensor]) -> None:
        """A step with non-finite gradients is not attributed (warned once). Mixed precision: the
        gradient scaler skips it. Otherwise it is a diverging step."""
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            step_ids = torch.cat(ids)
            self._first_skipped = f"optimizer step {global_step}, sample ids {step_ids[:8].tolist()}"
            rank_zero_warn(
                f"DiffIn: non-finite gradients at optimizer step {global_step} (batch of {step_ids.numel()} "
                f"samples, ids {step_ids[:8].tolist()}{' ...' if step_ids.numel() > 8 else ''}); the step is not "
                "attributed, here and at any later such step (counted in scores.metadata['skipped_steps'], warned "
                "once). Under '16-mixed' the gradient scaler skips such steps; otherwise, unless the module skips "
                "them itself, the optimizer applies them and training is likely diverging: check these samples for "
                "NaN/inf inputs and the loss for overflow. (A float32 sum of the gradients beyond 3.4e38 counts as "
                "non-finite.)"
            )

    def _check_cancelled_parameters(self, pl_module: L.LightningModule, batch: Any, grads: list[Tensor]) -> None:
        """An adaptive optimizer (Adam, RMSprop, Adagrad) with batch norm, first step: a parameter whose training gradient is zero (up to
        rounding) because train-mode batch statistics cancel it (the bias of a layer feeding a batch norm)
        keeps Adam's second moment at 0, so the linearised update scales it by ``lr / eps``; DiffIn's
        products run in evaluation mode, where it is not cancelled, and the propagation blows up.
        Refused, naming the parameters (one evaluation-mode gradient pass, first step only)."""
        assert self._space is not None and self._loss_fn is not None
        theta = self._space.flatten(self._params)
        with evaluation_mode(pl_module), torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            _, evaluated = losses_and_gradient(self._loss_fn, self._space, theta, batch, flat=False)
        norms = torch.stack([torch.stack([g.norm(), e.norm()]) for g, e in zip(grads, evaluated, strict=True)]).double().cpu()  # type: ignore[union-attr]
        scale = float(norms[:, 1].norm())
        # Cancelled: nothing left in training but rounding (below 1e-3 of the evaluation-mode gradient), while the
        # evaluation-mode gradient is not negligible (a zero-initialised branch is zero in both modes).
        cancelled = [n for n, (t, e) in zip(self._space.names, norms.tolist(), strict=True) if e > 1e-6 * scale and t < 1e-3 * e]
        if cancelled:
            raise ValueError(
                f"{cancelled[:6]} get a zero gradient in training (up to rounding) but not in evaluation mode: train-mode batch "
                f"norm subtracts them out (the bias of a layer that feeds a batch norm). With "
                f"{type(self._model.optimizer).__name__}, whose second moment then stays 0, the linearised update "  # type: ignore[union-attr]
                "scales them by lr / eps, and DiffIn's products propagate that into meaningless scores (in evaluation "
                "mode, batch_norm='running', nothing cancels them; with batch statistics the products' finite-difference "
                "rounding in them is amplified the same way). Drop those parameters: bias=False in the layer before the "
                "norm (the norm's own shift does the same job), or freeze them (requires_grad_(False)) before fit"
            )

    def _check_parameters_unwritten(self, trainer: L.Trainer) -> None:
        """The forward and backward passes of a step must not write the trained parameters in place
        (``nn.Embedding(max_norm=...)`` renormalises its rows, a custom layer may project its
        weights): that change is part of the dynamics but invisible to the optimizer step DiffIn
        models, and its scores would be meaningless. Checked on the verified steps (a copy of the
        parameters at their first micro-batch)."""
        params, before = [*self._params, *self._context], self._theta_at_start
        self._theta_at_start = None
        if before is None or len(before) != len(params):
            return
        # (NaN at the same places counts as unchanged: a diverged step's parameters, not a write.)
        written = [
            i for i, (p, v) in enumerate(zip(params, before, strict=True))
            if not torch.equal(p, v) and not bool(torch.allclose(p, v, rtol=0.0, atol=0.0, equal_nan=True))
        ]
        if written:
            assert self._space is not None
            names = [*self._space.names, *(self._context_space.names if self._context_space is not None else ())]
            shown = [names[i] for i in written[:4]]
            raise ValueError(
                f"the forward or backward pass of optimizer step {trainer.global_step} wrote the trained parameters "
                f"{shown} in place (e.g. nn.Embedding(max_norm=...) renormalising the rows it looks up, or a layer "
                "projecting its own weights): DiffIn models the optimizer step as the only change of the parameters, "
                "so the scores would be meaningless. Use nn.Embedding without max_norm (or normalise the looked-up "
                "vectors out of place in forward), or apply the projection in an optimizer step hook that is part of "
                "the optimizer"
            )

    def _check_buffers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A buffer or untrained parameter that training changes (an annealed temperature, an EMA
        teacher) is recorded from its first change on, so that the sweep evaluates every step with the
        values it trained with (warned once). One removed from the module cannot be: the sweep then
        evaluates with the module as it is, and the recorded gradients stop being the products' base."""
        if self._buffer_watch is None:
            return
        found = self._buffer_watch.check()
        if not found:
            return
        first = not self._changed_buffers
        self._changed_buffers += [n for n in found if n not in self._changed_buffers]
        removed = [n for n in found if n in self._buffer_watch.removed]
        for name in found:
            if name in self._buffer_watch.initial:
                self._varying_defaults[name] = self._buffer_watch.initial[name].to(self._space.device if self._space else "cpu")
        if removed:
            self._removed_buffers += [n for n in removed if n not in self._removed_buffers]
            for name in removed:  # nothing to evaluate them with
                self._varying_defaults.pop(name, None)
            if self._sweep is not None:
                self._sweep.verify_recorded = False  # the loss really changed: the documented approximation
            rank_zero_warn(
                f"DiffIn: training removed {removed[:4]} from the module by optimizer step {trainer.global_step}: the "
                "scores evaluate the steps that read them without them, an approximation (check the scores against "
                "retraining, lightning_influence.evaluation). Hessian products take central differences from here on"
            )
            if self._recorded_is_exact:
                self._recorded_is_exact = False
                self._set_differences(pl_module, *self._differences(self._kinks or []))
        elif first:
            rank_zero_warn(
                f"DiffIn: training changed {found[:4]} (buffers or parameters the optimizer does not train) by optimizer "
                f"step {trainer.global_step}. Their values are recorded with every step from here on (memory: one copy "
                "per step of each such tensor written to since the step before), so every step is scored with the "
                "values it trained with. They count as given: how removing a sample would change them (e.g. an EMA "
                "teacher of the trained weights) is not modelled. Listed in scores.metadata['changed_buffers']"
            )

    def _global_step_batch(self, micro: list[tuple[Any, Tensor]], finite: bool) -> tuple[bool, tuple[Tensor, ...] | None]:
        """Collectives (every rank, every optimizer step): whether every rank's gradients are finite
        and the ids of each global micro-batch (the union of the ranks' shards, rank order; for a
        non-finite step, to name its samples: DDP's averaged gradients do not tell which rank's)."""
        collective = self._collective
        sizes = torch.tensor([ids.numel() for _, ids in micro] + [int(not finite)], dtype=torch.int64)
        every = [row.tolist() for row in collective.gather(sizes)]
        finite = not any(row[-1] for row in every)
        counts = [row[:-1] for row in every]
        longest = max(sum(row) for row in counts)
        local = torch.cat([ids for _, ids in micro])
        padded = torch.zeros(longest, dtype=torch.int64)
        padded[: local.numel()] = local
        gathered = collective.gather(padded)
        shards = [list(g[: sum(row)].split(row)) for g, row in zip(gathered, counts, strict=True)]
        union = tuple(torch.cat([shards[r][k] for r in range(len(shards))]) for k in range(len(micro)))
        if not finite:
            return False, union
        if not self._uneven_warned and any(len(set(column)) > 1 for column in zip(*counts)):
            self._uneven_warned = True
            rank_zero_warn(
                f"DiffIn: the ranks' shards of a training batch differ in size ({[sum(row) for row in counts]} samples); "
                "DDP averages each rank's mean gradient, so samples on smaller shards weigh more in that step than "
                "the global batch mean the scores assume. Equal shards (DistributedSampler with a fixed batch size) "
                "make the scores exact"
            )
        return True, union

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """Every micro-batch whose ``training_step`` called ``per_sample_loss(batch)``: keep its loss
        next to the mean of those per-sample losses (device values, compared once they reach the
        host with the step's ids: :meth:`_check_step_losses`). Lightning hands over the loss divided
        by ``accumulate_grad_batches``."""
        if not self._tap_losses or not self._loss_checked or not self._micro_batches or not isinstance(loss, Tensor) or loss.numel() != 1:
            return  # (the first micro-batch of a fit has a check of its own: _compare_training_loss)
        losses = self._micro_losses.get(len(self._micro_batches) - 1)
        if losses is None or losses.numel() == 0:
            return
        with torch.no_grad():
            accumulate = float(max(int(trainer.accumulate_grad_batches), 1))
            terms = losses.detach().double()
            tol = loss_tolerance(loss.dtype, losses.dtype)  # both from training_step (under autocast alike)
            pair = torch.stack([loss.detach().double().reshape(()) * accumulate, terms.mean(), terms.abs().mean()])
            self._loss_pairs.append((pair, tol))

    def _check_step_losses(self, values: Tensor, tols: Sequence[float], global_step: int) -> None:
        """``values[k] = (training_step's loss, mean of its per-sample losses, mean of their
        magnitudes)``, compared to the relative tolerance ``tols[k]``, for micro-batch ``k`` of optimizer step ``global_step`` (host values): they
        must agree, as the first step's check requires, at every step (a loss divided by a fixed
        batch size on a partial last batch, or sample weights that differ in one batch, change the
        loss at one step only)."""
        for k, ((expected, got, scale), tol) in enumerate(zip(values.tolist(), tols, strict=True)):
            if math.isclose(expected, got, rel_tol=tol, abs_tol=tol * scale) or not (math.isfinite(expected) and math.isfinite(got)):
                continue  # non-finite losses: the step's gradients are not finite either (skipped, warned)
            where = f"optimizer step {global_step}" + (f", micro-batch {k}" if len(values) > 1 else "")
            raise ValueError(
                f"training_step returned loss {expected!r} at {where} but the per-sample losses it computed with "
                f"per_sample_loss(batch) have mean {got!r}: the per-sample losses must be the unreduced terms of the "
                "training loss at every step (DiffIn attributes each step's update to its samples through them). A loss "
                "divided by a fixed batch size (per_sample_loss(batch).sum() / BATCH_SIZE) differs on a smaller last "
                "batch, and sample weights (or a regulariser) that training_step applies differ from the plain mean. "
                "Return per_sample_loss(batch).mean() from training_step (DataLoader(drop_last=True) if the last batch "
                "must be full), and put weights and regularisers into per_sample_loss"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stepping = None  # a step that did not start (skipped by the gradient scaler) keeps its hyperparameters
        self._batch_open = False
        self._append_started()
        if self._capture_losses or self._tap_losses:
            pl_module.set_loss_tap(self, None)  # type: ignore[attr-defined]
        if not self._loss_checked and self._loss_check is not None:
            self._compare_training_loss(outputs, trainer.accumulate_grad_batches)
        if self._unverified is not None:
            record, self._unverified = self._unverified, None
            self._verify_update(record, pl_module)
            assert self._trajectory is not None
            self._trajectory.append(record)
        if self.mode == "online" and self._trajectory is not None and self._recorded_steps() >= self.window + self.score_every:
            if _is_last_step(trainer):
                return  # the end-of-fit sweep scores every remaining step exactly
            start = time.perf_counter()
            self._settle()
            if len(self._trajectory) < self.window + self.score_every:  # the held step was skipped
                self.seconds += time.perf_counter() - start
                return
            self._run_sweep(self.score_every)
            self.truncated_sweeps += 1
            self.steps_scored_truncated += self.score_every
            self.seconds += time.perf_counter() - start
            self._log(trainer, {"steps_scored": float(self.steps_scored), "callback_seconds": self.seconds})

    def _check_resume(self, trainer: L.Trainer, batch_idx: int) -> None:
        """First batch after a resume, before its step. The checkpoint must still hold what the
        scores of a continued run need: one saved after the end-of-fit sweep does not. A resume in
        the middle of an epoch must continue the data where the checkpoint left it: a loader
        Lightning cannot restore (no ``state_dict``/``load_state_dict``) restarts the epoch and
        re-serves samples that were already trained on and scored. Online: the sweep that the
        checkpointed fit left to its end-of-fit flush runs now, at the parameters it would have
        run at, so the resumed run scores every step as an uninterrupted one does."""
        self._resume_check_pending, done_in_epoch = False, batch_idx  # Lightning restores the epoch's batch count
        # The resumed parameters need not be the ones the checkpoint saved: Lightning loads a float64 checkpoint into
        # a float32 module before its precision plugin converts it (rounded on the way), and a module may change what
        # it loads. Then the first resumed step stores its parameters, and the steps after it are rebuilt from them,
        # not from the checkpoint before the resume (which would rebuild the saved ones).
        saved, self._saved_parameters = self._saved_parameters, None
        self._store_resumed_step = saved is not None and _loaded_differently(trainer.lightning_module, saved)
        if self._restored_finished:
            raise RuntimeError(
                "this fit resumes from a checkpoint saved after DiffIn had finished scoring its fit (e.g. "
                "trainer.save_checkpoint after fit): the scores in it are final for the model that fit ended with and "
                "the steps it recorded are gone, so a continued run cannot be scored. Resume from a checkpoint written "
                "during training, before the end-of-fit sweep: ModelCheckpoint(save_last=True) with checkpoints during "
                "training (its default save_top_k=1 or every_n_train_steps=...); a last.ckpt of save_top_k=0, "
                "ModelCheckpoint writes only at the end of fit, after the sweep. Or resume without the DiffIn callback; "
                "the finished scores stay readable from that checkpoint's state"
            )
        self._check_same_setup()
        epoch_start, self._restored_epoch_start = self._restored_epoch_start, None
        self._epoch_start_step = int(epoch_start) if epoch_start is not None else self.steps_seen - done_in_epoch // max(int(trainer.accumulate_grad_batches), 1)
        steps_ids, self._restored_steps_ids = self._restored_steps_ids, []
        self._resumed_epoch_batches = [ids for step, batches in steps_ids if step >= self._epoch_start_step for ids in batches] if done_in_epoch else []
        self._resume_once = draws_each_sample_once(trainer) is not None
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        loaders = combined.flattened if combined is not None else [trainer.train_dataloader]
        self._resumed_fixed = [x for x in loaders if isinstance(x, FixedBatches)]
        if self.mode == "online":
            assert self._trajectory is not None
            start = time.perf_counter()
            while len(self._trajectory) >= self.window + self.score_every:
                self._run_sweep(self.score_every)
                self.truncated_sweeps += 1
                self.steps_scored_truncated += self.score_every
            self.seconds += time.perf_counter() - start
        if done_in_epoch == 0:
            return
        plain = [type(x).__name__ for x in loaders if not (hasattr(x, "state_dict") and hasattr(x, "load_state_dict"))]
        if plain:
            raise RuntimeError(
                f"resumed in the middle of an epoch ({done_in_epoch} batches already done) with a training loader that "
                f"cannot restore its position ({', '.join(plain)}): it restarts the epoch and would feed samples that "
                "DiffIn already scored a second time. Resume from a checkpoint taken at an epoch boundary, or use a "
                "resumable loader (with state_dict/load_state_dict, e.g. torchdata's StatefulDataLoader)"
            )

    def _setup_signature(self, trainer: L.Trainer, attributed: Sequence[tuple[str, Tensor]], context: Sequence[tuple[str, Tensor]]) -> dict[str, Any]:
        """This fit's setup (:func:`~lightning_influence.callbacks.resume.setup_signature`), with the
        optimizer's class, the state its modelled update carries and its groups' sizes, and the
        options that shape DiffIn's scores."""
        assert self._model is not None
        options = {
            "target": self.target,
            "target_loader": "given" if self.target_loader is not None else "trainer's",
            "second_moment": self.second_moment,
            "finite_difference": self.finite_difference,
            "fd_rel_step": self.fd_rel_step,
            "hessian_every": self.hessian_every,
            "per_sample": self.per_sample,
            "params": list(self.params) if self.params is not None else None,
            "coupled": self.coupled,
            "batch_removal": self.batch_removal,
            **({"batch_norm": self._batch_norm, "batch_norm_removal": self._batch_norm_removal} if self._batch_norm != "running" else {}),
        }
        return setup_signature(
            trainer,
            attributed,
            options,
            **{
                "context parameters": parameter_signature(context),
                "optimizer": type(self._model.optimizer).__name__,
                "optimizer state": list(self._model.state_names),
                "parameter groups": [len(g["params"]) for g in self._model.optimizer.param_groups],
            },
        )

    def _target_signature(self) -> dict[str, Any]:
        """The target data's fingerprint, read once per fit: a resumed online run must score against
        the target the checkpointed run scored against. Online only (replay scores every step against
        the target at the end of fit, whatever it was before); not for the training-loss target,
        whose data the training run checks, nor a one-pass iterator (a read would use it up). Under
        DDP each rank reads its own shard: the signature lists every rank's fingerprint, gathered
        (a collective: every rank takes it at the same point, the first checkpoint or the resumed
        fit's first batch)."""
        if self.mode != "online":
            return {}
        if self._target_print is None:
            own = target_signature(self._target, self._target_source)
            if self._collective.distributed:
                shards = self._collective.gather_objects(own.get("target data"))
                own = {"target data": [f"rank {rank}: {shard}" for rank, shard in enumerate(shards)]} if any(shards) else {}
            self._target_print = own
        return self._target_print

    def _check_same_setup(self) -> None:
        """A resumed fit must train and score as the checkpointed one did (before any step of it)."""
        saved, self._restored_signature = self._restored_signature, None
        now = {**self._signature, **(self._target_signature() if saved and "target data" in saved else {})}
        check_same_setup("DiffIn", saved, now)

    def _check_restarted_epoch(self, ids: Tensor) -> None:
        """The first batch after a resume in the middle of an epoch must continue the epoch, not
        restart it: a loader whose position Lightning did not restore (it re-creates the training
        loader without restoring it when, e.g., ``configure_optimizers`` reads
        ``trainer.estimated_stepping_batches``) serves the epoch's samples again. A
        :class:`~lightning_influence.data.FixedBatches` says where its pass started; for other
        loaders the batch's samples tell: with a sampler that yields each sample once an epoch,
        none may be one the epoch trained on before the checkpoint; otherwise the batch must not
        repeat the epoch's first batch (unless that batch recurs in the epoch's recorded batches,
        where a repeat is the data's own)."""
        before, self._resumed_epoch_batches = self._resumed_epoch_batches, []
        fixed, self._resumed_fixed = self._resumed_fixed, []
        if not before:
            return
        if fixed:
            restarted = any(loader.started_at == 0 for loader in fixed)
        else:
            ids = ids.detach().to("cpu", torch.long).reshape(-1)
            first = before[0].reshape(-1)

            def same(a: Tensor, b: Tensor) -> bool:
                return a.numel() == b.numel() and bool((a.reshape(-1) == b.reshape(-1)).all())

            if self._resume_once:
                restarted = bool(torch.isin(ids, torch.cat([b.reshape(-1) for b in before])).any())
            else:
                restarted = same(ids, first) and not any(same(b, first) for b in before[1:])
        if restarted:
            raise RuntimeError(
                f"resumed in the middle of an epoch ({len(before)} of its batches trained before the checkpoint), but the "
                "training loader restarted the epoch instead of continuing where the checkpoint left it: it would feed "
                "samples that DiffIn already scored a second time. Lightning restores a loader's position only when it "
                "can: the loader must have state_dict/load_state_dict (e.g. FixedBatches, torchdata's StatefulDataLoader), "
                "and Lightning re-creates the training loader without restoring it when configure_optimizers reads "
                "trainer.estimated_stepping_batches (compute the schedule's length from the data instead). Or resume from "
                "a checkpoint taken at an epoch boundary, or train from the start"
            )

    def _verify_update(self, record: StepRecord, pl_module: L.LightningModule) -> None:
        """Compare the modelled update of ``record`` with what the optimizer really did: a
        mismatch (an unmodelled option, a hook that changed the gradients after DiffIn read
        them, ...) would make every score wrong."""
        # Verified steps always keep their gradient (see on_before_optimizer_step).
        assert self._model is not None and self._space is not None and record.theta is not None and record.grad is not None
        self._verified_steps += 1
        with torch.no_grad():
            predicted, _ = self._model.update(record.theta, record.state, record.grad, record.hyper)
        actual = self._space.flatten(self._params)
        if not bool(torch.isfinite(actual).all()):  # finite gradients (checked), yet the update was not
            hyper = dict(zip(self._model.hyper_names, record.hyper[0].tolist(), strict=True))
            raise FloatingPointError(
                f"DiffIn: the optimizer step {record.step} made parameters non-finite from finite gradients and "
                f"parameters ({type(self._model.optimizer).__name__} with {hyper}): the optimizer's own arithmetic "
                "overflowed or divided by zero (e.g. eps=0 in an adaptive optimizer, where a coordinate's gradient "
                "is exactly 0, gives 0/0). Training itself diverges there, with or without DiffIn: fix the "
                "optimizer's settings (a positive eps)"
            )
        error = float((predicted - actual).abs().max())
        moved = float((actual - record.theta).abs().max())
        tolerance = 1e-3 * moved + 64 * torch.finfo(actual.dtype).eps * (1.0 + float(actual.abs().max()))
        if not error <= tolerance:
            raise RuntimeError(
                f"DiffIn's model of the optimizer step disagrees with the real update at step {record.step} "
                f"(max deviation {error:.3g}, the step moved parameters by up to {moved:.3g}): the scores would be "
                "wrong. DiffIn reads the gradients in its on_before_optimizer_step and the learning rates and other "
                "hyperparameters where optimizer.step starts: neither the gradients, nor the optimizer's state, nor "
                "its hyperparameters may change after that (a LightningModule's on_before_optimizer_step or a later "
                "callback's that edits p.grad, a custom optimizer_step that changes them around optimizer.step, an "
                "optimizer subclass that changes them inside its step). Change learning rates and other "
                "hyperparameters with a learning-rate scheduler, in on_train_batch_start, or after optimizer.step in "
                "an optimizer_step override (for the next step); change the loss, not the gradients; use the Trainer's "
                f"gradient_clip_val for clipping; {SUPPORTED}"
            )
        self._check_rebuild(predicted, actual, pl_module)

    def _check_rebuild(self, predicted: Tensor, actual: Tensor, pl_module: L.LightningModule) -> None:
        """Steps between checkpoints are rebuilt with the modelled update; a forward difference
        against the gradient recorded at the real parameters needs the rebuilt ones to agree with
        them far below its step (a Tensor learning rate, for one, makes torch.optim round
        differently). If they do not, the products stop using the recorded gradients."""
        assert self._sweep is not None and self._space is not None
        if self.checkpoint_every == 1 or not self._sweep.reuse_recorded_gradient:
            return
        step = default_rel_step(self._space.dtype, "forward") * (1.0 + float(actual.norm()))
        drift = float((predicted - actual).norm()) * (self.checkpoint_every - 1)
        if drift <= 1e-3 * step:
            return
        self._inexact_rebuild, self._recorded_is_exact = True, False
        self._sweep.rebuilt_exactly = False
        self._set_differences(pl_module, *self._differences(self._kinks or []))
        rank_zero_warn(
            f"DiffIn: the modelled optimizer update reproduces {type(self._model.optimizer).__name__}'s to "  # type: ignore[union-attr]
            f"{drift / (self.checkpoint_every - 1):.3g} (norm of the difference), not closely enough for forward "
            "differences against the recorded gradients at the steps rebuilt between checkpoints (a Tensor learning "
            "rate, fused or foreach kernels can round differently): Hessian products take central differences (two "
            "gradient passes each). checkpoint_every=1 stores every step instead of rebuilding it"
        )

    def _recorded_steps(self) -> int:
        """Steps in the trajectory, counting the one held back for its host values."""
        return (len(self._trajectory) if self._trajectory is not None else 0) + (self._held is not None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A fit that failed (in training or in the end-of-fit sweep) or was interrupted leaves nothing
        behind: no loss tap on the module, no recorded steps in memory, no spilled files (a resume
        starts from a checkpoint, which holds its own copy of the steps)."""
        self._held, self._stepping, self._to_append = None, None, None
        if not self._finished:
            # No scores for a failed fit. Under ddp_spawn/ddp_fork this also runs in the launching process, whose
            # callback holds the scores an earlier fit handed over (the workers' on_fit_start cannot reset them).
            self._scores = None
            if isinstance(pl_module, InfluenceMixin) and pl_module.influence is not None:
                pl_module.influence = None  # an earlier fit's scores describe parameters this fit has changed
        self._backward.close()
        self._step_watch.close()
        if isinstance(pl_module, InfluenceMixin):
            pl_module.set_loss_tap(self, None)  # a fit that stopped mid-batch leaves no tap behind
        if self._trajectory is not None:
            self._trajectory.close()
        self._trajectory, self._sweep, self._micro_batches = None, None, []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit with nothing to train (max_steps=0, limit_train_batches=0, a resume with no epochs left) skips
        # the training loop and its on_train_end: the scores are finished here (a resume's restored steps swept).
        self._finish(trainer, pl_module)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The end-of-fit sweep: score every step still recorded against the final parameters."""
        self._backward.close()
        self._step_watch.close()
        if isinstance(pl_module, InfluenceMixin):
            pl_module.set_loss_tap(self, None)
        if self._trajectory is None:
            return
        self._settle()
        if not all_finite([p.detach() for p in self._params]):  # one read, at the end
            self._trajectory.close()
            first = f" The first step with non-finite gradients: {self._first_skipped}." if self._first_skipped else ""
            raise FloatingPointError(
                "DiffIn: the model's final parameters are not finite: training diverged, and a diverged model has no "
                f"target loss to attribute.{first} Look for NaN/inf inputs or labels in those samples, a loss that "
                "overflows, or a learning rate too large; under '16-mixed' the gradient scaler would skip such steps"
            )
        keep_earlier = self.steps_seen == 0 and warn_no_step("DiffIn", self.save_path if trainer.is_global_zero else None)
        start = time.perf_counter()
        self._run_sweep(len(self._trajectory))
        self._trajectory.close()
        self.seconds += time.perf_counter() - start
        scores = self._build_scores()  # a collective in distributed runs (every rank)
        self.scores = scores
        # Keep the scores only: the trajectory and the sweep hold parameter-sized buffers and batches.
        self._trajectory, self._sweep, self._micro_batches = None, None, []
        self._finished = True
        if isinstance(pl_module, InfluenceMixin) and (self.steps_seen > 0 or pl_module.influence is None):
            pl_module.influence = scores
        if trainer.is_global_zero:
            if self.save_path is not None and not keep_earlier:
                scores.save(self.save_path)
            if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and os.getpid() != self._owner_pid:
                scores.save(self._handoff)  # read by the launching process (see the scores property)
        if len(scores):
            column = scores.values if scores.values.dim() == 1 else scores.values.mean(dim=1)
            summary = InfluenceScores(scores.ids, column).summary()
            summary.pop("count")
            self._log(
                trainer,
                {
                    **{f"score_{k}" if k != "harmful_fraction" else k: v for k, v in summary.items()},
                    "steps_scored": float(self.steps_scored),
                    "skipped_steps": float(self.skipped_steps),
                    "empty_steps": float(self.empty_steps),
                    "callback_seconds": self.seconds,
                    "callback_seconds_per_step": self.seconds / max(self.steps_seen, 1),
                },
            )
        rank_zero_info(
            f"DiffIn ({self.mode}, target={self.target}): scored {len(self.scores)} samples over {self.steps_scored} "
            f"steps; {self.seconds:.2f}s in the callback"
        )

    # ------------------------------------------------------------------ internals
    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        """Summary metrics to every logger of the Trainer, under ``diffin/`` (query targets: the
        spread of each sample's mean score over the queries). Loggers write on global rank zero."""
        if not self.log_summary or not trainer.loggers:
            return
        keyed = {f"diffin/{k}": float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(keyed, step=trainer.global_step)

    def _run_sweep(self, num_scored: int) -> None:
        assert self._sweep is not None and self._trajectory is not None and self._space is not None
        num_scored = min(num_scored, len(self._trajectory))
        theta_end = self._space.flatten(self._params)
        with rank_zero_buffers(self._sweep.module, self._collective):  # DDP: the network rank zero saves, on every rank
            self._sweep.run(self._trajectory, theta_end, num_scored, recompute_step=self._recompute_step)
        self._trajectory.drop_oldest(num_scored)
        self.steps_scored += num_scored

    def _recompute_step(self, record: StepRecord) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Re-run one optimizer step from ``record.theta`` and ``record.state``: the update alone
        when the record kept its gradient (``recompute="updates"``), else the gradient too."""
        assert self._space is not None and self._model is not None and record.theta is not None
        grad = record.grad
        if grad is None:
            assert self._sweep is not None
            _, grad = step_losses_and_gradient(
                self._sweep.loss_fn_at(record), self._space, record.theta, record.batches, record.normalizer, self._collective, self.chunk_size
            )
        pool = self._trajectory.pool if self._trajectory is not None else None
        reuse = pool is not None and self._model.is_stateless_sgd and pool.size == record.theta.numel() and pool.dtype == record.theta.dtype
        with torch.no_grad():  # stateless SGD rebuilds into a pooled vector, given back once the sweep passed it
            theta, state = self._model.update(record.theta, record.state, grad, record.hyper, out=pool.take() if reuse else None)  # type: ignore[union-attr]
        return grad, theta, state

    def _check_mode_independent_losses(self, pl_module: L.LightningModule, batch: Any, training: Tensor, devices: list[Any]) -> None:
        """First step, a module without dropout, batch norm in evaluation mode or spectral normalisation
        (whose power iteration runs in training mode only): its per-sample losses must be the same
        in evaluation mode (with batch statistics in batch norm scored as trained), where DiffIn
        evaluates every loss, gradient and product. A loss that reads ``self.training`` (label
        smoothing or a regulariser in training only) would otherwise be scored as another function
        than the one trained (found after fit as a changed loss, if at all)."""
        with torch.random.fork_rng(devices=devices), self._sweep_mode(pl_module), torch.enable_grad():
            evaluated = pl_module.per_sample_loss(batch).detach()  # type: ignore[operator]
        tol = loss_tolerance(training.dtype)
        difference = float((evaluated.to(training.dtype) - training).abs().max()) if evaluated.shape == training.shape else math.inf
        if difference > tol * max(float(training.abs().max()), 1e-30):
            if self._random_in_training(pl_module, batch, training, devices, tol):
                return
            raise ValueError(
                f"per_sample_loss(batch) differs between training and evaluation mode on the first step (by up to "
                f"{difference:.3g}, losses up to {float(training.abs().max()):.3g}) although the module has no dropout"
                + (" (and DiffIn evaluates its batch norm with batch statistics, as trained)" if self._batch_norm == "batch" else " or batch norm")
                + ": the loss reads self.training (label smoothing, a regulariser or augmentation in training only?), and "
                f"{RANDOM_REDRAWS} more evaluations in training mode under other random states gave the same losses, so it "
                "is not dropout-like randomness (randomness drawn once per batch, such as a layer skipped with some "
                "probability, can repeat its draw: write it with nn.Dropout-style per-element masks or make it "
                "deterministic). DiffIn evaluates every loss, gradient and Hessian product in evaluation mode"
                + (" (batch norm with batch statistics)" if self._batch_norm == "batch" else "")
                + ", so it would score another function than the one trained. Make per_sample_loss the same in both modes"
            )

    def _random_in_training(self, pl_module: L.LightningModule, batch: Any, training: Tensor, devices: list[Any], tol: float) -> bool:
        """The training-mode losses differ from the evaluation-mode ones: evaluate them once more in
        training mode under another random state (a fork: training's random stream is untouched,
        buffers are put back). If they change, the difference is random, as dropout's is
        (``F.dropout(x, p, training=self.training)``, a custom dropout layer): scored like
        ``nn.Dropout``, through the evaluation-mode network along the recorded trajectory (central
        differences; training's gradients are not the sweep's). Deterministic differences (label
        smoothing or a regulariser in training only) are refused by the caller."""
        buffers = [b.detach().clone() for b in pl_module.buffers()]
        scale = tol * max(float(training.abs().max()), 1e-30)
        random = False
        for draw in range(RANDOM_REDRAWS):  # several: randomness drawn once per batch (a skipped layer) may repeat a draw
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.manual_seed(torch.initial_seed() ^ (0x5DEECE66D + draw))
                again = pl_module.per_sample_loss(batch).detach()  # type: ignore[operator]
            with torch.no_grad():
                for b, saved in zip(pl_module.buffers(), buffers):
                    b.copy_(saved)
            if again.shape == training.shape and float((again.to(training.dtype) - training).abs().max()) > scale:
                random = True
                break
        if not random:
            return False
        if self.checkpoint_every > 1 and self.recompute == "gradients":
            raise ValueError(
                "per_sample_loss(batch) is random in training mode (dropout written as a function, e.g. "
                "F.dropout(x, p, training=self.training)): checkpoint_every > 1 with recompute='gradients' recomputes the "
                "training gradients exactly, which is not possible then; use recompute='updates' (keeps each step's "
                "gradient) or checkpoint_every=1 (stores every step)"
            )
        self._random_training = True
        self._recorded_is_exact = False
        assert self._sweep is not None
        self._sweep.verify_recorded = False
        self._per_sample = self._resolve_per_sample()
        self._sweep.per_sample = self._per_sample
        self._set_differences(pl_module, *self._differences(self._kinks or []))
        rank_zero_info(
            "DiffIn: per_sample_loss is random in training mode and not in evaluation mode (dropout written as a "
            "function, or a layer that DiffIn does not know as dropout): scored like nn.Dropout, through the "
            "evaluation-mode network along the recorded trajectory, with central differences"
        )
        return True

    def _compare_training_loss(self, outputs: Any, accumulate: int) -> None:
        assert self._loss_check is not None
        self._loss_checked = check_training_loss(outputs, accumulate, self._loss_check, mixed=self._mixed, scale=self._loss_scale)
        if not self._loss_checked:  # training_step left the batch out: the comparison moves on to the next one
            self._loss_check = None

    def _build_scores(self) -> InfluenceScores:
        assert self._accumulator is not None and self._sweep is not None
        ids, values = self._accumulator.reduced(self._collective).result()
        meta = {
            "estimator": self._estimator_name,
            "name": self.name,
            "mode": self.mode,
            "target": self.target,
            "target_samples": self.target_samples,
            "column_positions": self._target.sample_positions() if self.target == "query" else None,
            "window": self.window if self.mode == "online" else None,
            "score_every": self.score_every if self.mode == "online" else None,
            "checkpoint_every": self.checkpoint_every,
            "recompute": self.recompute if self.checkpoint_every > 1 else None,
            "steps_seen": self.steps_seen,
            "steps_scored": self.steps_scored,
            "truncated_sweeps": self.truncated_sweeps,
            "steps_scored_truncated": self.steps_scored_truncated,
            "skipped_steps": self.skipped_steps,
            "empty_steps": self.empty_steps,
            "singleton_steps": self.singleton_steps,
            "optimizer": type(self._model.optimizer).__name__ if self._model is not None else None,
            "second_moment": self.second_moment,
            "batch_removal": self.batch_removal,
            "params": self.params,
            "finite_difference": self._sweep.finite_difference,
            "fd_rel_step": self._sweep.fd_rel_step,
            "kinks": list(self._kinks) if self._kinks is not None else None,
            "loss_dtype": self._loss_dtype_name,
            "changed_buffers": list(self._changed_buffers),
            "removed_buffers": list(self._removed_buffers),
            "max_adjoint_growth": round(self._sweep.max_adjoint_growth, 6),
            "max_step_ratio": round(self._sweep.max_step_ratio, 3),
            "dominant_step": self._sweep.dominant_step,
            "hessian_every": self.hessian_every,
            "hessian_products": self._sweep.hessian_products,
            "recorded_gradient_checks": self._sweep.recorded_gradient_checks,
            "max_recorded_gradient_error": self._sweep.max_recorded_gradient_error,
            "max_rebuilt_gradient_error": self._sweep.max_rebuilt_gradient_error,
            "per_sample": self._per_sample,
            "chunk_size": self.chunk_size,
            "forward_mode_passes": self._sweep.forward_mode_passes,
            "loss_evaluations": self._sweep.loss_evaluations,
            "target_gradients": self._sweep.target_gradients,
            "callback_seconds": round(self.seconds, 6),
            "world_size": self._collective.world_size,
            "coupled": self._coupled,
            "batch_norm": self._batch_norm,
        }
        if self._sweep.batch_norm is not None:
            meta["statistics_passes"] = self._sweep.statistics_passes
            meta["statistics_folds"] = self._sweep.statistics_folds
            meta["batch_norm_removal"] = self._batch_norm_removal
        return InfluenceScores(ids, values, meta)

    # ------------------------------------------------------------------ checkpoint state
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Compared with the module's parameters at the first resumed batch (see _check_resume).
        state = checkpoint.get("state_dict")
        self._saved_parameters = dict(state) if isinstance(state, dict) else None

    def state_dict(self) -> dict[str, Any]:
        """Counters, the score accumulator and the recorded steps not yet scored (their batches,
        parameters, gradients and optimizer state: a replay checkpoint carries the trajectory so
        far). Tensors and primitives only: loadable with ``torch.load(weights_only=True)``."""
        if self._micro_batches:
            # A checkpoint between the micro-batches of one optimizer step (validation mid-accumulation, e.g.
            # val_check_interval=3 with accumulate_grad_batches=2): training goes on; resuming from it is refused.
            return {"format": STATE_FORMAT, "mid_accumulation": True}
        if self._trajectory is not None:
            self._settle()  # the step held back for its host values belongs to the checkpoint
        collective = self._collective
        records = self._trajectory.export() if self._trajectory is not None else []
        accumulator = self._accumulator.reduced(collective) if self._accumulator is not None else None
        state = {
            "format": STATE_FORMAT,
            "steps_seen": self.steps_seen,
            "steps_scored": self.steps_scored,
            "truncated_sweeps": self.truncated_sweeps,
            "steps_scored_truncated": self.steps_scored_truncated,
            "skipped_steps": self.skipped_steps,
            "empty_steps": self.empty_steps,
            "singleton_steps": self.singleton_steps,
            "verified_steps": self._verified_steps,
            "loss_checked": self._loss_checked,
            "kinks": list(self._kinks) if self._kinks is not None else None,
            "loss_dtype": self._loss_dtype_name,
            "changed_buffers": list(self._changed_buffers),
            "removed_buffers": list(self._removed_buffers),
            "inexact_rebuild": self._inexact_rebuild,
            "random_training": self._random_training,
            "varying_defaults": {k: v.detach().cpu() for k, v in self._varying_defaults.items()},
            "accumulator": accumulator.state_dict() if accumulator is not None else None,
            "records": records,
            "finished": self._finished,
            "signature": {**self._signature, **self._target_signature()},
            "epoch_start_step": self._epoch_start_step,
        }
        if collective.distributed:
            # Lightning saves rank zero's callback state only: it carries every rank's shards of the recorded
            # steps (the parameters and optimizer state are the same on every rank) and the sums over ranks.
            shards = [{"batches": r["batches"], "ids": r["ids"], "losses": r.get("losses")} for r in records]
            state["world_size"] = collective.world_size
            state["rank_records"] = collective.gather_objects(shards)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"this checkpoint holds DiffIn state of format {state_dict.get('format')!r}; this version reads format "
                f"{STATE_FORMAT}. Rerun the fit, or resume without the DiffIn callback"
            )
        if state_dict.get("mid_accumulation"):
            raise mid_accumulation_resume_error("DiffIn")
        self.steps_seen = int(state_dict["steps_seen"])
        self.steps_scored = int(state_dict["steps_scored"])
        self.truncated_sweeps = int(state_dict["truncated_sweeps"])
        self.steps_scored_truncated = int(state_dict["steps_scored_truncated"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.empty_steps = int(state_dict.get("empty_steps", 0))
        self.singleton_steps = int(state_dict.get("singleton_steps", 0))
        self._restored_verified = int(state_dict["verified_steps"])
        self._restored_loss_checked = bool(state_dict["loss_checked"])
        kinks = state_dict.get("kinks")
        self._restored_kinks = [str(k) for k in kinks] if kinks is not None else None
        loss_dtype = getattr(torch, str(state_dict.get("loss_dtype")), None)
        self._restored_loss_dtype = loss_dtype if isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point else None
        self._inexact_rebuild = bool(state_dict.get("inexact_rebuild", False))
        self._restored_random_training = bool(state_dict.get("random_training", False))
        self._restored_changed = (
            [str(name) for name in state_dict.get("changed_buffers", [])],
            [str(name) for name in state_dict.get("removed_buffers", [])],
            dict(state_dict.get("varying_defaults", {})),
        )
        self._accumulator = ScoreAccumulator()
        if state_dict["accumulator"] is not None:
            self._accumulator.load_state_dict(state_dict["accumulator"])
        self._restored_records = list(state_dict["records"])
        self._restored_finished = bool(state_dict.get("finished", False))
        signature = state_dict.get("signature")
        self._restored_signature = dict(signature) if isinstance(signature, Mapping) else None
        self._restored_epoch_start = state_dict.get("epoch_start_step")
        self._restored_world = int(state_dict.get("world_size", 1))
        self._restored_rank_records = state_dict.get("rank_records")
        self._restored = True

    def _take_rank_part(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """After a resume: this rank's part of the restored state. Rank zero keeps the score sums
        (reduced over ranks when saved), the other ranks start from zero; each rank takes its own
        shards of the recorded steps."""
        world, rank = self._collective.world_size, self._collective.rank
        if self._restored_world != world:
            raise ValueError(
                f"this checkpoint's DiffIn state was saved by a run with {self._restored_world} process(es) and is "
                f"resumed with {world}: the training batches are sharded differently, so the recorded steps do not "
                "continue. Resume with the same number of processes (devices x nodes), or rerun the fit"
            )
        if world == 1:
            return records
        assert self._accumulator is not None and self._restored_rank_records is not None
        if rank != 0:
            self._accumulator.totals.zero_()
            self._accumulator.seen.zero_()
        mine = self._restored_rank_records[rank]
        self._restored_rank_records = None
        return [
            {**record, "batches": shard["batches"], "ids": shard["ids"], "losses": shard.get("losses")}
            for record, shard in zip(records, mine, strict=True)
        ]


class _HeldStep:
    """A recorded step waiting for its host values: ``values`` holds the finiteness flag of its
    gradients, the sample ids of each micro-batch and, where training_step computed them with
    per_sample_loss, each micro-batch's loss next to the mean of its per-sample losses."""

    def __init__(
        self, record: StepRecord, values: HostCopy, global_step: int, module: L.LightningModule, num_samples: int | None, loss_tols: list[float]
    ) -> None:
        self.record, self.values, self.global_step, self.module = record, values, global_step, module
        self.num_samples = num_samples  # the training dataset's length when the step ran
        self.loss_tols = loss_tols  # the tolerances of the loss comparisons in ``values`` (after the ids), if any


def _check_removal(pl_module: Any, batch: Any, ids: Tensor, statistics_only: bool = False) -> None:
    """A coupled module's ``remove_from_batch(batch, i)`` must be the batch without its sample ``i``,
    checked for the first, a middle and the last sample: ``sample_ids`` without that id and one
    per-sample loss fewer. An override is also compared with dropping row ``i`` of every per-sample
    tensor (:func:`~lightning_influence.batches.select_samples`, where that gives the same ids):
    other losses are warned about (once), since one of the two removals takes the wrong rows.
    ``statistics_only``: the batch is coupled through batch norm's statistics only, so in evaluation
    mode (running or fixed statistics) every sample's loss is its own, and the sub-batch's losses must
    be the batch's without sample ``i``: a removal that also takes a row out of a tensor that is not
    per sample (class weights with ``B`` rows) is refused."""
    from lightning_influence.batches import select_samples

    size = ids.numel()
    if size < 2:
        return
    name = type(pl_module).__name__
    own = type(pl_module).remove_from_batch is not InfluenceMixin.remove_from_batch
    removal = f"{name}.remove_from_batch" if own else "the default remove_from_batch (rows of dim 0 only)"
    why = "has batch norm, scored as trained (batch_norm='batch')" if statistics_only else "declares coupled_batch_loss"
    all_ids = ids.reshape(-1).cpu()
    seeded = seeded_losses(pl_module, size)

    def losses_of(sub_batch: Any) -> Any:  # each evaluation from one random state: dropout masks agree; no graph
        with torch.no_grad():
            return seeded(sub_batch)

    warned = False

    for index in sorted({0, size // 2, size - 1}):
        expected = torch.cat([all_ids[:index], all_ids[index + 1 :]])
        sub = pl_module.remove_from_batch(batch, index)
        sub_ids = torch.as_tensor(pl_module.sample_ids(sub)).reshape(-1).cpu()
        try:
            losses = losses_of(sub)
        except Exception as err:  # noqa: BLE001 - a sub-batch the loss cannot read: say where it came from
            raise ValueError(
                f"{name} {why}, so DiffIn evaluates per_sample_loss on the batch without each sample "
                f"in turn, but per_sample_loss failed on {removal}(batch, {index}) ({type(err).__name__}: {err}). A batch "
                "holding tensors that are per-sample along another dimension than the first (a [B, B] mask, a "
                f"sequence-first [T, B] tensor) needs {name}.remove_from_batch overridden to drop the sample from each "
                "of them"
            ) from err
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        if sub_ids.shape != expected.shape or not bool((sub_ids == expected).all()) or shape != (size - 1,):
            raise ValueError(
                f"{name} {why}, so DiffIn evaluates per_sample_loss on the batch without each "
                f"sample in turn, but {removal}(batch, {index}) on a batch of {size} samples gave a sub-batch with sample "
                f"ids of shape {tuple(sub_ids.shape)} and per_sample_loss of shape {shape}; expected the ids without the "
                f"one at position {index} ({size - 1} samples) and {size - 1} losses. Fix {name}.remove_from_batch: it "
                "must drop row `index` of every per-sample tensor of the batch (the default drops it along dim 0 of every "
                "tensor whose first dimension is the batch size)"
            )
        if own:
            keep = [i for i in range(size) if i != index]
            try:
                rows = select_samples(batch, keep, size)
                same_ids = torch.equal(torch.as_tensor(pl_module.sample_ids(rows)).reshape(-1).cpu(), expected)
                reference = losses_of(rows) if same_ids else None
            except Exception:  # noqa: BLE001 - a layout select_samples does not handle: nothing to compare
                reference = None
            if not warned and isinstance(reference, Tensor) and reference.shape == losses.shape:
                tol = loss_tolerance(losses.dtype, reference.dtype)
                gap = float((losses.detach().double() - reference.detach().double()).abs().max())
                if gap > tol * max(float(reference.detach().abs().max()), 1e-30):
                    rank_zero_warn(
                        f"{name}.remove_from_batch(batch, {index}) gives other losses (by up to {gap:.3g}) than dropping "
                        f"row {index} of every tensor whose first dimension is the batch size: one of the two takes out "
                        f"other data than sample {index}. If the override is right (the batch holds per-sample data "
                        "along another dimension), ignore this; else fix it, since the scores and the leave-one-out "
                        "ground truth both use it"
                    )
                    warned = True  # the other positions' ids and shapes are still checked
        if statistics_only:
            _check_removal_in_evaluation_mode(pl_module, batch, index, size, removal)


def _check_removal_in_evaluation_mode(pl_module: Any, batch: Any, index: int, size: int, removal: str) -> None:
    """See :func:`_check_removal` (``statistics_only``). The full batch's losses are evaluated next to
    the sub-batch's each time: the training-mode evaluations of the check between positions move the
    running statistics (restored once the whole check is done), and both sides must read the same ones."""
    with torch.no_grad(), evaluation_mode(pl_module), fixed_statistics(pl_module):
        full = pl_module.per_sample_loss(batch).detach()
        sub = pl_module.per_sample_loss(pl_module.remove_from_batch(batch, index)).detach()
    gap, tolerance = removal_gap(full, sub, index)
    if gap > tolerance:
        raise ValueError(
            f"{type(pl_module).__name__} has batch norm, which DiffIn scores as trained (batch_norm='batch', chosen by "
            f"'auto'): removing a sample re-evaluates {removal}(batch, i), the batch without it. But it takes out more "
            f"than the sample: in evaluation mode (running statistics: each sample's loss is its own) the losses of "
            f"{removal}(batch, {index}) differ from the batch's losses without sample {index} by up to {gap:.3g}. The "
            f"default remove_from_batch drops row {index} of every tensor whose first dimension is the batch size "
            f"({size}), also of one that is not per sample (class weights, a lookup table). Override remove_from_batch "
            "to drop the sample's rows only, or keep such tensors out of the batch (module attributes or buffers)"
        )


SIXTEEN_MIXED = (
    "precision='16-mixed' (a step its gradient scaler skips moved batch norm's running statistics without an update "
    "to record)"
)


def _batch_norm_option_obstacles(
    coupled: bool | None, batch_removal: str, chunk_size: int | None, per_sample: Any, removal: str = "auto"
) -> dict[str, bool]:
    """DiffIn's options that rule scoring batch norm as trained out (a removal over whole batches; with
    ``batch_norm_removal="exact"`` by sub-batches in forward mode), named, each with whether it is set."""
    exact = removal == "exact"
    return {
        "coupled=False": coupled is False and exact,
        "batch_removal='drop'": batch_removal == "drop",
        f"chunk_size={chunk_size}": chunk_size is not None,
        "per_sample='finite_difference' with batch_norm_removal='exact'": per_sample == "finite_difference" and exact,
    }


def _syncs_batch_norm(trainer: L.Trainer) -> bool:
    """Whether the strategy turns batch norm into ``SyncBatchNorm`` when fit starts (``Trainer(sync_batchnorm=True)``:
    after the callbacks' ``setup``)."""
    return getattr(trainer.strategy, "_layer_sync", None) is not None


def _last_batch_size(trainer: L.Trainer) -> int | None:
    """The size of a training loader's short last batch (``drop_last=False``, a number of samples per
    epoch, its sampler's or else its dataset's, that the batch size does not divide), where the loader
    says; else ``None``."""
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    try:
        drawn = len(sampler) if sampler is not None else None  # type: ignore[arg-type]
    except TypeError:  # a sampler without a length
        drawn = None
    if drawn is None:  # the samples an epoch draws: the loader's own dataset (not dataset_length's id space)
        try:
            drawn = len(loader.dataset)  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError):
            drawn = None
    size, length = getattr(loader, "batch_size", None), drawn
    if int(getattr(trainer, "world_size", 1) or 1) > 1 and drawn is None:  # each rank's share is its sampler's
        return None
    if not size or getattr(loader, "drop_last", True) or not length:
        return None
    return (length % int(size)) or None


def _remove_handoff(path: Path, owner_pid: int) -> None:
    """Delete an unread hand-over file when the launching process's callback goes away."""
    if os.getpid() == owner_pid:
        path.unlink(missing_ok=True)


def _loaded_differently(module: L.LightningModule, saved: dict[str, Tensor]) -> bool:
    """Do the module's parameters differ from the checkpoint's ``saved`` ones (bit for bit, in the
    module's dtype)? One comparison per parameter, at the first batch after a resume."""
    for name, p in module.named_parameters():
        value = saved.get(name)
        if isinstance(value, Tensor) and not torch.equal(p.detach(), value.to(device=p.device, dtype=p.dtype)):
            return True
    return False


def _is_last_step(trainer: L.Trainer) -> bool:
    """True when the optimizer step just taken is the last of this fit (max_steps or max_epochs)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return bool(trainer.is_last_batch) and 0 < max_epochs <= trainer.current_epoch + 1
