"""Datasets whose items carry their index, the embedded default data (scikit-learn digits), a
synthetic generator for large-N runs, and label noise to find again.

Label noise (``noise_kind``):

- ``"uniform"``: a flipped label moves to one of the other classes, uniformly at random.
- ``"class_conditional"``: a flipped label moves to its class's *confusable partner*
  (:data:`DIGITS_CONFUSABLE`: 1<->7, 3<->8, 4<->9, 5<->6, 0<->2 for digits; for other data
  :func:`confusable_classes`, the nearest other class mean). Such flips look plausible to the
  model, so their final loss is low and a per-sample-loss ranking finds them much less easily.
- ``"none"``: the data as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

NOISE_KINDS = ("uniform", "class_conditional", "none")

DIGITS_CONFUSABLE: dict[int, int] = {1: 7, 7: 1, 3: 8, 8: 3, 4: 9, 9: 4, 5: 6, 6: 5, 0: 2, 2: 0}
"""Confusable partner of each digit for class-conditional label flips: pairs of digits whose
handwritten shapes are commonly confused (1/7, 3/8, 4/9, 5/6, and 0/2 to pair the rest)."""

from lightning_influence.mixin import SAMPLE_ID_KEY
from lightning_influence.validation import check_seed


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item ``i`` carries ``i`` as its sample id.

    Dict items gain the key ``"index"``; tuple/list items gain ``i`` as their last element (a
    named tuple becomes a plain tuple, its fields in order: a named tuple has no room for another
    field, so read the batch by position, or make the items dicts); any other item ``x`` becomes
    ``(x, i)``.
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


def confusable_classes(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[int, int]:
    """Partner of each class for class-conditional flips: the class whose mean input is nearest
    (Euclidean) to its own mean. A class without samples maps to the next class."""
    flat = x.reshape(len(x), -1).double()
    means = torch.stack(
        [flat[y == c].mean(0) if bool((y == c).any()) else torch.full_like(flat[0], float("inf")) for c in range(num_classes)]
    )
    dist = torch.cdist(means, means).nan_to_num(float("inf"))
    dist.fill_diagonal_(float("inf"))
    return {c: (int(dist[c].argmin()) if torch.isfinite(dist[c]).any() else (c + 1) % num_classes) for c in range(num_classes)}


def flip_labels(
    y: torch.Tensor,
    fraction: float,
    kind: str,
    num_classes: int,
    generator: torch.Generator,
    partner: dict[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy labels, sorted flipped ids)``: ``round(fraction * len(y))`` positions drawn
    uniformly without replacement get a different label (``kind``: see the module docstring).
    Every flipped label differs from the original one."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {fraction}")
    if num_classes < 2:
        raise ValueError(f"label flips need at least 2 classes, got num_classes={num_classes}")
    y = y.clone()
    n_flip = int(round(fraction * len(y))) if kind != "none" else 0
    if n_flip == 0:
        return y, torch.empty(0, dtype=torch.long)
    ids = torch.randperm(len(y), generator=generator)[:n_flip].sort().values
    if kind == "uniform":
        shift = torch.randint(1, num_classes, (n_flip,), generator=generator)
        y[ids] = (y[ids] + shift) % num_classes
    else:
        if partner is None:
            raise ValueError("class_conditional flips need the partner map of each class")
        bad = [c for c, p in partner.items() if c == p]
        if bad:
            raise ValueError(f"class_conditional partner map sends classes {bad} to themselves")
        y[ids] = torch.as_tensor([partner[int(c)] for c in y[ids].tolist()], dtype=y.dtype)
    return y, ids


class DigitsDataModule(L.LightningDataModule):
    """Digits split into train/val/test with a fixed seed; train and val items carry their index.

    ``label_noise`` flips that fraction of training labels (``noise_kind``: ``"uniform"`` to
    another class, ``"class_conditional"`` to the digit's confusable partner
    :data:`DIGITS_CONFUSABLE`, ``"none"``: no flips); the flipped ids are in :attr:`flipped_ids`
    and the original labels in :attr:`clean_labels`. ``noise_seed`` (default ``seed``) draws the
    flips.
    """

    num_classes = 10
    num_features = 64  # 8 x 8 images, flattened

    def __init__(
        self,
        batch_size: int = 32,
        val_size: int = 300,
        test_size: int = 297,
        label_noise: float = 0.0,
        seed: int = 0,
        dtype: str = "float32",
        shuffle: bool = True,
        noise_kind: str = "uniform",
        noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
        if noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {noise_kind!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_seed("seed", seed)
        check_seed("noise_seed", noise_seed, none_ok=True)
        self.batch_size, self.val_size, self.test_size = batch_size, val_size, test_size
        self.label_noise, self.seed, self.shuffle = label_noise, seed, shuffle
        self.noise_kind, self.noise_seed = noise_kind, noise_seed
        self.dtype = getattr(torch, dtype)
        self.flipped_ids = torch.empty(0, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        x, y = self._tensors()
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(x), generator=g)
        n_train = len(x) - self.val_size - self.test_size
        if n_train <= 0:
            raise ValueError(f"val_size + test_size = {self.val_size + self.test_size} leaves no training data out of {len(x)}")
        tr, va, te = perm[:n_train], perm[n_train : n_train + self.val_size], perm[n_train + self.val_size :]
        self.clean_labels = y[tr].clone()
        # The uniform flips with noise_seed unset draw from the split's generator, as before.
        noise_g = g if self.noise_seed is None else torch.Generator().manual_seed(self.noise_seed)
        partner = self._partner(x[tr], self.clean_labels) if self.noise_kind == "class_conditional" else None
        y_train, self.flipped_ids = flip_labels(
            self.clean_labels, self.label_noise, self.noise_kind, self.num_classes, noise_g, partner=partner
        )
        self.train_set = IndexedDataset(TensorDataset(x[tr], y_train))
        self.val_set = IndexedDataset(TensorDataset(x[va], y[va]))
        self.test_set = IndexedDataset(TensorDataset(x[te], y[te]))

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples ``(x[N, ...], y[N])`` before the split."""
        return load_digits_tensors(self.dtype)

    def _partner(self, x: torch.Tensor, y: torch.Tensor) -> dict[int, int]:
        """Confusable partner of each class for class-conditional flips."""
        return dict(DIGITS_CONFUSABLE)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class SyntheticDataModule(DigitsDataModule):
    """Gaussian classes for large-N runs, generated from ``seed`` (no download, any size).

    ``num_samples`` points in ``num_features`` dimensions, ``num_classes`` classes with equal
    probability; class means are random unit vectors scaled by ``separation``, and each point is
    its class mean plus standard normal noise. Split, label noise and loaders work as in
    :class:`DigitsDataModule`; class-conditional flips go to the nearest other class mean
    (:func:`confusable_classes`). Memory: ``4 * num_samples * num_features`` bytes in float32.
    """

    def __init__(
        self,
        num_samples: int = 100_000,
        num_features: int = 64,
        num_classes: int = 10,
        separation: float = 3.0,
        batch_size: int = 256,
        val_size: int = 2000,
        test_size: int = 2000,
        label_noise: float = 0.0,
        seed: int = 0,
        dtype: str = "float32",
        shuffle: bool = True,
        noise_kind: str = "uniform",
        noise_seed: int | None = None,
    ) -> None:
        if num_samples < 1 or num_features < 1 or num_classes < 2:
            raise ValueError(
                f"need num_samples >= 1, num_features >= 1, num_classes >= 2; got {num_samples}, {num_features}, {num_classes}"
            )
        if separation <= 0:
            raise ValueError(f"separation must be positive, got {separation}")
        super().__init__(batch_size, val_size, test_size, label_noise, seed, dtype, shuffle, noise_kind, noise_seed)
        self.num_samples, self.num_features, self.separation = num_samples, num_features, separation
        self.num_classes = num_classes  # instance attribute shadows the digits' class constant

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + 7919)  # independent of the split's stream
        means = torch.randn(self.num_classes, self.num_features, generator=g, dtype=torch.float64)
        means = self.separation * means / means.norm(dim=1, keepdim=True)
        y = torch.randint(0, self.num_classes, (self.num_samples,), generator=g)
        x = means[y] + torch.randn(self.num_samples, self.num_features, generator=g, dtype=torch.float64)
        return x.to(self.dtype), y

    def _partner(self, x: torch.Tensor, y: torch.Tensor) -> dict[int, int]:
        return confusable_classes(x, y, self.num_classes)


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
        self.started_at = 0
        """The position the latest pass started at (``load_state_dict`` sets it for the next pass)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        start, self._start = self._start, 0
        self._position = self.started_at = start
        for batch in self.batches[start:]:
            self._position += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = int(state["position"]) % max(len(self.batches), 1)
