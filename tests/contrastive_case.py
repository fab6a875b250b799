"""A small CLIP-like problem shared by the contrastive tests and ``examples/contrastive_pruning.py``.

Paired synthetic data: each pair ``(x_a, x_b)`` comes from one latent vector ``u`` seen through two
fixed random linear "modalities" plus noise; a chosen fraction of pairs is *mismatched* (``x_b`` is
made from another, independent latent), the noisy pairs a pruning method should find. Two small
encoders (linear, or one hidden layer) map each side to unit-norm embeddings; the loss is CLIP's
symmetric InfoNCE with in-batch negatives and a fixed temperature, so every pair's loss depends on
the other pairs of its batch (``coupled_batch_loss = True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_influence.data import FixedBatches
from lightning_influence.mixin import InfluenceMixin


@dataclass
class PairedData:
    """``x_a[N, dim_a]``, ``x_b[N, dim_b]``; ``mismatched[N]``: True for the noisy pairs."""

    x_a: Tensor
    x_b: Tensor
    mismatched: Tensor

    def __len__(self) -> int:
        return int(self.x_a.shape[0])


@dataclass
class Modalities:
    """The fixed generative maps of the two sides: ``x = u @ A + noise * eps``."""

    a: Tensor
    b: Tensor
    noise: float

    @classmethod
    def make(cls, latent: int = 8, dim_a: int = 16, dim_b: int = 12, noise: float = 0.3, seed: int = 0) -> Modalities:
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(latent, dim_a, generator=g, dtype=torch.float64) / latent**0.5
        b = torch.randn(latent, dim_b, generator=g, dtype=torch.float64) / latent**0.5
        return cls(a, b, noise)

    def sample(self, n: int, mismatch: float = 0.0, seed: int = 1, dtype: torch.dtype = torch.float64) -> PairedData:
        """``n`` pairs, a fraction ``mismatch`` of them with ``x_b`` from an unrelated latent."""
        g = torch.Generator().manual_seed(seed)
        latent = self.a.shape[0]
        u = torch.randn(n, latent, generator=g, dtype=torch.float64)
        other = torch.randn(n, latent, generator=g, dtype=torch.float64)
        bad = torch.zeros(n, dtype=torch.bool)
        bad[torch.randperm(n, generator=g)[: int(round(mismatch * n))]] = True
        u_b = torch.where(bad.unsqueeze(1), other, u)
        x_a = u @ self.a + self.noise * torch.randn(n, self.a.shape[1], generator=g, dtype=torch.float64)
        x_b = u_b @ self.b + self.noise * torch.randn(n, self.b.shape[1], generator=g, dtype=torch.float64)
        return PairedData(x_a.to(dtype), x_b.to(dtype), bad)


def fixed_batches(data: PairedData, batch_size: int, epochs: int, seed: int = 0, ids: Tensor | None = None) -> FixedBatches:
    """``epochs`` reshuffled passes of ``(x_a, x_b, id)`` batches (the last one of a pass may be smaller)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    ids = torch.arange(n) if ids is None else ids
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            o = order[i : i + batch_size]
            batches.append((data.x_a[o], data.x_b[o], ids[o]))
    return FixedBatches(batches)


def _encoder(dim_in: int, hidden: int | None, embed: int) -> nn.Module:
    if hidden is None:
        return nn.Linear(dim_in, embed)
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.Tanh(), nn.Linear(hidden, embed))


class PairEncoder(InfluenceMixin, L.LightningModule):
    """Two encoders and CLIP's symmetric InfoNCE (fixed temperature) over in-batch negatives.

    ``per_sample_loss(batch)[i] = (CE(row i of S, i) + CE(column i of S, i)) / 2`` with the
    similarity matrix ``S = z_a z_b^T / temperature`` of the batch's unit-norm embeddings: its mean
    is the CLIP loss, and each term depends on the whole batch.
    """

    coupled_batch_loss = True

    def __init__(
        self,
        dim_a: int = 16,
        dim_b: int = 12,
        embed: int = 8,
        hidden: int | None = None,
        temperature: float = 0.2,
        lr: float = 0.1,
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder_a = _encoder(dim_a, hidden, embed)
        self.encoder_b = _encoder(dim_b, hidden, embed)
        self.temperature = temperature
        self.lr = lr
        self.momentum = momentum

    def embed(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.encoder_a(x_a), dim=-1), F.normalize(self.encoder_b(x_b), dim=-1)

    def per_sample_loss(self, batch: Any) -> Tensor:
        x_a, x_b = batch[0], batch[1]
        z_a, z_b = self.embed(x_a, x_b)
        logits = z_a @ z_b.T / self.temperature
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


@torch.no_grad()
def retrieval_accuracy(model: PairEncoder, data: PairedData, chunk: int = 4096) -> float:
    """Top-1 retrieval accuracy a -> b over all pairs of ``data`` (each ``x_a`` must pick its own
    ``x_b`` among all ``len(data)`` candidates)."""
    was = model.training
    model.eval()
    z_a, z_b = model.embed(data.x_a, data.x_b)
    hits = 0
    for i in range(0, len(data), chunk):
        best = (z_a[i : i + chunk] @ z_b.T).argmax(dim=1)
        hits += int((best == torch.arange(i, min(i + chunk, len(data)))).sum())
    model.train(was)
    return hits / len(data)
