"""Parameter checkpoints recorded during ``fit``, for estimators that work on a few iterates of
the trajectory (TracInCP, the published Diff-In checkpoint estimator).

:class:`ParameterCheckpoints` records the parameters ``theta_t`` *before* optimizer step ``t``
(the iterate after ``t`` steps, at which step ``t``'s gradient is taken) every ``every`` steps or
at ``count`` sampled steps, with each step's learning rate per parameter group. It also keeps a
light log of every optimizer step (its learning rates, the gradient-accumulation normaliser and
the sample ids of its micro-batches), so that an estimator knows which samples each checkpoint
stands for. Checkpoints stay in memory or are written to a directory, one file per checkpoint
plus a ``steps.pt`` log, each written atomically and loadable with ``torch.load(weights_only=True)``
(:meth:`RecordedCheckpoints.load`).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_influence.callbacks.hooks import OptimizerStepWatch
from lightning_influence.checks import (
    check_ids,
    check_influence_aware,
    check_single_device,
    dataset_length,
    draws_with_replacement,
    repeats_unsupported,
)
from lightning_influence.optimizers import torch_optimizer
from lightning_influence.scores import atomic_write_bytes, verify_zip
from lightning_influence.validation import check_count, check_seed

__all__ = ["ParameterCheckpoint", "ParameterCheckpoints", "RecordedCheckpoints", "CheckpointFileError"]

CHECKPOINT_FORMAT = "lightning-influence/parameter-checkpoint"
STEPS_FORMAT = "lightning-influence/step-log"
FORMAT_VERSION = 1
STEPS_FILE = "steps.pt"
_CHECKPOINT_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")
Sampling = Literal["even", "random"]
#: who refuses in messages: the recorder of the checkpoint estimators
OWNER = "ParameterCheckpoints (the recorder of tracin_checkpoints and diffin_checkpoints)"


class CheckpointFileError(ValueError):
    """A checkpoint directory or file is missing, damaged or of an unknown format."""


def first_order_calibration(trainer: L.Trainer, optimizer: Any) -> tuple[bool, str]:
    """Is the run's update the one a first-order, plain-SGD view (TracIn: ``eta_t <grad F, grad l_z> / b``
    per step) takes, the learning rate times the gradient: plain ``torch.optim.SGD`` without momentum
    and without gradient clipping? (Even then TracIn's magnitudes are not calibrated: see
    :func:`first_order_units`.) Returns ``(True, "plain SGD")``
    or ``(False, why)``: with Adam the step is preconditioned (measured ~15x off on a small MLP),
    with momentum a gradient is applied again in later steps (up to ``1 / (1 - momentum)`` in all),
    and clipping scales the step down (measured ~10x)."""
    optimizer = torch_optimizer(optimizer, "TracIn")
    reasons = []
    if type(optimizer) is not torch.optim.SGD:
        reasons.append(f"{type(optimizer).__name__} (its step is not the learning rate times the gradient)")
    else:
        momentum = max(float(g.get("momentum", 0.0) or 0.0) for g in optimizer.param_groups)
        if momentum:
            reasons.append(f"SGD with momentum {momentum:g} (each gradient is applied again in later steps)")
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        reasons.append(f"gradient clipping by {algorithm} at {clip:g} (a clipped step is not proportional to the gradient)")
    return (not reasons, "; ".join(reasons) if reasons else "plain SGD")


def _refuse_maximize(optimizer: torch.optim.Optimizer, step: int) -> None:
    """The checkpoint estimators weight steps by their learning rates as descent steps; an ascent
    (``maximize=True``) would flip every score's sign without a trace in the recorded rates."""
    maximized = [g for g, group in enumerate(optimizer.param_groups) if group.get("maximize", False)]
    if maximized:
        raise ValueError(
            f"ParameterCheckpoints: parameter group(s) {maximized} of the optimizer have maximize=True (seen at optimizer "
            f"step {step}): the checkpoint estimators (TracInCP, the published Diff-In) model descent steps. Minimise the "
            "negated loss instead, or score this run with the TracIn or DiffIn callbacks, which model maximize"
        )


def first_order_units(plain_sgd: bool, update: str, reaveraged: bool = False) -> str:
    """The ``units`` metadata of first-order (TracIn) scores. Classic TracIn's step term drops the
    sample's loss but keeps the batch's ``1 / b``, where the removal the library's scores stand
    for re-averages the other ``b - 1`` samples: each step's terms miss
    ``-eta / (b - 1) <grad F, batch-mean gradient>`` (a per-step offset that sums over sets;
    measured 10x too large on a deletion set). ``reaveraged``: the terms were centred on the batch
    mean and scaled by ``1 / (b - 1)`` (``TracIn(batch_removal="reaverage")``), which models it.
    Outside plain unclipped SGD (``plain_sgd`` False, from :func:`first_order_calibration`) the
    step itself is another, and the magnitudes are off either way."""
    if reaveraged and plain_sgd:
        return "first-order target-loss change when the sample is removed (units of the target loss; plain SGD, batch re-averaged)"
    why = [] if reaveraged else [
        "each step's term drops the sample's loss but keeps the batch's 1/b, where the removal the scores stand for "
        "re-averages the other b-1 samples (a per-step offset, -eta/(b-1) <grad F, batch-mean gradient>, that sums over "
        "sets; batch_removal='reaverage' models it)"
    ]
    if not plain_sgd:
        why.append(f"the run used {update}, whose update TracIn does not model")
    return (
        f"target-loss units and sign of TracIn's first-order view, magnitude NOT calibrated: {'; and '.join(why)}; rank by "
        "these scores (DiffIn models the batch, the optimizer and clipping)"
    )


def _checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def _load(path: Path, what: str) -> Any:
    """``path``'s tensors and plain values, after checking every zip member's CRC-32 (torch's
    reader does not: a damaged parameter would load as changed values and change the scores)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointFileError(f"no {what} at {path}") from None
    except OSError as err:
        raise CheckpointFileError(f"cannot read the {what} at {path}: {err}") from None
    verify_zip(data, str(path), kind=what, error=CheckpointFileError)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged zip/pickle data
        raise CheckpointFileError(f"{path} is not a readable {what} (truncated or corrupted?): {err}") from None


def _save(path: Path, payload: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@dataclass
class ParameterCheckpoint:
    """The parameters ``theta_t`` before optimizer step ``step`` (0-based: after ``step`` updates)
    and the learning rate ``lrs[g]`` of each optimizer parameter group at that step.

    ``params`` is ``None`` for a checkpoint kept on disk (``path``) until :meth:`parameters` loads it.
    """

    step: int
    lrs: tuple[float, ...]
    params: dict[str, Tensor] | None = None
    path: Path | None = None

    def parameters(self) -> dict[str, Tensor]:
        """``{name: tensor}`` of the recorded parameters (loaded from ``path`` on demand, not cached)."""
        if self.params is not None:
            return self.params
        if self.path is None:
            raise CheckpointFileError(f"checkpoint of step {self.step} has neither parameters nor a file")
        payload = _load(self.path, "parameter checkpoint")
        if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointFileError(f"{self.path} is not a lightning-influence parameter checkpoint")
        if payload.get("version") != FORMAT_VERSION or int(payload.get("step", -1)) != self.step:
            raise CheckpointFileError(
                f"{self.path}: version {payload.get('version')!r} / step {payload.get('step')!r}; expected version "
                f"{FORMAT_VERSION} and step {self.step}"
            )
        params = payload.get("params")
        if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
            raise CheckpointFileError(f"{self.path} holds no parameter tensors")
        return dict(params)


@dataclass
class RecordedCheckpoints:
    """What :class:`ParameterCheckpoints` recorded in one ``fit``.

    ``checkpoints``: sorted by step. ``param_groups[g]``: names of optimizer group ``g``'s trained
    parameters. ``step_lrs``: float64 ``[T, G]``, the learning rates of every optimizer step;
    ``step_normalizers``: ``[T]``, Lightning's ``accumulate_grad_batches`` at each step;
    ``step_ids[t]``: the sample ids of each micro-batch of step ``t``. ``num_samples``: the training
    dataset's length when known. ``calibrated`` / ``update``: whether the run's update was plain
    unclipped SGD, and what it was (:func:`first_order_calibration`; ``None`` when not recorded).
    """

    checkpoints: list[ParameterCheckpoint]
    param_groups: tuple[tuple[str, ...], ...]
    step_lrs: Tensor
    step_normalizers: Tensor
    step_ids: list[tuple[Tensor, ...]] = field(default_factory=list)
    num_samples: int | None = None
    calibrated: bool | None = None
    update: str | None = None

    @property
    def total_steps(self) -> int:
        return int(self.step_lrs.shape[0])

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[ParameterCheckpoint]:
        return iter(self.checkpoints)

    def segments(self) -> list[tuple[int, int]]:
        """Steps ``[start, end)`` each checkpoint stands for: from its step to the next checkpoint's
        (the first one also covers any steps before it, the last one runs to the end of training)."""
        steps = [c.step for c in self.checkpoints]
        bounds = [0, *steps[1:], self.total_steps]
        return [(bounds[j], bounds[j + 1]) for j in range(len(steps))]

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(n for group in self.param_groups for n in group)

    # ------------------------------------------------------------------ files
    def step_log(self) -> dict[str, Any]:
        """The step log as tensors and primitives (the ``steps.pt`` payload)."""
        sizes = [len(ids) for ids in self.step_ids]
        flat = [i for ids in self.step_ids for i in ids]
        return {
            "format": STEPS_FORMAT,
            "version": FORMAT_VERSION,
            "param_groups": [list(g) for g in self.param_groups],
            "lrs": self.step_lrs.clone(),
            "normalizers": self.step_normalizers.clone(),
            "micro_batches": torch.tensor(sizes, dtype=torch.long),
            "batch_sizes": torch.tensor([t.numel() for t in flat], dtype=torch.long),
            "ids": torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long),
            "num_samples": self.num_samples,
            "checkpoint_steps": [c.step for c in self.checkpoints],
            "checkpoint_lrs": [list(c.lrs) for c in self.checkpoints],
            "calibrated": self.calibrated,
            "update": self.update,
        }

    @classmethod
    def from_step_log(cls, log: Any, checkpoints: list[ParameterCheckpoint], origin: str) -> RecordedCheckpoints:
        if not isinstance(log, Mapping) or log.get("format") != STEPS_FORMAT:
            raise CheckpointFileError(f"{origin} is not a lightning-influence step log")
        if log.get("version") != FORMAT_VERSION:
            raise CheckpointFileError(f"{origin} has step-log version {log.get('version')!r}; this library reads {FORMAT_VERSION}")
        try:
            sizes = log["batch_sizes"].tolist()
            pieces = list(log["ids"].split(sizes)) if sizes else []
            step_ids: list[tuple[Tensor, ...]] = []
            position = 0
            for count in log["micro_batches"].tolist():
                step_ids.append(tuple(pieces[position : position + count]))
                position += count
            return cls(
                checkpoints=checkpoints,
                param_groups=tuple(tuple(g) for g in log["param_groups"]),
                step_lrs=log["lrs"],
                step_normalizers=log["normalizers"],
                step_ids=step_ids,
                num_samples=log["num_samples"],
                calibrated=log.get("calibrated"),  # absent from step logs written before it was recorded
                update=log.get("update"),
            )
        except (KeyError, AttributeError, TypeError, RuntimeError) as err:
            raise CheckpointFileError(f"{origin} is an incomplete step log: {err}") from None

    def save(self, directory: str | Path) -> Path:
        """Write every checkpoint and the step log to ``directory`` (atomically, file by file)."""
        directory = Path(directory)
        for c in self.checkpoints:
            write_checkpoint(directory, c.step, c.lrs, c.parameters())
        _save(directory / STEPS_FILE, self.step_log())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RecordedCheckpoints:
        """Read a directory written by :class:`ParameterCheckpoints` (or :meth:`save`) without
        unpickling arbitrary objects. Parameters are loaded lazily, one checkpoint at a time."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointFileError(f"no checkpoint directory at {directory}")
        log = _load(directory / STEPS_FILE, "step log (written at the end of fit)")
        found = {int(m.group(1)): directory / p.name for p in directory.iterdir() if (m := _CHECKPOINT_FILE.match(p.name))}
        try:
            steps, lrs = list(log["checkpoint_steps"]), list(log["checkpoint_lrs"])
        except (KeyError, TypeError):
            raise CheckpointFileError(f"{directory / STEPS_FILE} lists no checkpoints") from None
        missing = [s for s in steps if s not in found]
        if missing:
            raise CheckpointFileError(f"{directory} lacks the checkpoint files of steps {missing[:10]} listed in {STEPS_FILE}")
        checkpoints = [ParameterCheckpoint(int(s), tuple(float(x) for x in lr), None, found[s]) for s, lr in zip(steps, lrs, strict=True)]
        return cls.from_step_log(log, checkpoints, str(directory / STEPS_FILE))


def write_checkpoint(directory: Path, step: int, lrs: Sequence[float], params: Mapping[str, Tensor]) -> Path:
    """Write one parameter checkpoint atomically; returns its path."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "step": int(step),
        "lrs": torch.tensor([float(x) for x in lrs], dtype=torch.float64),
        "params": {n: p.detach().to("cpu").clone() for n, p in params.items()},
    }
    return _save(Path(directory) / _checkpoint_name(step), payload)


def checkpoint_steps(total_steps: int, *, every: int | None, count: int | None, sampling: Sampling, seed: int) -> set[int] | None:
    """The steps to record: every ``every``-th (``None``: decided step by step) or ``count`` of ``total_steps``."""
    if every is not None:
        return None
    assert count is not None
    if count >= total_steps:
        return set(range(total_steps))
    if sampling == "even":
        return {math.floor(j * total_steps / count) for j in range(count)}
    g = torch.Generator().manual_seed(seed)
    return set(torch.randperm(total_steps, generator=g)[:count].tolist())


class ParameterCheckpoints(Callback):
    """Records parameter checkpoints and the step log during ``fit``.

    Args:
        every: record ``theta_t`` at steps ``0, every, 2*every, ...``.
        count: record ``count`` steps of the run (needs a known number of steps:
            ``trainer.estimated_stepping_batches``), chosen by ``sampling``: ``"even"`` (steps
            ``floor(j T / count)``, the first at step 0) or ``"random"`` (uniform without replacement, ``seed``).
        directory: write each checkpoint there (``checkpoint-<step>.pt``) and the step log
            (``steps.pt``) at the end of fit; ``None`` keeps everything in memory.

    Exactly one of ``every`` / ``count``. After fit, :attr:`record` is a :class:`RecordedCheckpoints`.
    The module must be influence-aware (:class:`~lightning_influence.InfluenceMixin`: its
    ``sample_ids(batch)`` names the samples of each step).
    """

    def __init__(
        self,
        every: int | None = None,
        count: int | None = None,
        *,
        directory: str | Path | None = None,
        sampling: Sampling = "even",
        seed: int = 0,
    ) -> None:
        if (every is None) == (count is None):
            raise ValueError(
                f"give exactly one of every=<k> (a checkpoint every k optimizer steps) or count=<m> (m sampled steps), "
                f"got every={every!r}, count={count!r}"
            )
        check_count("every", every, none_ok=True)
        check_count("count", count, none_ok=True)
        if sampling not in ("even", "random"):
            raise ValueError(f"sampling must be 'even' or 'random', got {sampling!r}")
        self.every = every
        self.count = count
        self.directory = Path(directory) if directory is not None else None
        self.sampling: Sampling = sampling
        check_seed("seed", seed)
        self.seed = seed
        self.record: RecordedCheckpoints | None = None
        self._checkpoints: list[ParameterCheckpoint] = []
        self._lrs: list[list[float]] = []
        self._normalizers: list[int] = []
        self._ids: list[tuple[Tensor, ...]] = []
        self._micro: list[Tensor] = []
        self._pending: tuple[tuple[Tensor, ...], int] | None = None  # the step between its hooks and optimizer.step
        self._step_watch = OptimizerStepWatch(self._on_step, "ParameterCheckpoints")  # records each step as optimizer.step starts
        self._groups: tuple[tuple[str, ...], ...] = ()
        self._params: list[tuple[str, Tensor]] = []
        self._planned: set[int] | None = None
        self._num_samples: int | None = None
        self._calibrated: bool | None = None
        self._update: str | None = None
        self._restored = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every, count=self.count, directory=str(self.directory))

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_influence_aware(pl_module)
        if not pl_module.automatic_optimization:
            raise ValueError("ParameterCheckpoints follows Lightning's automatic optimization only, not manual optimization")
        check_single_device(trainer, "ParameterCheckpoints")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"ParameterCheckpoints needs exactly one optimizer, got {len(trainer.optimizers)}")
        optimizer = torch_optimizer(trainer.optimizers[0], "ParameterCheckpoints")
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = []
        params = []
        for group in optimizer.param_groups:
            members = []
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError("the optimizer holds a parameter that is not a parameter of the LightningModule")
                if p.requires_grad:
                    members.append(names[id(p)])
                    params.append((names[id(p)], p))
            groups.append(tuple(members))
        self._groups, self._params = tuple(groups), params
        self._calibrated, self._update = first_order_calibration(trainer, optimizer)
        if self.count is not None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "ParameterCheckpoints(count=...) needs the number of optimizer steps in advance, but the trainer "
                    "cannot estimate it (an iterable loader without len and no max_steps): set max_steps or use every=<k>"
                )
            self._planned = checkpoint_steps(int(total), every=None, count=self.count, sampling=self.sampling, seed=self.seed)
        if not self._restored:
            self._checkpoints, self._lrs, self._normalizers, self._ids = [], [], [], []
        self._restored = False
        self._micro, self._pending = [], None
        self._num_samples = None
        self.record = None
        self._step_watch.watch(trainer.optimizers[0])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._num_samples is None:
            self._num_samples = dataset_length(trainer)
            if draws_with_replacement(trainer):  # refused before a duplicate shows up mid-training
                raise ValueError(f"the training loader's sampler draws with replacement. {repeats_unsupported(OWNER)}")
        ids = torch.as_tensor(pl_module.sample_ids(batch))  # type: ignore[operator]
        check_ids(ids, self._num_samples, pl_module, batch, owner=OWNER)
        self._micro.append(ids.detach().to("cpu", torch.long).reshape(-1).clone())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        micro, self._micro = self._micro, []
        self._pending = (tuple(micro), int(trainer.accumulate_grad_batches))  # recorded as optimizer.step starts

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step as ``optimizer.step`` takes it (:class:`OptimizerStepWatch`): the learning rates
        after every hook (the module's ``on_before_optimizer_step`` runs after the callbacks'), the
        parameters before the update. A step the gradient scaler skips is never recorded."""
        if self._pending is None:
            return
        (micro, normalizer), self._pending = self._pending, None
        step = len(self._lrs)
        _refuse_maximize(optimizer, step)
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self._lrs.append(lrs)
        self._normalizers.append(normalizer)
        self._ids.append(micro)
        wanted = step % self.every == 0 if self.every is not None else step in (self._planned or ())
        if not wanted:
            return
        if self.directory is not None:
            path = write_checkpoint(self.directory, step, lrs, dict(self._params))
            self._checkpoints.append(ParameterCheckpoint(step, tuple(lrs), None, path))
        else:
            self._checkpoints.append(ParameterCheckpoint(step, tuple(lrs), {n: p.detach().clone() for n, p in self._params}))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._step_watch.close()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_watch.close()
        self.record = self._current_record()
        if self.directory is not None:
            _save(self.directory / STEPS_FILE, self.record.step_log())

    def _current_record(self) -> RecordedCheckpoints:
        lrs = torch.tensor(self._lrs, dtype=torch.float64).reshape(len(self._lrs), len(self._groups))
        return RecordedCheckpoints(
            checkpoints=list(self._checkpoints),
            param_groups=self._groups,
            step_lrs=lrs,
            step_normalizers=torch.tensor(self._normalizers, dtype=torch.long),
            step_ids=list(self._ids),
            num_samples=self._num_samples,
            calibrated=self._calibrated,
            update=self._update,
        )

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The step log and the checkpoints so far (their tensors in memory mode, their steps on disk).
        Tensors and primitives only: loadable with ``torch.load(weights_only=True)``."""
        if self._micro:
            raise RuntimeError(
                "ParameterCheckpoints cannot be checkpointed in the middle of a gradient accumulation: save at "
                "optimizer-step boundaries"
            )
        record = self._current_record()
        return {
            "format": FORMAT_VERSION,
            "log": record.step_log(),
            "params": [c.params if c.params is not None else None for c in self._checkpoints],
            "paths": [str(c.path) if c.path is not None else None for c in self._checkpoints],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != FORMAT_VERSION:
            raise ValueError(f"ParameterCheckpoints state of format {state_dict.get('format')!r}; this version reads {FORMAT_VERSION}")
        log = state_dict["log"]
        checkpoints = [
            ParameterCheckpoint(int(s), tuple(float(x) for x in lr), p, Path(path) if path is not None else None)
            for s, lr, p, path in zip(log["checkpoint_steps"], log["checkpoint_lrs"], state_dict["params"], state_dict["paths"], strict=True)
        ]
        record = RecordedCheckpoints.from_step_log(log, checkpoints, "the ParameterCheckpoints state")
        self._checkpoints = checkpoints
        self._lrs = record.step_lrs.tolist()
        self._normalizers = record.step_normalizers.tolist()
        self._ids = record.step_ids
        self._restored = True
