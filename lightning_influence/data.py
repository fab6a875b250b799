"""Datasets whose items carry their index, and the embedded default data (scikit-learn digits)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_influence.mixin import SAMPLE_ID_KEY


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item ``i`` carries ``i`` as its sample id.

    Dict items gain the key ``"index"``; tuple/list items gain ``i`` as their last element;
    any other item ``x`` becomes ``(x, i)``.
    """

    def __init__(self, dataset: Dataset, key: str = SAMPLE_ID_KEY) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"IndexedDataset needs a map-style dataset with __getitem__ and __len__, got {type(dataset).__name__}")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if self.key in item:
                raise KeyError(f"dataset items already have a {self.key!r} key; pass another key to IndexedDataset")
            return {**item, self.key: index}
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)


def load_digits_tensors(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, shipped inside its wheel): features scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded digits data needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=dtype) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    return x, y


class DigitsDataModule(L.LightningDataModule):
    """Digits split into train/val/test with a fixed seed; train and val items carry their index.

    ``label_noise`` flips that fraction of training labels uniformly to another class; the
    flipped ids are in :attr:`flipped_ids`.
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_size: int = 300,
        test_size: int = 297,
        label_noise: float = 0.0,
        seed: int = 0,
        dtype: str = "float32",
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
        self.batch_size, self.val_size, self.test_size = batch_size, val_size, test_size
        self.label_noise, self.seed, self.shuffle = label_noise, seed, shuffle
        self.dtype = getattr(torch, dtype)
        self.flipped_ids = torch.empty(0, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        x, y = load_digits_tensors(self.dtype)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(x), generator=g)
        n_train = len(x) - self.val_size - self.test_size
        if n_train <= 0:
            raise ValueError(f"val_size + test_size = {self.val_size + self.test_size} leaves no training data out of {len(x)}")
        tr, va, te = perm[:n_train], perm[n_train : n_train + self.val_size], perm[n_train + self.val_size :]
        y_train = y[tr].clone()
        n_flip = int(round(self.label_noise * n_train))
        if n_flip:
            self.flipped_ids = torch.randperm(n_train, generator=g)[:n_flip].sort().values
            shift = torch.randint(1, 10, (n_flip,), generator=g)
            y_train[self.flipped_ids] = (y_train[self.flipped_ids] + shift) % 10
        self.train_set = IndexedDataset(TensorDataset(x[tr], y_train))
        self.val_set = IndexedDataset(TensorDataset(x[va], y[va]))
        self.test_set = IndexedDataset(TensorDataset(x[te], y[te]))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class FixedBatches:
    """A fixed sequence of batches usable as a Lightning loader (a plain list would be read as
    several loaders). Every epoch yields the same batches in the same order, which makes a run
    exactly reproducible for leave-one-out retraining.

    Resumable: ``state_dict()`` holds the position within the current pass and
    ``load_state_dict`` makes the next pass start there, so Lightning can resume mid-epoch
    without re-serving batches."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = list(batches)
        self._position = 0
        self._start = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        start, self._start = self._start, 0
        self._position = start
        for batch in self.batches[start:]:
            self._position += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = int(state["position"]) % max(len(self.batches), 1)
