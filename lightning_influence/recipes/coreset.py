"""The coreset recipe: keep a fraction of the training data by score, retrain, measure.

1. Train with the estimator attached and score every training sample (default target:
   ``train``, the mean training loss -- Diff-In's self influence; the baselines ``el2n``,
   ``grand``, ``forgetting`` and ``random`` ignore the target).
2. Keep ``round(recipe.fraction * N)`` samples with the **highest** scores: the samples whose
   removal would raise the target loss most (Diff-In), the hardest ones (EL2N, GraNd,
   forgetting), any (random). With ``recipe.class_balanced`` every class keeps the same
   fraction of its own samples. Ties are broken by sample id; NaN or infinite scores are
   refused after the scoring fit, before any selection. Where the scoring fit saw only
   part of the training set (``trainer.limit_train_batches``), the fraction is of the scored
   samples, the unscored ones are never kept: a warning and the report (``kept_fraction``, of
   the whole training set) say so.
3. Retrain on the coreset with a fresh seeded Trainer per seed of ``recipe.seeds`` and report
   the test metric (``recipe.metric``) as mean and spread. ``recipe.budget=steps`` retrains for
   as many optimizer steps as the scoring fit (``forgetting`` needs at least two epochs).

A sweep over fraction x method x seed is ``experiment=coreset_sweep`` (a Hydra multirun);
:mod:`lightning_influence.recipes.aggregate` turns its directory into the accuracy-vs-fraction
table and plot. Writes ``scores.pt``, ``scores.csv``, ``report.json``, ``config.yaml`` and
(``recipe.plots``) ``score_histogram.png`` into the run directory (global rank zero only).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from lightning_influence.config import CoresetConfig, EstimatorConfig
from lightning_influence.distributed import is_global_zero
from lightning_influence.estimators.base import estimator_class
from lightning_influence.estimators.coreset import Forgetting
from lightning_influence.recipes import common
from lightning_influence.recipes.common import Plan, RecipeRun, partly_scored, scored_run
from lightning_influence.recipes.outputs import versions, write_outputs
from lightning_influence.recipes.preflight import Preflight
from lightning_influence.recipes.retraining import metric_of, retrain_fresh, summary
from lightning_influence.recipes.scoring import ranking
from lightning_influence.recipes.trainers import runs_in_this_process
from lightning_influence.recipes.training_set import are_classes, class_labels, labels_of, train_dataset

__all__ = ["run", "select_coreset", "steps_per_epoch", "check_class_labels", "check_forgetting_epochs"]


#: How :func:`select_coreset` and the recipe refuse labels that are not classes.
_CLASS_BALANCED = "recipe.class_balanced=true"
_NOT_BALANCED = "Use recipe.class_balanced=false (the highest scores over the whole training set)"


def select_coreset(
    ids: torch.Tensor, column: torch.Tensor, fraction: float, labels: Sequence[int | float | None] | None = None
) -> torch.Tensor:
    """Sorted ids of the kept samples: the ``round(fraction * N)`` highest scores (at least one),
    or, with ``labels``, the ``round(fraction * N_c)`` highest of each class ``c`` (at least one
    per class). Labels must be classes (:func:`~lightning_influence.recipes.training_set.class_labels`:
    integers, or whole-number floats); a regression target is refused, not truncated into
    classes. NaN scores rank last (kept only when there are too few other samples), ties by
    position (the recipe itself refuses NaN scores)."""
    if labels is None:
        keep = max(1, round(fraction * len(ids)))
        order = ranking(column, descending=True)
        return ids[order[:keep]].sort().values
    y = torch.tensor(class_labels(labels, _CLASS_BALANCED, _NOT_BALANCED), dtype=torch.long)
    chosen = []
    for c in y.unique().tolist():
        members = (y == c).nonzero().reshape(-1)
        keep = max(1, round(fraction * len(members)))
        order = ranking(column[members], descending=True)
        chosen.append(ids[members[order[:keep]]])
    return torch.cat(chosen).sort().values


def check_class_labels(dataset: Any, num_train: int, seed: int = 0, sample: int = 256) -> None:
    """``recipe.class_balanced=true`` before the scoring fit: the labels of up to ``sample`` training
    items (the first, the last and random ones) must be classes
    (:func:`~lightning_influence.recipes.training_set.class_labels`); every label is checked
    again when the coreset is selected."""
    if num_train <= sample:
        positions = list(range(num_train))
    else:
        g = torch.Generator().manual_seed(int(seed))
        positions = sorted({0, num_train - 1, *torch.randint(0, num_train, (sample - 2,), generator=g).tolist()})
    class_labels(labels_of(dataset, positions), _CLASS_BALANCED, _NOT_BALANCED)


def steps_per_epoch(samples: int, loader: Any, trainer: DictConfig, world_size: int = 1) -> int | None:
    """Optimizer steps of one training epoch over ``samples`` samples read in batches like
    ``loader``'s (its ``batch_size`` and ``drop_last``: a partial last batch is a step of its
    own), split over ``world_size`` processes, under ``trainer``'s ``limit_train_batches`` and
    ``accumulate_grad_batches``. ``None`` when the loader has no ``batch_size`` (a batch sampler)."""
    batch = getattr(loader, "batch_size", None)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        return None
    per_process = math.ceil(samples / max(int(world_size), 1))
    batches = per_process // batch if getattr(loader, "drop_last", False) else math.ceil(per_process / batch)
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    accumulate = trainer.get("accumulate_grad_batches")
    accumulate = int(accumulate) if isinstance(accumulate, int) and not isinstance(accumulate, bool) and accumulate > 0 else 1
    return math.ceil(batches / accumulate)


def _configured_world_size(trainer: DictConfig) -> int | None:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 and isinstance(nodes, int) and nodes > 0:
        return devices * nodes
    return None


def _scoring_epochs(trainer: DictConfig, epoch_steps: int | None) -> int | None:
    """How many full epochs the scoring fit runs at most (``trainer.max_epochs``, or fewer where
    ``trainer.max_steps`` stops it earlier); ``None`` when that is not known before training."""
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    epochs = max_epochs if isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and max_epochs > 0 else None
    if isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0 and epoch_steps:
        by_steps = max_steps // epoch_steps
        epochs = by_steps if epochs is None else min(epochs, by_steps)
    return epochs


def check_forgetting_epochs(est_name: str, cfg: DictConfig, datamodule: Any = None, num_train: int | None = None) -> None:
    """Forgetting events need a sample presented at least twice: refuse, before the scoring fit, a
    Trainer config that runs fewer than two full epochs (``trainer.max_epochs``, or
    ``trainer.max_steps`` over the steps of an epoch): most scores would be 0, learned at the one
    presentation, or the never-learned value. Without the ``datamodule`` (the config-only check
    of every multirun job) only ``trainer.max_epochs`` is compared."""
    if not issubclass(estimator_class(est_name), Forgetting):
        return
    world = _configured_world_size(cfg.trainer)
    known = datamodule is not None and num_train is not None and world is not None
    epoch_steps = steps_per_epoch(num_train, datamodule.train_dataloader(), cfg.trainer, world) if known else None
    epochs = _scoring_epochs(cfg.trainer, epoch_steps)
    if epochs is not None and epochs < 2:
        setting = f"trainer.max_epochs={cfg.trainer.get('max_epochs')}, trainer.max_steps={cfg.trainer.get('max_steps')}"
        max_steps = cfg.trainer.get("max_steps")
        binding = isinstance(max_steps, int) and max_steps > 0 and epoch_steps and max_steps < 2 * epoch_steps
        steps = f" and trainer.max_steps to at least {2 * epoch_steps} (two epochs of {epoch_steps} steps)" if binding else ""
        raise ValueError(
            f"estimator {est_name!r} counts forgetting events (a sample classified correctly at one presentation and wrongly "
            f"at a later one), but the scoring fit runs {epochs} full epoch(s) ({setting}): most samples are presented once, so "
            "their score is 0 (learned) or the never-learned value, a ranking by one pass's correctness. Set trainer.max_epochs "
            f"to at least 2{steps} (the paper counts over the whole training run), or use el2n or grand for a short run"
        )


def _check_forgetting_config(cfg: DictConfig, params: CoresetConfig, est: EstimatorConfig) -> None:
    check_forgetting_epochs(est.name, cfg)  # trainer.max_epochs; with the data, max_steps too (in the trial)


def checked_settings(cfg: DictConfig) -> tuple[DictConfig, CoresetConfig, Any]:
    """The recipe's checks that need the config alone (run before any setup, and by a multirun
    for every job before the first): ``(cfg with precision and data dtype agreed, the recipe's
    parameters, the estimator's)``."""
    return common.checked_settings(cfg, CoresetConfig, _check_forgetting_config)


def _plan(cfg: DictConfig, params: CoresetConfig, est: EstimatorConfig) -> Plan:
    def check_epochs(trial: Preflight) -> None:
        check_forgetting_epochs(est.name, cfg, trial.datamodule, trial.num_train)
        if params.class_balanced:
            check_class_labels(train_dataset(trial.datamodule), trial.num_train, int(cfg.seed))

    return Plan(params.metric, params.target_samples, check_trial=check_epochs)


@dataclass
class _Budget:
    """The retraining's Trainer config (``recipe.budget=steps``: as many optimizer steps as the
    scoring fit) and the step counts it was derived from."""

    cfg: DictConfig
    full_steps: int | None
    kept_steps: int | None
    budget_steps: int | None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the coreset recipe on the composed config; returns the report (also in ``report.json``)."""
    state = scored_run(cfg, CoresetConfig, _plan, _check_forgetting_config)
    params, scored = state.params, state.scored
    _warn_if_forgetting_stopped_early(state)
    labels = labels_of(state.dataset, scored.ids.tolist()) if params.class_balanced else None
    kept = select_coreset(scored.ids, scored.column, params.fraction, labels)
    if state.num_scored < state.num_train:
        num_kept = int(kept.numel())
        warnings.warn(
            f"{partly_scored(state)}: the coreset keeps {num_kept}, fraction {params.fraction:g} of the scored samples, which is "
            f"{num_kept / state.num_train:.4g} of the training set; the {state.num_train - state.num_scored} unscored samples "
            "are never kept. Let the scoring fit see the whole training set for a fraction of all of it",
            UserWarning,
            stacklevel=2,
        )
    budget = _retraining_budget(state, int(kept.numel()))
    accuracies = []
    for seed in params.seeds:
        metrics = retrain_fresh(budget.cfg, scored.datamodule, kept, seed, state.out / "retraining")
        accuracies.append(metric_of(metrics, params.metric))
    acc = summary(accuracies)
    report = _report(state, kept, budget, acc)
    if is_global_zero():
        if params.plots:
            from lightning_influence import plots

            plots.score_histogram(
                state.out / "score_histogram.png", scored.column, torch.isin(scored.ids, kept), xlabel="score (higher = keep)",
                title=f"{state.est.name} scores", names=("removed", "kept"),
            )
            report["files"]["score_histogram"] = "score_histogram.png"
        write_outputs(state.out, state.cfg, report, scored.scores)
        _print(state, report, budget)
    return report


def _warn_if_forgetting_stopped_early(state: RecipeRun) -> None:
    trainer = state.scored.trainer
    if issubclass(estimator_class(state.est.name), Forgetting) and runs_in_this_process(trainer) and trainer.current_epoch < 2:
        warnings.warn(
            f"the scoring fit stopped after {trainer.current_epoch} epoch(s) (a callback or max_time): the forgetting "
            "scores count events over fewer than two presentations per sample and say little",
            UserWarning,
            stacklevel=3,
        )


def _retraining_budget(state: RecipeRun, num_kept: int) -> _Budget:
    """The steps of an epoch over the training set and over the coreset, refusing a coreset that
    makes no step; with ``recipe.budget=steps`` (and a positive ``trainer.max_epochs``), the
    retraining's ``trainer.max_epochs`` raised to as many optimizer steps as the scoring fit."""
    cfg, n_train = state.cfg, state.num_train
    loader = state.scored.datamodule.train_dataloader()
    world = max(int(getattr(state.scored.trainer, "world_size", 1) or 1), 1)
    full_steps = steps_per_epoch(n_train, loader, cfg.trainer, world)
    kept_steps = steps_per_epoch(num_kept, loader, cfg.trainer, world)
    if kept_steps == 0:
        raise ValueError(
            f"a coreset of {num_kept} samples makes no training step per epoch (batch size {loader.batch_size}, drop_last="
            f"{loader.drop_last}, trainer.limit_train_batches={cfg.trainer.get('limit_train_batches')}): the retrained "
            "models would be untrained. Raise recipe.fraction, or lower the batch size (or let the last partial batch train)"
        )
    budget = _Budget(cfg, full_steps, kept_steps, None)
    max_epochs = cfg.trainer.get("max_epochs")
    if state.params.budget == "steps" and isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and max_epochs > 0:
        # As many optimizer steps as the scoring fit: epochs over the coreset, each ceil(kept / batch) steps.
        if full_steps is not None and kept_steps is not None:
            budget.budget_steps = max_epochs * full_steps
            epochs = math.ceil(budget.budget_steps / kept_steps)
        else:  # no batch size to count steps with: scale by the number of samples
            epochs = math.ceil(max_epochs * n_train / max(num_kept, 1))
        budget.cfg = cfg.copy()
        with open_dict(budget.cfg):
            budget.cfg.trainer.max_epochs = epochs
    return budget


def _report(state: RecipeRun, kept: torch.Tensor, budget: _Budget, acc: dict[str, Any]) -> dict[str, Any]:
    cfg, params, est, scored, n_train = state.cfg, state.params, state.est, state.scored, state.num_train
    num_kept = int(kept.numel())
    kept_labels = [y for y in labels_of(state.dataset, kept.tolist()) if y is not None]
    # Per-class counts only for class labels: a regression target's values are no classes.
    per_class = Counter(int(y) for y in kept_labels) if are_classes(kept_labels) else None
    flipped_ids = getattr(scored.datamodule, "flipped_ids", None)
    flipped_kept = int(torch.isin(kept, torch.as_tensor(flipped_ids, dtype=torch.long)).sum()) if flipped_ids is not None else None
    return {
        "recipe": "coreset",
        "estimator": {"name": est.name, "options": est.options},
        "method": est.name,
        "target": params.target.value,
        "higher_means": scored.scores.metadata.get("higher_means", "helps the target more (keep)"),
        "score_metadata": scored.scores.metadata,
        "fraction": params.fraction,
        "class_balanced": params.class_balanced,
        "budget": params.budget,
        "retrain_max_epochs": budget.cfg.trainer.get("max_epochs"),
        "scoring_steps_per_epoch": budget.full_steps,
        "retrain_steps_per_epoch": budget.kept_steps,
        "budget_steps": budget.budget_steps,
        "num_train_samples": n_train,
        "num_scored": state.num_scored,
        "num_unscored": n_train - state.num_scored,
        "num_kept": num_kept,
        "kept_fraction": num_kept / n_train,
        "kept_per_class": None if per_class is None else {str(k): v for k, v in sorted(per_class.items())},
        "kept_ids": kept.tolist(),
        "flipped_kept": flipped_kept,
        "fit_seconds": round(scored.fit_seconds, 3),
        "score_seconds": round(scored.score_seconds, 3),
        "seeds": list(params.seeds),
        "metric": params.metric,
        params.metric: acc,
        "summary": [
            {
                "recipe": "coreset", "method": est.name, "fraction": params.fraction, "kept_fraction": num_kept / n_train,
                "seed": int(cfg.seed), "metric": params.metric, params.metric: acc["mean"],
            }
        ],
        "files": {"scores": "scores.pt", "csv": "scores.csv", "report": "report.json", "config": "config.yaml"},
        "versions": versions(),
    }


def _print(state: RecipeRun, report: dict[str, Any], budget: _Budget) -> None:
    params, n_train, num_kept, acc = state.params, state.num_train, report["num_kept"], report[state.params.metric]
    of_scored = f" of the {state.num_scored} scored" if state.num_scored < n_train else ""
    epochs = f"; retrained {budget.cfg.trainer.max_epochs} epochs for the scoring fit's steps" if budget.cfg is not state.cfg else ""
    print(
        f"\nCoreset by {state.est.name} (target {params.target.value}): kept {num_kept} of {n_train} ({num_kept / n_train:.4g} of the training set; "
        f"fraction {params.fraction:g}{of_scored}{', class-balanced' if params.class_balanced else ''}{epochs}); "
        f"{params.metric} {acc['mean']:.4f} +- {acc['std']:.4f} over {acc['n']} seed(s)",
        flush=True,
    )
