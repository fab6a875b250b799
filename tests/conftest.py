"""Shared fixtures: reproducible digits runs (float64, a fixed batch list) and a quiet Trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch

from lightning_influence.data import FixedBatches, load_digits_tensors

# Tiny models: a thread pool only adds overhead, and oversubscribes the 2-core CI machine.
torch.set_num_threads(1)


@dataclass
class DigitsProblem:
    """``train``: a fixed sequence of ``(x, y, id)`` batches over ``epochs`` reshuffled epochs;
    ``val``: the validation batches; ``n``: number of training samples (ids ``0..n-1``)."""

    train: FixedBatches
    val: FixedBatches
    n: int
    x: torch.Tensor
    y: torch.Tensor


def digits_problem(n: int = 1024, batch_size: int = 32, epochs: int = 8, val_size: int = 300, seed: int = 0) -> DigitsProblem:
    x, y = load_digits_tensors(torch.float64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:n], perm[n : n + val_size]
    X, Y = x[tr], y[tr]
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        batches += [(X[order[i : i + batch_size]], Y[order[i : i + batch_size]], order[i : i + batch_size]) for i in range(0, n, batch_size)]
    val = [(x[va[i : i + 100]], y[va[i : i + 100]], torch.arange(i, min(i + 100, val_size))) for i in range(0, val_size, 100)]
    return DigitsProblem(FixedBatches(batches), FixedBatches(val), n, X, Y)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="session")
def small_digits() -> DigitsProblem:
    """256 samples, batch 16, 3 epochs (48 steps): quick behaviour tests."""
    return digits_problem(n=256, batch_size=16, epochs=3, val_size=200)
