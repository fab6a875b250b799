"""Targets: the scalar (or per-query) losses whose change under sample removal is scored.

- ``"train"``: mean per-sample loss over the training loader (self / empirical-risk influence).
- ``"val"``: mean per-sample loss over a validation loader (the trainer's, or one given).
- ``"query"``: the loss of each of Q query samples separately (one score column per query).

Gradients are taken at given flat parameters with the module in evaluation mode, in float64.

Distributed (DDP) runs: Lightning shards its own training and validation loaders with a
``DistributedSampler``. The target is still the mean over the whole target set: each rank sums
its shard (leaving out the copies the sampler repeats to pad the epoch) and the sums and counts
are reduced across ranks; a ``target_samples`` subset is drawn from the global pool (sample ids,
or global positions in loader order), as in a single process. A loader without a
``DistributedSampler`` (e.g. a ``target_loader`` or query loader) is read whole on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler, Subset, SubsetRandomSampler

from lightning.pytorch.utilities import rank_zero_warn

from lightning_influence.distributed import Collective
from lightning_influence.batches import samples_in
from lightning_influence.kernels import ParameterSpace, PerSampleLossFn

Shard = tuple[int, int, int]
"""``(rank, num_replicas, num_samples)`` of a loader's ``DistributedSampler`` (see
:func:`lightning_influence.distributed.distributed_shard`)."""

TargetKind = Literal["train", "val", "query"]
TARGET_KINDS: tuple[str, ...] = ("train", "val", "query")


@dataclass
class TargetGradient:
    """Computes ``grad F(theta)``: ``Tensor[P]`` for train/val, ``Tensor[P, Q]`` for query.

    ``batches`` yields target batches already on the module's device. With ``sample_count``, only
    a fixed random subset of that many target samples (drawn once with ``seed``) enters ``F``:
    chosen by sample id when ``sample_ids`` is given (needed for shuffled loaders such as the
    training loader), else by position in loader order.

    ``collective`` and ``shard`` (distributed runs): ``shard()`` tells whether the target loader
    is sharded across the ranks of ``collective`` (then sums, counts and the subset's pool are
    reduced across ranks, and the sampler's padding copies are left out); an unsharded loader is
    read whole on every rank, and the ranks' results are checked to agree.
    """

    kind: TargetKind
    batches: Callable[[], Iterable[Any]]
    sample_count: int | None = None
    seed: int = 0
    sample_ids: Callable[[Any], Tensor] | None = None
    subset: Tensor | None = None
    collective: Collective | None = None
    shard: Callable[[], Shard | None] | None = None
    batch_ids: Callable[[Any], Tensor] | None = None
    """Reads a batch's sample ids to count its samples (:func:`~lightning_influence.batches.samples_in`;
    the module's ``sample_ids``, where a batch's first tensor is not per sample); ``None``: the
    leading dimension of the first tensor."""

    def _shard(self) -> Shard | None:
        distributed = self.collective is not None and self.collective.distributed
        return self.shard() if distributed and self.shard is not None else None

    def sample_positions(self) -> list[int]:
        """The position (in loader order, from 0) of every sample that enters the target, in the order
        of a query target's score columns: ``0 .. Q-1`` for the whole loader, the sorted
        ``sample_count`` subset otherwise. Reads only the batches' sizes (and, for a subset drawn by
        sample id, their ids)."""
        self._resolve_subset()
        positions: list[int] = []
        position = 0
        for batch in self.batches():
            size = self._batch_size(batch)
            keep = self._keep(batch, position, size, torch.device("cpu"))
            positions += [position + i for i in (range(size) if keep is None else keep.tolist())]
            position += size
        return positions

    def _resolve_subset(self, shard: Shard | None = None) -> None:
        if self.sample_count is None or self.subset is not None:
            return
        if shard is not None and self.collective is not None:
            if self.sample_ids is not None:
                local, position = [], 0
                for b in self.batches():
                    ids = self.sample_ids(b).reshape(-1).cpu()
                    local.append(ids[self._unpadded(shard, position, ids.numel())])
                    position += ids.numel()
                mine = torch.cat(local) if local else torch.zeros(0, dtype=torch.long)
                pool = torch.cat(self.collective.gather_ragged(mine.long())).unique()
            else:
                pool = torch.arange(shard[2])
        elif self.sample_ids is not None:
            pool = torch.cat([self.sample_ids(b).reshape(-1).cpu() for b in self.batches()]).unique()
        else:
            pool = torch.arange(sum(self._batch_size(b) for b in self.batches()))
        if self.sample_count > pool.numel():
            raise ValueError(f"target_samples={self.sample_count} exceeds the {pool.numel()} samples of the {self.kind} target loader")
        g = torch.Generator().manual_seed(self.seed)
        self.subset = pool[torch.randperm(pool.numel(), generator=g)[: self.sample_count]].sort().values

    def __call__(self, loss_fn: PerSampleLossFn, space: ParameterSpace, theta: Tensor) -> Tensor:
        shard = self._shard()
        if shard is not None and self.kind == "query":
            raise ValueError(
                "the query target loader is sharded by a DistributedSampler: every rank needs every query sample. "
                "Pass a query loader without a DistributedSampler (e.g. a plain DataLoader or list of batches)"
            )
        self._resolve_subset(shard)
        leaves = {n: p.detach().requires_grad_(True) for n, p in space.unflatten(theta).items()}
        params = list(leaves.values())
        columns: list[Tensor] = []
        total = torch.zeros(space.size, dtype=torch.float64, device=theta.device)
        count = 0
        position = 0
        with torch.enable_grad():
            for batch in self.batches():
                losses = loss_fn(leaves, batch)
                if losses.dim() != 1:
                    raise ValueError(f"per_sample_loss returned shape {tuple(losses.shape)} on a target batch; expected [B]")
                keep = (
                    self._keep(batch, position, losses.shape[0], losses.device)
                    if shard is None
                    else self._keep_shard(batch, shard, position, losses.shape[0], losses.device)
                )
                position += losses.shape[0]
                if keep is not None:
                    losses = losses[keep]
                if losses.numel() == 0:
                    continue
                if self.kind == "query":
                    for i in range(losses.shape[0]):
                        g = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < losses.shape[0], allow_unused=True)
                        columns.append(space.flatten(list(g), torch.float64))
                else:
                    g = torch.autograd.grad(losses.sum(), params, allow_unused=True)
                    total += space.flatten(list(g), torch.float64)
                    count += losses.shape[0]
        if self.kind == "query":
            if not columns:
                raise ValueError("the query loader produced no samples")
            return self._agreed(torch.stack(columns, dim=1))
        if shard is not None and self.collective is not None:  # the mean over every rank's shard
            reduced = self.collective.sum(torch.cat([total, total.new_tensor([count])]))
            total, count = reduced[:-1], int(round(float(reduced[-1])))
        if count == 0:
            raise ValueError(f"the {self.kind} target loader produced no samples: the target loss is undefined")
        return total / count if shard is not None else self._agreed(total / count)

    def _agreed(self, gradient: Tensor) -> Tensor:
        """An unsharded target read on every rank must give every rank the same gradient: a loader
        that serves each rank other data (without a ``DistributedSampler``) is refused."""
        if self.collective is None or not self.collective.distributed:
            return gradient
        summary = torch.stack([gradient.sum(), gradient.abs().sum()]).to(torch.float64)
        gathered = torch.stack(self.collective.gather(summary))
        spread = (gathered - gathered[0]).abs().max()
        if not bool(spread <= 1e-6 * (1.0 + float(gathered[0].abs().max()))):
            raise ValueError(
                f"the {self.kind} target gradient differs between ranks: the target loader serves each rank other "
                "samples without a DistributedSampler, so the target would differ per rank. Give every rank the whole "
                "target set, or shard it with torch.utils.data.DistributedSampler"
            )
        return gradient

    @staticmethod
    def _unpadded(shard: Shard, start: int, size: int) -> Tensor:
        """Mask of the local samples ``start .. start + size - 1`` that are not padding copies."""
        rank, replicas, total = shard
        return rank + torch.arange(start, start + size) * replicas < total

    def _keep_shard(self, batch: Any, shard: Shard, start: int, size: int, device: torch.device) -> Tensor:
        mask = self._unpadded(shard, start, size)
        if self.subset is not None:
            if self.sample_ids is not None:
                mask &= torch.isin(self.sample_ids(batch).reshape(-1).cpu(), self.subset)
            else:
                rank, replicas, _ = shard
                mask &= torch.isin(rank + torch.arange(start, start + size) * replicas, self.subset)
        return mask.nonzero().reshape(-1).to(device)

    def _keep(self, batch: Any, start: int, size: int, device: torch.device) -> Tensor | None:
        if self.subset is None:
            return None
        if self.sample_ids is not None:
            ids = self.sample_ids(batch).reshape(-1).cpu()
            return torch.isin(ids, self.subset).nonzero().reshape(-1).to(device)
        sel = self.subset[(self.subset >= start) & (self.subset < start + size)] - start
        return sel.to(device)

    def _batch_size(self, batch: Any) -> int:
        return samples_in(batch, self.batch_ids, "target batch")


class FitStartLoader:
    """The trainer's validation loader as a target: the loader of the first read in a fit, kept for
    the whole fit, so that every step (online sweeps, TracIn, the replay at the end of fit) is scored
    against one target loss. ``trainer_loader()`` returns the trainer's loader as it is now, or
    ``None`` before Lightning has set one up (then ``fallback()`` supplies it: e.g. the module's
    ``val_dataloader()``). When the trainer's loader later is another object over another dataset
    (``reload_dataloaders_every_n_epochs`` with a ``val_dataloader()`` that serves other data per
    epoch), the target stays the first one, with one warning that says so and how to pin another
    (a new loader over the same dataset object is not warned about).
    One instance per fit; reads no device value."""

    def __init__(self, trainer_loader: Callable[[], Any], fallback: Callable[[], Any], owner: str) -> None:
        self._trainer_loader = trainer_loader
        self._fallback = fallback
        self._owner = owner
        self._pinned: Any = None
        self._reference: Any = None  # the trainer's loader the pinned one was compared with
        self._has_pinned = self._warned = False

    def __call__(self) -> Any:
        current = self._trainer_loader()
        if not self._has_pinned:
            self._pinned = current if current is not None else self._fallback()
            self._has_pinned = True
            self._reference = current
        elif current is not None:
            if self._reference is None:
                self._reference = current  # the trainer set its loader up after the first read
            elif current is not self._reference and not self._warned and not _same_dataset(current, self._reference):
                self._warned = True
                rank_zero_warn(
                    f"{self._owner}(target='val'): the trainer's validation loader changed during fit (a reload: "
                    "reload_dataloaders_every_n_epochs, with a val_dataloader() that returns another loader). The target "
                    "stays the validation loader as of the first read in this fit, so that every step is scored against "
                    f"one target loss. To score against another loader, pin it with {self._owner}(target_loader=...)"
                )
        return self._pinned


def _same_dataset(loader: Any, other: Any) -> bool:
    """Whether two loaders read the same dataset object, drawing as many samples (a reload that rebuilds
    the loader only; a sampler over another subset of the same dataset draws other samples)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or dataset is not getattr(other, "dataset", None):
        return False
    samplers = (getattr(loader, "sampler", None), getattr(other, "sampler", None))
    if type(samplers[0]) is not type(samplers[1]):
        return False
    indices = [getattr(sampler, "indices", None) for sampler in samplers]  # SubsetRandomSampler
    if indices[0] is not None and list(indices[0]) != list(indices[1]):  # type: ignore[arg-type]
        return False
    return True


def _read_in_order(loader: DataLoader) -> tuple[Any, Any, bool]:
    """``(dataset, sampler, shuffles)`` of a map-style ``DataLoader``: the samples it draws from (a
    ``Subset`` for a ``SubsetRandomSampler``, also inside Lightning's distributed wrapper), its
    outermost sampler, and whether that draws them in a random order."""
    outer = getattr(loader.batch_sampler, "sampler", None)  # a custom batch sampler may have none
    outer = loader.sampler if outer is None else outer
    inner = getattr(getattr(outer, "dataset", None), "_sampler", None)  # Lightning's DistributedSamplerWrapper
    user = inner if inner is not None else outer
    dataset = loader.dataset
    if isinstance(user, SubsetRandomSampler):
        return Subset(dataset, sorted(int(i) for i in user.indices)), outer, True
    if isinstance(user, RandomSampler) and not user.replacement and user.num_samples == len(dataset):  # type: ignore[arg-type]
        return dataset, outer, True
    return dataset, outer, isinstance(user, DistributedSampler) and bool(user.shuffle)


def in_order(loader: Any, *, world_size: int = 1, rank: int = 0, always: bool = False) -> Iterable[Any]:
    """``loader`` (a map-style ``DataLoader``) read in order: same batch size, collate function and
    workers; a ``SubsetRandomSampler``'s indices sorted, any other sampler's whole dataset. Every
    pass then sees the same samples in the same order: query columns and ``target_samples`` subsets
    are by position, and online sweeps (and resumes) read a target again.

    A loader sharded by a ``DistributedSampler`` (Lightning's, under DDP) stays sharded the same way,
    without shuffling. ``always`` (the training set as a target): rebuild even a loader that does
    not shuffle, without ``drop_last``, sharded over ``world_size`` ranks when above 1, so that every
    training sample counts once whatever the sampler draws (with replacement, weighted, a
    shuffled last partial batch dropped). Otherwise only a shuffling loader is rebuilt; a
    :class:`~lightning_influence.data.FixedBatches` is read as the list of its batches (its
    position, which Lightning checkpoints to resume mid-epoch, is left alone); other
    loaders and iterables are returned as they are."""
    from lightning_influence.data import FixedBatches

    if isinstance(loader, FixedBatches):
        return list(loader.batches)  # a pass of its own: the loader's position (its resume state) stays
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    dataset, outer, shuffles = _read_in_order(loader)
    if not (shuffles or always):
        return loader
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 64
    drop_last = False if always else loader.drop_last
    sampler: Any
    if isinstance(outer, DistributedSampler):
        sampler = DistributedSampler(dataset, num_replicas=outer.num_replicas, rank=outer.rank, shuffle=False, drop_last=outer.drop_last and not always)
    elif always and world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
