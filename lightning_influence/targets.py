"""Targets: the scalar (or per-query) losses whose change under sample removal is scored.

- ``"train"``: mean per-sample loss over the training loader (self / empirical-risk influence).
- ``"val"``: mean per-sample loss over a validation loader (the trainer's, or one given).
- ``"query"``: the loss of each of Q query samples separately (one score column per query).

Gradients are taken at given flat parameters with the module in evaluation mode, in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_influence.kernels import ParameterSpace, PerSampleLossFn

TargetKind = Literal["train", "val", "query"]
TARGET_KINDS: tuple[str, ...] = ("train", "val", "query")


@dataclass
class TargetGradient:
    """Computes ``grad F(theta)``: ``Tensor[P]`` for train/val, ``Tensor[P, Q]`` for query.

    ``batches`` yields target batches already on the module's device. With ``sample_count``, only
    a fixed random subset of that many target samples (drawn once with ``seed``) enters ``F``:
    chosen by sample id when ``sample_ids`` is given (needed for shuffled loaders such as the
    training loader), else by position in loader order.
    """

    kind: TargetKind
    batches: Callable[[], Iterable[Any]]
    sample_count: int | None = None
    seed: int = 0
    sample_ids: Callable[[Any], Tensor] | None = None
    subset: Tensor | None = None

    def _resolve_subset(self) -> None:
        if self.sample_count is None or self.subset is not None:
            return
        if self.sample_ids is not None:
            pool = torch.cat([self.sample_ids(b).reshape(-1).cpu() for b in self.batches()]).unique()
        else:
            pool = torch.arange(sum(self._batch_size(b) for b in self.batches()))
        if self.sample_count > pool.numel():
            raise ValueError(f"target_samples={self.sample_count} exceeds the {pool.numel()} samples of the {self.kind} target loader")
        g = torch.Generator().manual_seed(self.seed)
        self.subset = pool[torch.randperm(pool.numel(), generator=g)[: self.sample_count]].sort().values

    def __call__(self, loss_fn: PerSampleLossFn, space: ParameterSpace, theta: Tensor) -> Tensor:
        self._resolve_subset()
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
                keep = self._keep(batch, position, losses.shape[0], losses.device)
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
            return torch.stack(columns, dim=1)
        if count == 0:
            raise ValueError(f"the {self.kind} target loader produced no samples: the target loss is undefined")
        return total / count

    def _keep(self, batch: Any, start: int, size: int, device: torch.device) -> Tensor | None:
        if self.subset is None:
            return None
        if self.sample_ids is not None:
            ids = self.sample_ids(batch).reshape(-1).cpu()
            return torch.isin(ids, self.subset).nonzero().reshape(-1).to(device)
        sel = self.subset[(self.subset >= start) & (self.subset < start + size)] - start
        return sel.to(device)

    @staticmethod
    def _batch_size(batch: Any) -> int:
        leaves = torch.utils._pytree.tree_leaves(batch)
        for leaf in leaves:
            if isinstance(leaf, Tensor) and leaf.dim() > 0:
                return int(leaf.shape[0])
        raise ValueError("cannot tell the size of a target batch: it holds no tensor with a batch dimension")
