"""Pieces every recipe shares: the scoring run (fit with the estimator, then score), fresh
retraining on a kept subset, the target loss, rank-zero file output and small statistics.

Sign and units: a score is the predicted change of the target loss when the sample is removed
from training (positive helps, negative hurts). Coreset baselines keep the direction: higher
means more worth keeping (their metadata says ``higher_means``).

Distributed runs (``trainer=ddp``): every process runs the whole recipe (fits, scoring and
retraining take part in the collectives); only global rank zero creates folders and writes
files, and the rank-zero-only code calls no collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_influence.config import estimator_params
from lightning_influence.estimators.base import Estimator, Target, build
from lightning_influence.scores import InfluenceScores, atomic_write_bytes

__all__ = [
    "ScoredRun",
    "is_global_zero",
    "output_dir",
    "prepare",
    "user_callbacks",
    "make_trainer",
    "fit_and_score",
    "make_target",
    "train_dataset",
    "labels_of",
    "subset_datamodule",
    "retrain_fresh",
    "model_target_loss",
    "target_batches",
    "final_loss_scores",
    "summary",
    "paired_difference",
    "write_outputs",
    "sample_rows",
    "versions",
]


def is_global_zero() -> bool:
    """Is this process global rank zero (``True`` outside distributed runs)?"""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` when set, else the Hydra run dir of the current job."""
    explicit = cfg.get("output_dir")
    if explicit is not None:
        return Path(str(explicit)).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("outside a Hydra run, set cfg.output_dir (e.g. the override output_dir=/some/dir)")


def prepare(cfg: DictConfig, plots: bool = False) -> Path:
    """The output folder (created on rank zero) after applying ``num_threads``; with ``plots``,
    fail before any training when matplotlib is missing."""
    if plots:
        from lightning_influence.plots import require_matplotlib

        require_matplotlib()
    out = output_dir(cfg)
    if is_global_zero():
        out.mkdir(parents=True, exist_ok=True)
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    return out


def user_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Fresh instances of the ``callbacks`` group: a mapping ``name -> _target_ node`` (or a list)."""
    node = cfg.get("callbacks")
    if node is None:
        return []
    items = list(node.values()) if isinstance(node, DictConfig) else list(node) if isinstance(node, ListConfig) else None
    if items is None:
        raise TypeError(f"callbacks must be a mapping or a list of _target_ nodes, got {type(node).__name__}")
    result = []
    for item in items:
        if item is None:
            continue
        callback = instantiate(item)
        if not isinstance(callback, L.Callback):
            raise TypeError(f"callbacks entry {OmegaConf.to_yaml(item).strip()!r} gave a {type(callback).__name__}, not a lightning Callback")
        result.append(callback)
    return result


def make_trainer(cfg: DictConfig, out: Path, extra: Sequence[L.Callback] = ()) -> L.Trainer:
    """A fresh Trainer from ``cfg.trainer`` with the user's callbacks plus ``extra``;
    ``default_root_dir`` is ``out`` unless the config sets it."""
    kwargs: dict[str, Any] = {"callbacks": [*user_callbacks(cfg), *extra]}
    if cfg.trainer.get("default_root_dir") is None:
        kwargs["default_root_dir"] = str(out)
    return instantiate(cfg.trainer, **kwargs)


def make_target(kind: str, datamodule: Any, sample_count: int | None = None, seed: int = 0) -> Target:
    """The :class:`Target` of a recipe: ``"val"`` (the datamodule's validation loader) or ``"train"``."""
    if kind == "val":
        return Target("val", datamodule.val_dataloader(), sample_count=sample_count, seed=seed)
    return Target("train", sample_count=sample_count, seed=seed)


def train_dataset(datamodule: Any) -> Any:
    """The training dataset (item ``i`` carries sample id ``i``; see :class:`~lightning_influence.IndexedDataset`)."""
    dataset = getattr(datamodule, "train_set", None)
    return dataset if dataset is not None else datamodule.train_dataloader().dataset


def labels_of(dataset: Any, ids: Iterable[int]) -> list[int | None]:
    """Class label of each sample: item ``(x, y, index)`` or ``{"label"|"labels"|"y"|"target": ...}``."""
    labels: list[int | None] = []
    for i in ids:
        item = dataset[int(i)]
        if isinstance(item, dict):
            y = next((item[k] for k in ("label", "labels", "y", "target") if k in item), None)
        elif isinstance(item, (tuple, list)) and len(item) >= 3:
            y = item[1]
        else:
            y = None
        labels.append(int(y) if y is not None and torch.as_tensor(y).numel() == 1 else None)
    return labels


@dataclass
class ScoredRun:
    """The scoring run: ``column`` holds one score per id of ``ids`` (a query target's columns summed)."""

    datamodule: Any
    model: L.LightningModule
    trainer: L.Trainer
    estimator: Estimator
    scores: InfluenceScores
    ids: Tensor
    column: Tensor
    fit_seconds: float
    score_seconds: float
    callbacks: list[L.Callback] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(train_dataset(self.datamodule))


def require_removal_scores(name: str, options: dict[str, Any], recipe: str) -> None:
    """Cleaning and deletion act on removal effects (lowest = most harmful): refuse, before any
    training, an estimator whose scores rank samples for a coreset instead."""
    if build(name, **options).ranks_for_keeping:
        raise ValueError(
            f"estimator {name!r} ranks samples for a coreset (higher = harder, more worth keeping, in its own units), "
            f"not by the effect of their removal: the {recipe} recipe would take its lowest scores, the easiest samples, "
            "for the most harmful. Use it with recipe=coreset, or here an influence estimator (diffin, tracin, ...), "
            "loss or outlier_gradient"
        )


def fit_and_score(
    cfg: DictConfig, out: Path, target_kind: str, target_samples: int | None = None, extra_callbacks: Sequence[L.Callback] = ()
) -> ScoredRun:
    """Seed, instantiate data / model / estimator, ``fit`` with the estimator's callback (and
    ``extra_callbacks``), then score every training sample for the ``target_kind`` target."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    params = estimator_params(cfg.estimator)
    estimator = build(params.name, **params.options)
    recording = estimator.callback()
    extra = [*([recording] if recording is not None else []), *extra_callbacks]
    trainer = make_trainer(cfg, out, extra)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    if hasattr(datamodule, "setup"):
        # Under ddp_spawn the datamodule was set up in the worker processes only; setup is idempotent.
        datamodule.setup("fit")
    start = time.perf_counter()
    target = make_target(target_kind, datamodule, target_samples, int(cfg.seed))
    scores = estimator.scores(model, datamodule.train_dataloader(), target)
    score_seconds = time.perf_counter() - start
    if len(scores) == 0:
        raise RuntimeError(f"estimator {params.name!r} scored no training sample (did fit run any training step?)")
    column = scores.values if scores.values.dim() == 1 else scores.values.sum(dim=1)
    if not bool(torch.isfinite(column).all()):
        raise FloatingPointError(f"estimator {params.name!r} returned non-finite scores: training diverged or the estimator failed")
    return ScoredRun(datamodule, model, trainer, estimator, scores, scores.ids, column, fit_seconds, score_seconds, extra)


# ---------------------------------------------------------------------- retraining
def subset_datamodule(base: Any, keep_ids: Sequence[int] | Tensor, seed: int) -> L.LightningDataModule:
    """A datamodule training on the samples ``keep_ids`` of ``base``'s training set (ids kept:
    items are taken from the same dataset), shuffled with ``seed``; validation and test loaders
    are ``base``'s. Sample id ``i`` must be position ``i`` of the training dataset, as with
    :class:`~lightning_influence.IndexedDataset`."""
    keep = [int(i) for i in (keep_ids.tolist() if isinstance(keep_ids, Tensor) else keep_ids)]
    if not keep:
        raise ValueError("retraining needs at least one kept sample")
    hooks = {"val_dataloader", "test_dataloader"}
    present = {h for h in hooks if is_overridden(h, base, L.LightningDataModule)}

    def setup(self: Any, stage: str | None = None) -> None:
        if hasattr(base, "setup"):
            base.setup(stage)

    def train_dataloader(self: Any) -> DataLoader:
        loader = base.train_dataloader()
        dataset = loader.dataset
        if max(keep) >= len(dataset) or min(keep) < 0:
            raise ValueError(f"kept sample ids reach {max(keep)}, beyond the training set of {len(dataset)} samples")
        return DataLoader(
            Subset(dataset, keep),
            batch_size=loader.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            drop_last=loader.drop_last,
            pin_memory=loader.pin_memory,
        )

    methods: dict[str, Any] = {
        "setup": setup,
        "train_dataloader": train_dataloader,
        # The class is made here, so pickling (ddp_spawn sends the datamodule to its workers)
        # rebuilds the instance through this function instead of looking the class up by name.
        "__reduce__": lambda self: (subset_datamodule, (base, keep, seed)),
    }
    for hook in present:
        methods[hook] = lambda self, _h=hook: getattr(base, _h)()
    cls = type(f"Subset{type(base).__name__}", (L.LightningDataModule,), methods)
    return cls()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer info lines (devices, tips, "fit stopped") off for the many
    retraining runs; warnings still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def retrain_fresh(
    cfg: DictConfig,
    datamodule: Any,
    keep_ids: Sequence[int] | Tensor,
    seed: int,
    out: Path,
    target_loaders: dict[str, Iterable[Any]] | None = None,
) -> dict[str, float]:
    """A fresh, seeded Trainer run of ``cfg.model`` on ``keep_ids`` (the same trainer config and
    user callbacks, no estimator). Returns the logged validation and test metrics (``test_*``
    from ``trainer.test`` when the datamodule has a test loader) and, for each entry of
    ``target_loaders``, ``target_loss/<name>``: the mean per-sample loss over that loader."""
    L.seed_everything(int(seed), workers=True, verbose=False)
    model = instantiate(cfg.model)
    data = subset_datamodule(datamodule, keep_ids, int(seed))
    with quiet_lightning():
        trainer = make_trainer(cfg, out)
        trainer.fit(model, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if is_overridden("test_dataloader", data, L.LightningDataModule):
            results = trainer.test(model, datamodule=data, verbose=False)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    for name, loader in (target_loaders or {}).items():
        metrics[f"target_loss/{name}"] = model_target_loss(model, loader)
    return metrics


def metric_of(metrics: dict[str, float], name: str) -> float:
    """``metrics[name]`` with a clear error naming what was logged."""
    if name not in metrics:
        raise KeyError(f"the retrained model logged no {name!r}; logged: {sorted(metrics)}. Set recipe.metric to one of them")
    return metrics[name]


def target_batches(kind: str, datamodule: Any) -> list[Any]:
    """The batches of the target: the validation loader, or the whole training set in order."""
    if kind == "val":
        return list(datamodule.val_dataloader())
    loader = datamodule.train_dataloader()
    return list(DataLoader(loader.dataset, batch_size=max(loader.batch_size or 1, 256), shuffle=False, collate_fn=loader.collate_fn))


def model_target_loss(model: L.LightningModule, batches: Iterable[Any]) -> float:
    """Mean per-sample loss of ``model`` over ``batches`` (evaluation mode; units of the loss)."""
    from lightning_influence.evaluation.retraining import target_loss

    device = next(model.parameters()).device
    moved = [model.transfer_batch_to_device(b, device, 0) for b in batches]
    return float(target_loss(model, dict(model.named_parameters()), moved))


@torch.no_grad()
def final_loss_scores(run: ScoredRun) -> Tensor:
    """The plain final-loss ranking, aligned with ``run.ids``: minus each sample's training loss
    at the final parameters (the lowest = the highest loss = the most suspicious)."""
    try:
        scores = build("loss", progress=False).scores(run.model, run.datamodule.train_dataloader(), "train")
        lookup = scores.to_dict()
        return torch.tensor([lookup[int(i)] for i in run.ids.tolist()], dtype=torch.float64)
    except (ImportError, KeyError, AttributeError):
        pass
    dataset = train_dataset(run.datamodule)
    model = run.model
    was_training = model.training
    model.eval()
    losses = []
    device = next(model.parameters()).device
    for batch in DataLoader(Subset(dataset, run.ids.tolist()), batch_size=512):
        batch = model.transfer_batch_to_device(batch, device, 0)
        losses.append(model.per_sample_loss(batch).detach().to("cpu", torch.float64))
    model.train(was_training)
    return -torch.cat(losses)


# ---------------------------------------------------------------------- statistics
def summary(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, sample standard deviation ``std`` (0 for one value), ``min``, ``max``, ``n``, ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": n, "values": xs}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """:func:`summary` of ``a[s] - b[s]`` over paired seeds ``s``."""
    return summary([x - y for x, y in zip(a, b, strict=True)])


# ---------------------------------------------------------------------- output
def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__}


def sample_rows(dataset: Any, ids: Tensor, values: Tensor, flipped: set[int] | None = None) -> list[dict[str, Any]]:
    """Report rows ``{id, score, label, flipped}`` for the given samples."""
    labels = labels_of(dataset, ids.tolist())
    return [
        {"id": int(i), "score": float(v), "label": y, "flipped": (int(i) in flipped) if flipped is not None else None}
        for i, v, y in zip(ids.tolist(), values.tolist(), labels, strict=True)
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.value
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_outputs(out: Path, cfg: DictConfig, report: dict[str, Any], scores: InfluenceScores | None) -> None:
    """On global rank zero: ``scores.pt`` (+ ``scores.csv``), ``config.yaml`` and ``report.json``, each atomically."""
    if not is_global_zero():
        return
    if scores is not None:
        scores.save(out / "scores.pt")
        scores.to_csv(out / "scores.csv")
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    text = json.dumps(_finite(report), indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write_bytes(out / "report.json", text.encode())
