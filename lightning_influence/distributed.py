"""Collective operations for distributed (DDP) runs, as no-ops in a single process.

Under Lightning's DDP strategies every rank trains on its own shard of each global batch and
DDP averages the ranks' gradients before the optimizer step. Influence bookkeeping then needs
a few reductions across ranks: sums of flat vectors (target gradients, Hessian products),
the sample ids of each global batch, per-sample score sums, and small Python objects
(checkpoint state). :class:`Collective` wraps them around ``torch.distributed`` on the
strategy's root device (CPU tensors for gloo, CUDA tensors for NCCL).

Every rank must call the same collectives in the same order: callers make every branch that
decides whether a collective runs depend on global quantities only (the results of earlier
collectives, or values that are identical on every rank, such as DDP's averaged gradient).
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = ["Collective", "distributed_shard", "is_global_zero", "rank_zero_buffers"]


def is_global_zero() -> bool:
    """Is this process global rank zero? Reads Lightning's ``rank_zero_only.rank``, which its
    strategies set in every process of a distributed run (from the launcher's environment
    before the process group exists); ``True`` outside distributed runs. Unlike
    ``trainer.is_global_zero`` it needs no Trainer, so code that runs before or between fits
    (creating output folders, writing reports) can ask it."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


class Collective:
    """Collectives over the ranks of one training run (``world_size == 1``: every method is the
    identity, and no ``torch.distributed`` call is made).

    ``device``: where the communicated tensors live (the strategy's root device: gloo reduces CPU
    tensors, NCCL CUDA tensors). Inputs on another device are copied there and results are
    returned on the input's device.
    """

    def __init__(self, world_size: int = 1, rank: int = 0, device: torch.device | str = "cpu") -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"a Collective over {world_size} ranks needs an initialised torch.distributed process group "
                "(Lightning's DDP strategy creates it before setup)"
            )
        self.world_size = world_size
        self.rank = rank
        self.device = torch.device(device)

    @classmethod
    def from_trainer(cls, trainer: Any) -> Collective:
        """The trainer's ranks (a single-process no-op unless the strategy runs several processes)."""
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world == 1:
            return cls()
        destroy_process_group_at_exit()
        return cls(world, int(trainer.global_rank), trainer.strategy.root_device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ tensors
    def _on_device(self, tensor: Tensor) -> Tensor:
        return tensor.detach().to(self.device).contiguous().clone()

    def sum(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over ranks (a new tensor on the input's device and dtype)."""
        if not self.distributed:
            return tensor
        work = self._on_device(tensor)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def mean(self, tensor: Tensor) -> Tensor:
        """Elementwise mean over ranks: what DDP does to gradients."""
        if not self.distributed:
            return tensor
        return self.sum(tensor).div_(self.world_size)

    def max(self, tensor: Tensor) -> Tensor:
        if not self.distributed:
            return tensor
        work = self._on_device(tensor)
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return work.to(tensor.device)

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``tensor`` on every rank (same shape and dtype on every rank; a new tensor on
        the input's device; the input itself in one process)."""
        if not self.distributed:
            return tensor
        work = self._on_device(tensor)
        dist.broadcast(work, src=src)
        return work.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on some rank."""
        if not self.distributed:
            return flag
        return bool(self.max(torch.tensor([int(flag)], dtype=torch.int64)).item())

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order."""
        if not self.distributed:
            return [tensor]
        work = self._on_device(tensor)
        out = [torch.empty_like(work) for _ in range(self.world_size)]
        dist.all_gather(out, work)
        return [t.to(tensor.device) for t in out]

    def gather_ragged(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` whose first dimension may differ between ranks (the others
        must agree), in rank order. Two collectives: the lengths, then the padded tensors."""
        if not self.distributed:
            return [tensor]
        length = torch.tensor([tensor.shape[0]], dtype=torch.int64)
        lengths = [int(n) for n in self.gather(length)]
        longest = max(lengths)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        return [t[:n] for t, n in zip(self.gather(padded), lengths, strict=True)]

    # ------------------------------------------------------------------ objects
    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj`` (tensors on the CPU), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


@contextlib.contextmanager
def rank_zero_buffers(module: torch.nn.Module, collective: Collective) -> Iterator[None]:
    """Within the context every buffer of ``module`` holds rank zero's values, restored on exit (a no-op in
    one process). The ranks' buffers differ between training steps by each rank's own batch-norm updates
    (DDP broadcasts rank zero's before each step's forward, or never with ``broadcast_buffers=False``),
    and rank zero's module is the one saved: a sweep evaluates that network on every rank."""
    if not collective.distributed:
        yield
        return
    kept: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for buffer in module.buffers():
            kept.append((buffer, buffer.detach().clone()))
            buffer.copy_(collective.broadcast(buffer))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


_EXIT_HOOK_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when this process exits (registered once per process).

    Lightning does this for NCCL only. A gloo group left to the interpreter's teardown keeps its
    communication threads alive while C++ destroys them, which can abort the process ("terminate
    called without an active exception", SIGABRT) after a run that finished correctly: a
    ``ddp_spawn`` worker dying that way fails the whole ``fit``."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        _EXIT_HOOK_REGISTERED = True
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distributed_shard(loader: Any) -> tuple[int, int, int] | None:
    """``(rank, num_replicas, num_samples)`` of the ``DistributedSampler`` that shards ``loader``
    (Lightning injects one into the DataLoaders of a DDP run), else ``None``.

    Such a sampler lays the epoch's indices out as one list of ``total_size`` entries (the
    ``num_samples`` dataset positions, padded by repeating the first ones when the number of
    ranks does not divide it) and gives rank ``r`` the entries ``r, r + R, r + 2R, ...``: the
    ``j``-th sample this rank yields is entry ``r + j R``, a padding copy when that is
    ``>= num_samples``. ``drop_last=True`` samplers truncate instead (no copies).
    """
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    for sampler in samplers:
        if isinstance(sampler, DistributedSampler):
            total = len(sampler.dataset)  # type: ignore[arg-type]
            if sampler.drop_last:
                total = min(total, sampler.num_samples * sampler.num_replicas)
            return int(sampler.rank), int(sampler.num_replicas), int(total)
    return None
