"""Recorded training steps: what the reverse accumulation of Diff-In needs, kept in memory,
spilled to disk, or checkpointed every k steps and recomputed.

A step ``t`` is recorded with the micro-batches that ``training_step`` saw (several under
gradient accumulation) and their sample ids, the optimizer's hyperparameters for this step
(learning rates and the rest, as :class:`~lightning_influence.optimizers.StepModel` reads them),
the parameters ``theta_t`` before the update, the raw step gradient ``g_t(theta_t)`` and the
optimizer state before the step (momentum buffers, Adam moments) when the update needs them,
and, when attribution is restricted to a parameter subset, the other trainable parameters.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_influence.batches import pack, to_device, unpack

Storage = Literal["memory", "disk"]
RecomputeStep = Callable[["StepRecord"], tuple[Tensor, Tensor, dict[str, Tensor]]]
"""``record -> (grad_t, theta_{t+1}, state_{t+1})``: one training step re-run from a record."""


@dataclass
class StepRecord:
    """One optimizer step.

    ``theta``/``grad``/``state`` values are flat (the parameters' dtype); ``hyper`` is float64
    ``[parameter tensors, hyperparameters]``; ``theta`` is ``None`` for steps between checkpoints
    until recomputed. ``normalizer`` divides each micro-batch's mean loss (Lightning's
    ``accumulate_grad_batches``). ``context`` holds the trainable parameters outside the
    attributed subset, if any. ``global_ids`` (distributed runs only) holds, per micro-batch, the
    ids of the whole global micro-batch: the union of every rank's ``ids`` (a sample that the
    ``DistributedSampler`` repeated appears as often as it was trained on). ``varying``: the
    values this step trained with of the tensors that training changes outside the optimizer
    (buffers, untrained parameters; see :class:`~lightning_influence.kernels.BufferWatch`), by
    full name. ``losses``: see below.
    """

    step: int
    batches: tuple[Any, ...]
    ids: tuple[Tensor, ...]
    normalizer: int
    hyper: Tensor
    theta: Tensor | None = None
    grad: Tensor | None = None
    state: dict[str, Tensor] = field(default_factory=dict)
    context: Tensor | None = None
    global_ids: tuple[Tensor, ...] | None = None
    varying: dict[str, Tensor] = field(default_factory=dict)
    losses: tuple[Tensor | None, ...] | None = None
    """Per micro-batch, the per-sample losses ``training_step`` computed at ``theta`` (``None``
    where they were not seen): the base of forward differences of the losses."""
    running_counts: Tensor | None = None
    """``DiffIn(batch_norm="batch")``: ``num_batches_tracked`` of the batch-norm layers with running
    statistics after the step's forwards, int64 ``[L]``."""
    running_momenta: tuple[float | None, ...] | None = None
    """``DiffIn(batch_norm="batch")``: those layers' ``momentum`` at the step (``None``: cumulative average)."""
    grad_recomputed: bool = False
    """``grad`` was recomputed by a sweep (``recompute_step``), not recorded in training: no evidence of
    what training computed."""


class VectorPool:
    """Flat vectors of one size and dtype, reused once released: after the first window, recording
    a step writes into memory that is already mapped instead of faulting in a fresh allocation,
    which dominates the recording cost of large models. Each vector is its own allocation (not a
    view into a larger block: forward-mode AD would then allocate tangents of the block's size).

    Only vectors the pool lent out come back into it: the pool never holds more than the most
    vectors in use at once, however many other vectors pass through :meth:`give`."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.size, self.dtype, self.device = size, dtype, torch.device(device)
        self._free: list[Tensor] = []
        self._lent: set[int] = set()  # data pointers of the vectors out on loan

    def take(self) -> Tensor:
        vector = self._free.pop() if self._free else torch.empty(self.size, dtype=self.dtype, device=self.device)
        self._lent.add(vector.data_ptr())
        return vector

    def give(self, vector: Tensor | None) -> None:
        if vector is None or vector._base is not None or vector.data_ptr() not in self._lent:
            return
        self._lent.discard(vector.data_ptr())
        self._free.append(vector)


class SpilledTrajectoryError(RuntimeError):
    """A record spilled by ``storage="disk"`` cannot be written (a full disk) or read back (its
    folder, or the record's file, was removed or changed during fit)."""


class Trajectory:
    """A window of recorded steps, oldest first.

    ``storage="memory"`` keeps records as they are (batches stay on their device);
    ``"disk"`` writes each record to a folder of its own in ``spill_dir`` (the system temporary
    folder by default), deleted by :meth:`close`, and reads it
    back with ``torch.load(weights_only=True)``. ``checkpoint_every=k`` stores parameters and
    optimizer state only every k steps; the steps in between are rebuilt during the reverse sweep
    by re-running the update with ``recompute_step``. With ``keep_gradients`` every step keeps
    its gradient (and context), so that re-running a step is the optimizer's update alone; without,
    only the batches are kept and ``recompute_step`` recomputes the gradient too.
    """

    def __init__(
        self,
        storage: Storage = "memory",
        spill_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        device: torch.device | str = "cpu",
        keep_gradients: bool = False,
    ) -> None:
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.storage = storage
        self.checkpoint_every = checkpoint_every
        self.keep_gradients = keep_gradients
        self.device = torch.device(device)
        self._records: deque[StepRecord | Path] = deque()
        self._extra_checkpoints: set[int] = set()  # steps that keep their parameters off the k-step grid
        # Steps whose stored record (in memory or in its file) holds no parameters, whatever the grid says: records
        # restored from a fit with another checkpoint_every keep what that fit stored.
        self._without_theta: set[int] = set()
        self.pool: VectorPool | None = None
        # A folder of its own (inside spill_dir when given): callbacks, ranks and processes sharing a
        # spill_dir never read or delete each other's files.
        self._dir: Path | None = None
        self._spill_dir = spill_dir
        if storage == "disk":
            try:
                if spill_dir is not None:
                    Path(spill_dir).mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="diffin-trajectory-", dir=spill_dir))
            except OSError as err:
                where = f"spill_dir={str(spill_dir)!r}" if spill_dir is not None else "the system's temporary folder"
                raise ValueError(
                    f"storage='disk' spills the recorded steps into a folder of their own inside {where}, which cannot "
                    f"be created there ({type(err).__name__}: {err}). Pass a spill_dir that is a writable folder (or a "
                    "path where one can be made)"
                ) from err

    def __len__(self) -> int:
        return len(self._records)

    def flat_copy(self, tensors: list[Tensor]) -> Tensor:
        """One flat copy of ``tensors`` (same dtype and device), in pooled memory when kept in memory."""
        size = sum(t.numel() for t in tensors)
        if self.storage != "memory":
            return torch.cat([t.detach().reshape(-1) for t in tensors])
        if self.pool is None or self.pool.size != size or self.pool.dtype != tensors[0].dtype:
            self.pool = VectorPool(size, tensors[0].dtype, tensors[0].device)
        out = self.pool.take()
        torch.cat([t.detach().reshape(-1) for t in tensors], out=out)
        return out

    def keeps_theta(self, step: int) -> bool:
        """Whether the record of ``step`` stores its parameters: on the ``checkpoint_every`` grid or
        kept off it (:meth:`keep_theta_at`, restored records that hold them), and not a record,
        restored from a fit with another grid, that was stored without them."""
        if step in self._without_theta:
            return False
        return step % self.checkpoint_every == 0 or step in self._extra_checkpoints

    def keep_theta_at(self, step: int) -> None:
        """Store the parameters (and optimizer state) of ``step`` too, off the ``checkpoint_every``
        grid: the steps after it are rebuilt from what it stores. For parameters that did not
        come from the recorded update, e.g. a resumed fit's, rounded when Lightning loads a float64
        checkpoint into the module before its precision converts it."""
        self._extra_checkpoints.add(step)

    def append(self, record: StepRecord) -> None:
        if not self.keeps_theta(record.step):
            record = replace(record)
            self._drop_between_checkpoints(record)
        if record.theta is None:
            self._without_theta.add(record.step)
        if self.storage == "memory":
            self._records.append(record)
            return
        path = self._dir / f"step-{record.step:09d}.pt"  # type: ignore[operator]
        partial = path.with_name(f".{path.name}.tmp")
        try:
            torch.save(_payload(record), partial)
            os.replace(partial, path)  # never a half-written record under the final name (scratch: no fsync)
        except (OSError, RuntimeError) as err:
            with contextlib.suppress(OSError):  # a full disk keeps nothing of the failed write
                partial.unlink(missing_ok=True)
            raise self._spill_error(record.step, path, err, writing=True) from err
        self._records.append(path)

    def _read(self, path: Path) -> dict[str, Any]:
        """A spilled record's payload, or a :class:`SpilledTrajectoryError` saying what happened to it:
        also for a file that reads but holds another record than the one written under its name
        (files swapped or copied over each other during fit), told by the payload's own step and
        by whether it holds parameters."""
        step = _path_step(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise self._spill_error(step, path, err, writing=False) from err
        held = payload.get("step") if isinstance(payload, dict) else None
        if isinstance(held, bool) or not isinstance(held, int) or held != step:
            what = f"step {held}" if isinstance(held, int) and not isinstance(held, bool) else "no step record"
            raise self._spill_error(step, path, ValueError(f"the file holds {what}, not step {step}: files swapped or replaced"), writing=False)
        if (payload.get("theta") is None) != (step in self._without_theta):
            holds, written = ("no", "with") if payload.get("theta") is None else ("the", "without")
            raise self._spill_error(
                step, path, ValueError(f"the file holds {holds} parameters, but step {step} was written {written} them: replaced"), writing=False
            )
        return payload

    def _spill_error(self, step: int, path: Path, err: BaseException, *, writing: bool) -> SpilledTrajectoryError:
        """What went wrong with the spilled record of ``step`` at ``path``: a write that failed in a
        folder that still exists is a full (or read-only) disk, whose ``torch.save`` error
        (``RuntimeError: ... unexpected pos ...``) does not say so; anything else (a read, or a write
        into a folder that is gone) means the folder or its files were removed or changed during fit."""
        where = f"{self._dir}" + (f" (inside spill_dir={str(self._spill_dir)!r})" if self._spill_dir is not None else "")
        gone = self._dir is None or not self._dir.is_dir()
        if writing and not gone:
            return SpilledTrajectoryError(
                f"writing step {step} to {where} failed (disk full? or the folder is no longer writable): "
                f"{type(err).__name__}: {err}. storage='disk' keeps every recorded step there until the end of fit (or "
                f"of its online window; {len(self._records)} step(s) are there now): free space on that disk, pass a "
                "spill_dir on a disk with room for the whole trajectory, or use storage='memory'"
            )
        doing = f"writing step {step} to {path.name}" if writing else f"reading step {step} back from {path.name}"
        what = "its folder no longer exists" if gone else f"{type(err).__name__}: {err}"
        return SpilledTrajectoryError(
            f"DiffIn's spilled trajectory in {where} was removed or changed during fit ({doing} failed: {what}). "
            "storage='disk' keeps every recorded step there until the end of fit (or of its online window): keep the "
            "folder and its files for the whole fit, out of reach of temporary-file cleaners (or use storage='memory')"
        )

    def export(self) -> list[dict[str, Any]]:
        """Every record as a dict of CPU tensors and primitives (``torch.load(weights_only=True)``
        can read it back), oldest first: the trajectory's part of a Lightning checkpoint."""
        return [_payload(self._load(item)) if isinstance(item, StepRecord) else self._read(item) for item in self._records]

    def restore(self, payloads: list[dict[str, Any]]) -> None:
        """Append records exported by :meth:`export` (after a resume)."""
        for p in payloads:
            if p["theta"] is not None:
                self._extra_checkpoints.add(int(p["step"]))
            self.append(_from_payload(p, self.device))

    def release(self, vector: Tensor | None) -> None:
        """Return a vector made by :meth:`flat_copy` that is no longer needed."""
        if self.pool is not None:
            self.pool.give(vector)

    def discard(self, record: StepRecord) -> None:
        """Release the vectors of a record that will not be appended (a skipped step)."""
        self._release(record)

    def _drop_between_checkpoints(self, record: StepRecord) -> None:
        """Release, in place, what a step between checkpoints does not keep: parameters and
        optimizer state, and (without ``keep_gradients``) the gradient and context."""
        dropped = [record.theta, *record.state.values()]
        record.theta, record.state = None, {}
        if not self.keep_gradients:
            dropped.append(record.grad)
            record.grad, record.context = None, None
        for vector in dropped:
            self.release(vector)

    def _release(self, record: StepRecord) -> None:
        for vector in (record.theta, record.grad, *record.state.values()):
            self.release(vector)

    def _load(self, item: StepRecord | Path) -> StepRecord:
        if isinstance(item, StepRecord):
            return item
        return _from_payload(self._read(item), self.device)

    def drop_oldest(self, count: int) -> None:
        for _ in range(min(count, len(self._records))):
            item = self._records.popleft()
            step = _path_step(item) if isinstance(item, Path) else item.step
            self._extra_checkpoints.discard(step)
            self._without_theta.discard(step)
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
            else:
                self._release(item)

    def newest_first(self, recompute_step: RecomputeStep | None = None) -> Iterator[StepRecord]:
        """Records from newest to oldest, each with ``theta`` filled in.

        ``recompute_step(record) -> (grad, theta_next, state_next)`` re-runs one update from
        ``record.theta`` and ``record.state``; it is needed when ``checkpoint_every > 1``.
        Memory: one segment of ``checkpoint_every`` records at a time.
        """
        items = list(self._records)
        end = len(items)
        while end > 0:
            start = end - 1
            while start > 0 and self._load_meta_theta_missing(items[start]):
                start -= 1
            segment = [self._load(it) for it in items[start:end]]
            if segment[0].theta is None:
                raise RuntimeError(
                    f"step {segment[0].step} has no stored parameters to recompute from: the window starts "
                    "between checkpoints (use a window that is a multiple of checkpoint_every)"
                )
            for i in range(len(segment) - 1):
                if segment[i + 1].theta is None:
                    if recompute_step is None:
                        raise RuntimeError("checkpoint_every > 1 needs a recompute_step function")
                    grad, nxt, state = recompute_step(segment[i])
                    if segment[i].grad is None:
                        segment[i].grad, segment[i].grad_recomputed = grad, True
                    segment[i + 1].theta = nxt
                    segment[i + 1].state = state
            newest = segment[-1]
            if newest.grad is None and len(segment) > 1 and recompute_step is not None:
                # Recomputed from the step before: its own gradient is needed too (the step model's
                # linearisation of a stateful optimizer reads it).
                newest.grad, beyond, _ = recompute_step(newest)
                newest.grad_recomputed = True
                self.release(beyond)  # the step after the window is not needed
            yield from reversed(segment)
            # What was rebuilt is dropped again once the sweep has passed it: an online window outlives
            # its sweep, and would otherwise keep a parameter vector per step until the next one.
            for record in segment:
                if not self.keeps_theta(record.step):
                    self._drop_between_checkpoints(record)
            end = start

    def _load_meta_theta_missing(self, item: StepRecord | Path) -> bool:
        if isinstance(item, StepRecord):
            return item.theta is None
        return _path_step(item) in self._without_theta  # what the file was written with, not the current grid

    def close(self) -> None:
        """Free every record and pooled vector; delete spilled files (and the temporary folder
        this trajectory made)."""
        self.drop_oldest(len(self._records))
        self.pool = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _path_step(path: Path) -> int:
    """The step of a spilled record's file (``step-000000042.pt``)."""
    return int(path.stem.split("-")[1])


def _payload(record: StepRecord) -> dict[str, Any]:
    """A record as CPU tensors and primitives (what disk storage and checkpoints hold)."""
    return {
        "step": record.step,
        "batches": [_packed(b) for b in record.batches],
        "ids": [i.cpu() for i in record.ids],
        "normalizer": record.normalizer,
        "hyper": record.hyper.cpu(),
        "theta": None if record.theta is None else record.theta.detach().cpu(),
        "grad": None if record.grad is None else record.grad.detach().cpu(),
        "state": {k: v.detach().cpu() for k, v in record.state.items()},
        "context": None if record.context is None else record.context.cpu(),
        "global_ids": None if record.global_ids is None else [i.cpu() for i in record.global_ids],
        "varying": {k: v.detach().cpu() for k, v in record.varying.items()},
        "losses": _cpu_losses(record.losses),
        "running_counts": None if record.running_counts is None else record.running_counts.detach().cpu(),
        "running_momenta": None if record.running_momenta is None else list(record.running_momenta),
    }


def _packed(batch: Any) -> dict[str, Any]:
    layout, tensors = pack(batch)
    return {"layout": layout, "tensors": [t.detach().cpu() for t in tensors]}


def _unpacked(stored: Any, device: torch.device) -> Any:
    if isinstance(stored, dict) and set(stored) == {"layout", "tensors"}:
        return unpack(stored["layout"], [t.to(device) for t in stored["tensors"]])
    return to_device(stored, device)  # stored before batches were packed


def _cpu_losses(losses: tuple[Tensor | None, ...] | list[Tensor | None] | None) -> list[Tensor | None] | None:
    return None if losses is None else [None if x is None else x.detach().cpu() for x in losses]


def _from_payload(p: dict[str, Any], device: torch.device) -> StepRecord:
    def dev(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device)

    return StepRecord(
        step=int(p["step"]),
        batches=tuple(_unpacked(b, device) for b in p["batches"]),
        ids=tuple(p["ids"]),
        normalizer=int(p["normalizer"]),
        hyper=p["hyper"],
        theta=dev(p["theta"]),
        grad=dev(p["grad"]),
        state={k: v.to(device) for k, v in p["state"].items()},
        context=dev(p["context"]),
        global_ids=None if p.get("global_ids") is None else tuple(p["global_ids"]),
        varying={k: v.to(device) for k, v in p.get("varying", {}).items()},
        losses=None if p.get("losses") is None else tuple(None if x is None else x.to(device) for x in p["losses"]),
        running_counts=p.get("running_counts"),
        running_momenta=None if p.get("running_momenta") is None else tuple(p["running_momenta"]),
    )
