"""Hooks that the recording callbacks place on a fit: one call per optimizer step as it starts
(:class:`OptimizerStepWatch`), which micro-batches had a backward pass (:class:`BackwardWatch`),
ids that come back within one epoch (:class:`EpochRepeats`), a renumbered training subset
(:class:`SubsetNumbering`); and what a fit that took no step leaves behind (:func:`warn_no_step`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_influence.checks import dataset_length
from lightning_influence.optimizers import UnsupportedOptimizer, torch_optimizer


class BackwardWatch:
    """Whether a backward pass has accumulated a gradient into any of the watched parameters since
    the last :meth:`arm`: Lightning runs none for a micro-batch whose ``training_step`` returned
    ``None`` (its way of leaving a batch out), which the micro-batch's step must then leave out
    too. Hooks on the parameters (``register_post_accumulate_grad_hook``), so the answer does not
    depend on which callback hooks a subclass overrides; no device read. Watches nothing (and
    reports every backward as run) until :meth:`watch`, and again after :meth:`close`."""

    def __init__(self) -> None:
        self.ran = True
        self._handles: list[Any] = []

    def watch(self, params: Iterable[Tensor]) -> None:
        """Watch ``params`` (the trainable ones), in place of any watched before."""
        self.close()
        self._handles = [p.register_post_accumulate_grad_hook(self._seen) for p in params if p.requires_grad]

    def _seen(self, param: Tensor) -> None:
        self.ran = True

    def arm(self) -> None:
        """A micro-batch starts: no backward has run for it yet."""
        self.ran = not self._handles

    def take_skipped(self, micro_batches: list[Any]) -> Any | None:
        """Pop and return the last of ``micro_batches`` (the one :meth:`arm` was called for) if no
        backward has run for it; ``None`` otherwise."""
        if self.ran or not micro_batches:
            return None
        self.ran = True
        return micro_batches.pop()

    def close(self) -> None:
        """Remove the hooks (a fit that ended or failed leaves none on the parameters)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.ran = True


class OptimizerStepWatch:
    """Calls ``on_step(optimizer)`` once per ``optimizer.step``, right before the torch optimizer
    updates the parameters: after ``on_before_optimizer_step`` of every callback and of the
    LightningModule, after gradient clipping, so the learning rates and other hyperparameters it
    reads are the ones the step uses, and the gradients the final ones. A step that the gradient
    scaler skips calls nothing. Watches nothing until :meth:`watch`, and again after :meth:`close`.

    How: a step pre-hook on the torch optimizer behind Lightning's wrapper. Lightning passes
    ``optimizer.step`` a closure that runs the step's last ``training_step``, its backward, the
    ``on_before_optimizer_step`` hooks and the clipping, and the torch optimizer calls that closure
    inside ``step``, after its pre-hooks (32-true, 64-true, bf16-mixed): the pre-hook then wraps the
    closure so that ``on_step`` runs when it returns. Without a closure (16-mixed: Lightning runs it
    first and the gradient scaler calls ``step()`` bare), ``on_step`` runs in the pre-hook itself.

    ``carries_state`` (an owner that models the optimizer's state as each step leaves it for the
    next: DiffIn, the retraining recorder): each step also checks that the optimizer's state is
    the one the previous step left, the same tensors unmodified (their version counters; no device
    read), and refuses a state cleared, replaced or edited in place in between (a "restart" that
    resets momentum), naming the step."""

    def __init__(self, on_step: Callable[[torch.optim.Optimizer], None], owner: str, *, carries_state: bool = False) -> None:
        self._on_step = on_step
        self._owner = owner
        self._carries_state = carries_state
        self._handles: list[Any] = []
        self._left: dict[int, dict[str, Any]] | None = None  # the state as the last step left it
        self._steps = 0

    def watch(self, optimizer: Any) -> None:
        """Watch ``optimizer`` (a ``LightningOptimizer`` or a torch optimizer), in place of any watched before."""
        self.close()
        inner = torch_optimizer(optimizer, self._owner)
        try:
            self._handles = [inner.register_step_pre_hook(self._pre_step)]
            if self._carries_state:
                self._handles.append(inner.register_step_post_hook(self._post_step))
        except AttributeError as err:  # a subclass whose __init__ skipped torch.optim.Optimizer.__init__
            self.close()
            raise UnsupportedOptimizer(
                f"{self._owner} reads every step through torch.optim.Optimizer's step hooks, which "
                f"{type(inner).__qualname__} does not have ({err}: its __init__ does not call "
                "torch.optim.Optimizer.__init__, as some optimizer wrappers do). Use the optimizer it wraps"
            ) from None

    def _step_starts(self, optimizer: torch.optim.Optimizer) -> None:
        if self._left is not None:
            self._check_state(optimizer)
        self._on_step(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._left = _state_marks(optimizer)
        self._steps += 1

    def _check_state(self, optimizer: torch.optim.Optimizer) -> None:
        now = _state_marks(optimizer)
        if now == self._left:
            return
        assert self._left is not None
        shapes = {id(p): tuple(p.shape) for group in optimizer.param_groups for p in group["params"]}
        what = "the state was cleared" if not now else "the state was replaced"
        for key in [] if not now else sorted(set(self._left) | set(now), key=lambda k: k not in now):
            before, after = self._left.get(key), now.get(key)
            if before == after:
                continue
            shape = shapes.get(key, "?")
            if after is None:
                what = f"the state of a parameter of shape {shape} was removed"
            elif before is None:
                what = f"a parameter of shape {shape} got state of its own"
            else:
                changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
                what = f"the state {changed} of a parameter of shape {shape} was replaced or changed in place"
            break
        raise ValueError(
            f"{self._owner}: the optimizer's state changed between optimizer steps {self._steps - 1} and {self._steps} "
            f"of this fit, outside optimizer.step ({what}: e.g. optimizer.state.clear() or momentum buffers reset "
            f"for a restart, or a state loaded mid-fit). {self._owner} takes the state each step starts from to be "
            "the one the previous step left, so every step before the change would be mis-scored. Keep the "
            "optimizer's state for the whole fit, or train each phase in a fit of its own (configure_optimizers "
            "builds a fresh optimizer for each fit)"
        )

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # torch passes the hook step's own arguments: (optimizer, closure?) and keyword arguments
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._step_starts(optimizer)
            return None

        def closure_then_step(*closure_args: Any, **closure_kwargs: Any) -> Any:
            result = closure(*closure_args, **closure_kwargs)
            self._step_starts(optimizer)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_step}
        return (args[0], closure_then_step, *args[2:]), kwargs

    def close(self) -> None:
        """Remove the hooks (a fit that ended or failed leaves none on the optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._left, self._steps = [], None, 0


def _state_marks(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """The optimizer's state, per parameter (by ``id``) and name, as marks that change when it
    changes: a tensor's identity and version counter (bumped by every in-place change), any other
    value itself. Host-only."""
    return {
        id(p): {name: (id(v), v._version) if isinstance(v, Tensor) else v for name, v in state.items()}
        for p, state in optimizer.state.items()
    }


def draws_each_sample_once(trainer: L.Trainer) -> str | None:
    """The name of the training loader's sampler if it is one that yields every sample of the
    dataset at most once per epoch (``SequentialSampler``, ``RandomSampler`` without replacement
    or a smaller ``num_samples``, a ``DistributedSampler`` of the dataset, behind a plain
    ``BatchSampler``); ``None`` for anything else (custom or weighted samplers, iterable datasets),
    whose repeats may be meant."""
    from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = loader.batch_sampler.sampler
    if type(sampler) is DistributedSampler:
        return "DistributedSampler"
    if type(sampler) is SequentialSampler:
        return "SequentialSampler"
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples <= len(sampler.data_source):  # type: ignore[arg-type]
        return "RandomSampler"
    wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's DistributedSamplerWrapper
    if wrapped is not None and type(wrapped) in (SequentialSampler, RandomSampler) and not getattr(wrapped, "replacement", False):
        return f"{type(wrapped).__name__} (distributed)"
    return None


class EpochRepeats:
    """Sample ids that come back within one epoch, counted on the device (one ``index_add`` per
    micro-batch, no host read) and read once at the epoch's end: with a sampler that yields each
    sample once an epoch (:func:`draws_each_sample_once`), a repeat means the ids are not
    positions in the training dataset (e.g. positions within the batch, ``0..b-1``), so that
    different samples would share one score; warned about once a fit. Ids outside
    ``[0, N)`` are left to the id checks."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._counts: Tensor | None = None
        self._sampler: str | None = None
        self._warned = False

    def reset(self) -> None:
        """A fit starts: warn again."""
        self._counts, self._warned = None, False

    def start(self, trainer: L.Trainer, device: torch.device) -> None:
        """An epoch starts: count its ids if its sampler yields each sample once."""
        self._sampler = draws_each_sample_once(trainer)
        size = dataset_length(trainer) if self._sampler is not None and not self._warned else None
        self._counts = torch.zeros(size, dtype=torch.int32, device=device) if size else None

    def add(self, ids: Tensor) -> None:
        if self._counts is None:
            return
        ids = ids.reshape(-1).to(self._counts.device, torch.long)
        size = self._counts.numel()
        inside = (ids >= 0) & (ids < size)
        self._counts.index_add_(0, ids.clamp(0, size - 1), inside.to(torch.int32))

    def end(self, epoch: int) -> None:
        """The epoch ends: read the count (one host read) and warn on a repeat, once a fit."""
        counts, self._counts = self._counts, None
        if counts is None:
            return
        repeats, distinct = int((counts - 1).clamp(min=0).sum()), int((counts > 0).sum())
        if repeats and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{self.owner}: {repeats} sample id(s) came back within epoch {epoch} ({distinct} distinct ids) although "
                f"the training sampler ({self._sampler}) yields each sample once an epoch: the ids are probably not "
                "positions in the training dataset (positions within the batch, 0..b-1, are the usual mistake), and then "
                "different samples share one score. sample_ids(batch) must return each sample's position in the "
                "training dataset (IndexedDataset adds it to every item). Warned once"
            )


def warn_no_step(owner: str, save_path: Path | None) -> bool:
    """Warn that a fit took no optimizer step (its scores are empty), and return whether its empty result
    should leave earlier scores alone: a score file already at ``save_path`` and the module's ``influence``
    (a fit called again on a Trainer that has reached ``max_epochs`` trains nothing, and must not erase
    the first fit's scores)."""
    keep = save_path is not None and save_path.exists()
    rank_zero_warn(
        f"{owner} scored no sample: the fit took no optimizer step (max_steps=0, limit_train_batches=0, an empty "
        "training loader, every batch skipped, or Trainer.fit called again on a Trainer that already reached its "
        "max_epochs/max_steps). The callback's scores are empty; scores the module's influence already held are kept"
        + (f", and so is {save_path}" if keep else "")
    )
    return keep


class SubsetNumbering:
    """Refuses, at the epoch that shows it, a training ``IndexedDataset`` that numbers a
    ``torch.utils.data.Subset`` whose indices changed since the previous epoch (a curriculum reloaded with
    ``reload_dataloaders_every_n_epochs``) other than at its end: its ids are positions in the subset, so
    one id would name different samples in different epochs and their scores would merge (a subset that
    only grows or shrinks at its end keeps them). ``Subset(IndexedDataset(data), indices)`` keeps the ids
    positions in the whole dataset."""

    def __init__(self) -> None:
        self._indices: Tensor | None = None
        self._source: Any = None  # the indices object last read (unchanged: not read again)

    def reset(self) -> None:
        """A fit starts."""
        self._indices, self._source = None, None

    def check(self, trainer: L.Trainer, owner: str) -> None:
        """At each epoch's start, once Lightning has (re)loaded the training loader."""
        from lightning_influence.data import IndexedDataset

        dataset = getattr(trainer.train_dataloader, "dataset", None)
        inner = dataset.dataset if isinstance(dataset, IndexedDataset) else None
        if not isinstance(inner, torch.utils.data.Subset):
            self._indices = None
            return
        if inner.indices is self._source:
            return
        source = inner.indices
        indices = torch.as_tensor(source if isinstance(source, Tensor) else list(source), dtype=torch.long).reshape(-1)
        previous, self._indices, self._source = self._indices, indices, source
        common = min(len(indices), len(previous)) if previous is not None else 0
        # a subset that grows or shrinks at its end (a curriculum over a fixed order) keeps every id's sample
        if previous is not None and not torch.equal(previous[:common], indices[:common]):
            raise ValueError(
                f"{owner}: the training dataset is IndexedDataset(Subset(data, indices)) and the subset's indices changed "
                f"at epoch {trainer.current_epoch} (a reloaded training loader): its sample ids are positions in the subset, "
                "so one id would name different samples in different epochs and their scores would merge. Number the whole "
                "dataset instead: Subset(IndexedDataset(data), indices), or a SubsetRandomSampler over IndexedDataset(data)"
            )
