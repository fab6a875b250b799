"""The coreset recipe: keep a fraction of the training data by score, retrain, measure.

1. Train with the estimator attached and score every training sample (default target:
   ``train``, the mean training loss -- Diff-In's self influence; the baselines ``el2n``,
   ``grand``, ``forgetting`` and ``random`` ignore the target).
2. Keep ``round(recipe.fraction * N)`` samples with the **highest** scores: the samples whose
   removal would raise the target loss most (Diff-In), the hardest ones (EL2N, GraNd,
   forgetting), any (random). With ``recipe.class_balanced`` every class keeps the same
   fraction of its own samples. Ties are broken by sample id.
3. Retrain on the coreset with a fresh seeded Trainer per seed of ``recipe.seeds`` and report
   the test metric (``recipe.metric``) as mean and spread.

A sweep over fraction x method x seed is ``experiment=coreset_sweep`` (a Hydra multirun);
:mod:`lightning_influence.recipes.aggregate` turns its directory into the accuracy-vs-fraction
table and plot. Writes ``scores.pt``, ``scores.csv``, ``report.json``, ``config.yaml`` and
(``recipe.plots``) ``score_histogram.png`` into the run directory (global rank zero only).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from lightning_influence.config import CoresetConfig, estimator_params, recipe_params
from lightning_influence.recipes.common import (
    fit_and_score,
    harmonise_precision,
    is_global_zero,
    labels_of,
    metric_of,
    preflight,
    prepare,
    retrain_fresh,
    summary,
    train_dataset,
    versions,
    write_outputs,
)

__all__ = ["run", "select_coreset"]


def select_coreset(ids: torch.Tensor, column: torch.Tensor, fraction: float, labels: list[int | None] | None = None) -> torch.Tensor:
    """Sorted ids of the kept samples: the ``round(fraction * N)`` highest scores (at least one),
    or, with ``labels``, the ``round(fraction * N_c)`` highest of each class ``c`` (at least one
    per class)."""
    if labels is None:
        keep = max(1, round(fraction * len(ids)))
        order = torch.argsort(column, descending=True, stable=True)
        return ids[order[:keep]].sort().values
    if any(y is None for y in labels):
        raise ValueError("class_balanced needs a class label for every training sample (items (x, y, index) or dicts with 'label')")
    y = torch.tensor(labels, dtype=torch.long)
    chosen = []
    for c in y.unique().tolist():
        members = (y == c).nonzero().reshape(-1)
        keep = max(1, round(fraction * len(members)))
        order = torch.argsort(column[members], descending=True, stable=True)
        chosen.append(ids[members[order[:keep]]])
    return torch.cat(chosen).sort().values


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the coreset recipe on the composed config; returns the report (also in ``report.json``)."""
    cfg = harmonise_precision(cfg)  # data.dtype and trainer.precision agree, or a clear error
    params: CoresetConfig = recipe_params(cfg.recipe, CoresetConfig)
    est = estimator_params(cfg.estimator)
    out = prepare(cfg, params.plots)
    target = params.target.value
    checked = preflight(cfg, out, params.metric, target, params.target_samples)
    scored = fit_and_score(cfg, out, target, params.target_samples, datamodule=checked.datamodule)
    dm, ids, column = scored.datamodule, scored.ids, scored.column
    dataset = train_dataset(dm)
    n_train = len(dataset)
    labels = labels_of(dataset, ids.tolist()) if params.class_balanced else None
    kept = select_coreset(ids, column, params.fraction, labels)

    retrain_cfg = cfg
    if params.budget == "steps" and cfg.trainer.get("max_epochs") is not None:
        retrain_cfg = cfg.copy()
        with open_dict(retrain_cfg):
            retrain_cfg.trainer.max_epochs = math.ceil(int(cfg.trainer.max_epochs) * n_train / max(int(kept.numel()), 1))
    accuracies = []
    for seed in params.seeds:
        metrics = retrain_fresh(retrain_cfg, dm, kept, seed, out / "retraining")
        accuracies.append(metric_of(metrics, params.metric))
    acc = summary(accuracies)
    kept_labels = Counter(y for y in labels_of(dataset, kept.tolist()) if y is not None)
    flipped_ids = getattr(dm, "flipped_ids", None)
    flipped_kept = int(torch.isin(kept, torch.as_tensor(flipped_ids, dtype=torch.long)).sum()) if flipped_ids is not None else None

    report: dict[str, Any] = {
        "recipe": "coreset",
        "estimator": {"name": est.name, "options": est.options},
        "method": est.name,
        "target": target,
        "higher_means": scored.scores.metadata.get("higher_means", "helps the target more (keep)"),
        "score_metadata": scored.scores.metadata,
        "fraction": params.fraction,
        "class_balanced": params.class_balanced,
        "budget": params.budget,
        "retrain_max_epochs": retrain_cfg.trainer.get("max_epochs"),
        "num_train_samples": n_train,
        "num_scored": len(ids),
        "num_kept": int(kept.numel()),
        "kept_per_class": {str(k): v for k, v in sorted(kept_labels.items())},
        "flipped_kept": flipped_kept,
        "fit_seconds": round(scored.fit_seconds, 3),
        "score_seconds": round(scored.score_seconds, 3),
        "seeds": list(params.seeds),
        "metric": params.metric,
        params.metric: acc,
        "summary": [
            {"recipe": "coreset", "method": est.name, "fraction": params.fraction, "seed": int(cfg.seed), "metric": params.metric, "accuracy": acc["mean"]}
        ],
        "files": {"scores": "scores.pt", "csv": "scores.csv", "report": "report.json", "config": "config.yaml"},
        "versions": versions(),
    }
    if is_global_zero():
        if params.plots:
            from lightning_influence import plots

            plots.score_histogram(out / "score_histogram.png", column, torch.isin(ids, kept), xlabel="score (higher = keep)", title=f"{est.name} scores", names=("removed", "kept"))
            report["files"]["score_histogram"] = "score_histogram.png"
        write_outputs(out, cfg, report, scored.scores)
        print(
            f"\nCoreset by {est.name} (target {target}): kept {kept.numel()} of {n_train} "
            f"(fraction {params.fraction:g}{', class-balanced' if params.class_balanced else ''}); "
            f"{params.metric} {acc['mean']:.4f} +- {acc['std']:.4f} over {acc['n']} seed(s)",
            flush=True,
        )
    return report
