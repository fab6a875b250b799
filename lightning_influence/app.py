"""The main job: train the configured model with the influence callback attached, then report
which training samples help and which hurt, and how well the harmful ranking finds flipped labels.

Run it with ``python -m lightning_influence [overrides]`` (Hydra) or call :func:`run` with a
composed config (``output_dir`` must then be set).

Sign and units: a score is the predicted change of the target loss (by default the mean
validation cross-entropy, in nats) when the sample is removed from training. Positive: the
sample helps. Negative: it hurts.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lightning_influence.scores import InfluenceScores, atomic_write_bytes

__all__ = ["run", "output_dir"]


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` when set, else the Hydra run dir of the current job."""
    explicit = cfg.get("output_dir")
    if explicit is not None:
        return Path(str(explicit)).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ValueError("outside a Hydra run, set cfg.output_dir (e.g. the override output_dir=/some/dir)")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Seed, instantiate the config groups, ``fit`` with the influence callback, write the results.

    Writes ``scores.pt`` (:meth:`InfluenceScores.save`), ``scores.csv`` and ``report.json`` into
    :func:`output_dir` and returns the report (also printed).
    """
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    top_k = int(cfg.get("top_k", 10))
    if cfg.get("num_threads") is not None:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    influence_kwargs: dict[str, Any] = {}
    if cfg.influence.get("save_path") is None:
        influence_kwargs["save_path"] = str(out / "scores.pt")
    callback = instantiate(cfg.influence, **influence_kwargs)
    trainer_kwargs: dict[str, Any] = {"callbacks": [callback]}
    if cfg.trainer.get("default_root_dir") is None:
        trainer_kwargs["default_root_dir"] = str(out)
    trainer = instantiate(cfg.trainer, **trainer_kwargs)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    scores: InfluenceScores | None = callback.scores
    if scores is None:
        raise RuntimeError("the influence callback produced no scores (did fit run any training step?)")
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    test_metrics: dict[str, float] = {}
    if hasattr(datamodule, "test_dataloader"):
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}

    # ---------------------------------------------------------------- labels and flips
    train_set = _train_set(datamodule)
    labels = _train_labels(train_set, scores.ids)
    flipped_ids = getattr(datamodule, "flipped_ids", None)
    flipped = (
        torch.isin(scores.ids, torch.as_tensor(flipped_ids, dtype=torch.long))
        if flipped_ids is not None
        else torch.zeros(len(scores), dtype=torch.bool)
    )
    column = scores.values if scores.values.dim() == 1 else scores.values.sum(dim=1)
    loss_baseline = _final_losses(model, train_set, scores.ids)

    def rows(ids: Tensor, values: Tensor) -> list[dict[str, Any]]:
        pos = {int(i): n for n, i in enumerate(scores.ids.tolist())}
        result = []
        for i, v in zip(ids.tolist(), values.tolist(), strict=True):
            label = labels[pos[i]] if labels is not None else None
            result.append({"id": int(i), "score": float(v), "label": label, "flipped": bool(flipped[pos[i]])})
        return result

    # Single target: InfluenceScores ranks it directly; several query columns: rank their sum.
    ranked = scores if scores.values.dim() == 1 else InfluenceScores(scores.ids, column, dict(scores.metadata))
    harmful = rows(*ranked.most_harmful(top_k))
    helpful = rows(*ranked.most_helpful(top_k))

    # ---------------------------------------------------------------- mislabel detection
    n_flipped = int(flipped.sum())
    detection: dict[str, Any] = {
        "num_flipped": n_flipped,
        "auroc": _auroc(-column, flipped),
        "loss_baseline_auroc": _auroc(loss_baseline, flipped) if loss_baseline is not None else None,
    }
    order = torch.argsort(column, stable=True)  # most harmful first
    for frac in (0.1, 0.2):
        k = max(1, round(frac * len(scores)))
        found = int(flipped[order[:k]].sum())
        detection[f"flipped_found_in_top_{int(frac * 100)}pct"] = found / n_flipped if n_flipped else None

    report: dict[str, Any] = {
        "output_dir": str(out),
        "sign_convention": scores.metadata.get("sign_convention"),
        "target": getattr(callback, "target", None),
        "mode": getattr(callback, "mode", None),
        "num_train_samples": len(train_set) if train_set is not None else None,
        "num_scored": len(scores),
        "num_positive": int((column > 0).sum()),
        "num_negative": int((column < 0).sum()),
        "score_sum": float(column.sum()),
        "score_min": float(column.min()) if len(scores) else None,
        "score_max": float(column.max()) if len(scores) else None,
        "steps": int(getattr(callback, "steps_seen", trainer.global_step)),
        "fit_seconds": round(fit_seconds, 3),
        "callback_seconds": round(float(callback.seconds), 3) if hasattr(callback, "seconds") else None,
        "val": val_metrics,
        "test": test_metrics,
        "mislabel_detection": detection,
        "most_harmful": harmful,
        "most_helpful": helpful,
        "files": {"scores": "scores.pt", "csv": "scores.csv", "report": "report.json", "config": "config.yaml"},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
    }

    # ---------------------------------------------------------------- files
    scores_path = out / "scores.pt"
    if getattr(callback, "save_path", None) is None or Path(callback.save_path).resolve() != scores_path:
        scores.save(scores_path)
    scores.to_csv(out / "scores.csv")
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    text = json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write_bytes(out / "report.json", text.encode())
    _print_report(report, top_k)
    return report


# -------------------------------------------------------------------- helpers
def _train_set(datamodule: Any) -> Any:
    train_set = getattr(datamodule, "train_set", None)
    if train_set is None:
        try:
            train_set = datamodule.train_dataloader().dataset
        except Exception:  # noqa: BLE001 - any datamodule shape is allowed; labels are then unknown
            return None
    return train_set


def _train_labels(train_set: Any, ids: Tensor) -> list[int | None] | None:
    """Label of each scored sample: item ``(x, y, index)`` or ``{"label"|"y"|"target": ...}``."""
    if train_set is None:
        return None
    labels: list[int | None] = []
    for i in ids.tolist():
        item = train_set[i]
        if isinstance(item, dict):
            y = next((item[k] for k in ("label", "labels", "y", "target") if k in item), None)
        elif isinstance(item, (tuple, list)) and len(item) >= 3:
            y = item[1]
        else:
            y = None
        labels.append(int(y) if y is not None and torch.as_tensor(y).numel() == 1 else None)
    return labels


@torch.no_grad()
def _final_losses(model: Any, train_set: Any, ids: Tensor) -> Tensor | None:
    """Per-sample training loss of the final model (the usual mislabel baseline), or ``None``."""
    if train_set is None or not hasattr(model, "per_sample_loss"):
        return None
    try:
        from torch.utils.data import DataLoader, Subset

        was_training = model.training
        model.eval()
        losses = []
        for batch in DataLoader(Subset(train_set, ids.tolist()), batch_size=512):
            batch = [b.to(model.device) if isinstance(b, Tensor) else b for b in batch]
            losses.append(model.per_sample_loss(batch).detach().to("cpu", torch.float64))
        model.train(was_training)
        return torch.cat(losses)
    except Exception:  # noqa: BLE001 - only a baseline; custom data layouts may not fit
        return None


def _auroc(detector: Tensor, positives: Tensor) -> float | None:
    """ROC-AUC of ``detector`` (higher = more likely positive); ``None`` without both classes."""
    if positives.all() or not positives.any():
        return None
    from torchmetrics.functional import auroc

    return float(auroc(detector.to(torch.float64), positives.long(), task="binary"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _print_report(report: dict[str, Any], top_k: int) -> None:
    lines = [
        "",
        f"Influence of {report['num_scored']} training samples on the {report['target']} loss "
        f"(DiffIn {report['mode']}, {report['steps']} SGD steps, fit {report['fit_seconds']:.1f}s, "
        f"callback {_fmt(report['callback_seconds'], '.1f')}s).",
        "Score = predicted change of the target loss when the sample is removed: positive helps, negative hurts.",
    ]
    for kind in ("harmful", "helpful"):
        title, key = f"{top_k} most {kind} training samples", f"most_{kind}"
        lines += ["", title + ":", f"  {'rank':>4}  {'id':>6}  {'score':>12}  {'label':>5}  flipped"]
        for rank, row in enumerate(report[key], 1):
            label = "?" if row["label"] is None else str(row["label"])
            flipped = "yes" if row["flipped"] else "no"
            lines.append(f"  {rank:>4}  {row['id']:>6}  {row['score']:>12.4e}  {label:>5}  {flipped}")
    det = report["mislabel_detection"]
    lines += [
        "",
        f"Flipped labels: {det['num_flipped']} of {report['num_scored']}.",
        f"ROC-AUC of the harmful ranking (-score) for flipped labels: {_fmt(det['auroc'])} "
        f"(final per-sample loss as detector: {_fmt(det['loss_baseline_auroc'])}).",
        f"Flipped labels found in the 10% / 20% most harmful: {_fmt(det['flipped_found_in_top_10pct'], '.1%')} / "
        f"{_fmt(det['flipped_found_in_top_20pct'], '.1%')}.",
    ]
    metrics = {**report["val"], **report["test"]}
    if metrics:
        lines.append("Model: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    lines.append(f"Wrote scores.pt, scores.csv, report.json to {report['output_dir']}")
    print("\n".join(lines), flush=True)
