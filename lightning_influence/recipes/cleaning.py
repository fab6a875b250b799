"""The cleaning recipe: find the harmful training samples, remove them, retrain, measure.

1. Train with the estimator attached and score every training sample for the target
   (``recipe.target``: ``val`` = mean validation loss, ``train`` = self influence).
2. Mislabel detection against the flipped labels the datamodule injected (``flipped_ids``):
   ROC-AUC of the ranking "lowest score first" and the share of the flipped samples found in
   the lowest ``top_fractions`` of the scores; the plain final-loss ranking alongside (an
   influence method earns its cost only where it beats it); chance is ``k / n``, the share of the
   ``n`` scored samples that the ``k = max(1, round(f * n))`` lowest take (``f`` itself only
   where ``f * n`` is whole).
3. Remove ``remove_count`` (or ``remove_fraction`` of the training set) samples by each ranking
   -- the estimator's most harmful, the highest final losses, and a random set of the same
   count (drawn per seed: :func:`random_removal`) -- and retrain each with a fresh, seeded Trainer
   per seed of ``recipe.seeds``; the test metric (``recipe.metric``) as mean and spread over the
   seeds, and its paired difference against no removal. The report lists the ids each condition
   removed for each seed (``removal.conditions.<name>.removed_ids``, aligned with
   ``removal.seeds``).

Scores that are NaN or infinite (the estimator's, or a final loss) stop the recipe after the
scoring fit, before detection and retraining, with their count and sample ids
(:func:`~lightning_influence.recipes.scoring.require_finite`): a NaN has no rank.

The report's ``summary`` rows (what :mod:`~lightning_influence.recipes.aggregate` tabulates)
name the estimator's row by the estimator and the baselines by :data:`BASELINE_METHODS`
(``"no removal (baseline)"``, ``"final loss (baseline)"``, ``"random removal (baseline)"``), so
that a sweep over estimators never files the ``random`` or ``loss`` estimator's removal under a
baseline's name.

Writes ``scores.pt``, ``scores.csv``, ``report.json``, ``config.yaml`` and (``recipe.plots``)
``score_histogram.png``, ``detection_curve.png`` and, for image data, ``most_harmful.png``
into the run directory (global rank zero only).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lightning_influence.config import CleaningConfig, EstimatorConfig
from lightning_influence.distributed import is_global_zero
from lightning_influence.evaluation.metrics import detection_auroc, fraction_found
from lightning_influence.recipes import common
from lightning_influence.recipes.common import Plan, RecipeRun, baseline_generator, partly_scored, scored_run
from lightning_influence.recipes.outputs import sample_rows, versions, write_outputs
from lightning_influence.recipes.preflight import Preflight
from lightning_influence.recipes.retraining import metric_of, paired_difference, retrain_fresh, summary
from lightning_influence.recipes.scoring import ScoredRun, final_loss_scores, ranking, require_finite, require_removal_scores
from lightning_influence.recipes.training_set import labels_of

__all__ = ["run", "detection_metrics", "random_removal", "top_count", "BASELINE_METHODS"]

#: The summary-row method name of each baseline condition: distinct from every estimator name.
BASELINE_METHODS = {
    "no_removal": "no removal (baseline)",
    "loss": "final loss (baseline)",
    "random": "random removal (baseline)",
}


def detection_metrics(values: torch.Tensor, flipped: torch.Tensor, fractions: list[float]) -> dict[str, Any]:
    """ROC-AUC and share of flipped samples found in the lowest ``fractions`` of ``values``, and
    ``num_nan``. NaN values rank last (least suspicious: never among the lowest fractions, below
    every other value for the ROC-AUC), +-inf at their ends, in both metrics alike. The recipe
    itself refuses non-finite scores before this step."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    nan = torch.isnan(values)
    if bool(nan.any()) or not bool(torch.isfinite(values).all()):
        # Both metrics depend only on the order (ties included): dense ranks keep it, NaN after all.
        ranks = torch.empty_like(values)
        if bool((~nan).any()):
            ranks[~nan] = torch.unique(values[~nan], sorted=True, return_inverse=True)[1].to(values.dtype)
            ranks[nan] = float(ranks[~nan].max()) + 1.0
        else:
            ranks[nan] = 0.0
        values = ranks
    result: dict[str, Any] = {"auroc": detection_auroc(values, flipped)}
    for f in fractions:
        result[f"found_in_top_{_pct(f)}"] = fraction_found(values, flipped, f)
    result["num_nan"] = int(nan.sum())
    return result


def top_count(fraction: float, num_scored: int) -> int:
    """How many of ``num_scored`` samples the share found in the lowest ``fraction`` takes
    (:func:`~lightning_influence.evaluation.metrics.fraction_found`): ``max(1, round(fraction * n))``."""
    return max(1, round(fraction * num_scored))


def random_removal(num_train: int, count: int, seed: int, retrain_seed: int) -> torch.Tensor:
    """The random-removal baseline's ``count`` sample ids (of ``num_train``) for the run's ``seed``
    and the retraining seed ``retrain_seed``: ``randperm(num_train)[:count]`` drawn with
    :func:`~lightning_influence.recipes.common.baseline_generator` ``("cleaning random removal",
    seed, retrain_seed)``, a salted seed that never coincides with a user's own
    ``torch.manual_seed(0)``, ``(1)``, ... (e.g. a datamodule's label-noise draw)."""
    g = baseline_generator("cleaning random removal", seed, retrain_seed)
    return torch.randperm(num_train, generator=g)[:count]


def _asked(params: CleaningConfig) -> str:
    if params.remove_count is not None:
        return f"recipe.remove_count={params.remove_count}"
    return f"recipe.remove_fraction={params.remove_fraction:g} of the training set"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}pct"


def _fraction_of(key: str) -> float:
    """The fraction of a ``found_in_top_<100 f>pct`` key."""
    return float(key.removeprefix("found_in_top_").removesuffix("pct")) / 100


def _refuse_coreset_rankings(cfg: DictConfig, params: CleaningConfig, est: EstimatorConfig) -> None:
    require_removal_scores(est.name, est.options, "cleaning")


def checked_settings(cfg: DictConfig) -> tuple[DictConfig, CleaningConfig, Any]:
    """The recipe's checks that need the config alone (run before any setup, and by a multirun
    for every job before the first): ``(cfg with precision and data dtype agreed, the recipe's
    parameters, the estimator's)``."""
    return common.checked_settings(cfg, CleaningConfig, _refuse_coreset_rankings)


def _removal_count(params: CleaningConfig, num_train: int) -> int:
    """How many samples each condition removes (``remove_count``, or ``remove_fraction`` of the
    training set); refused when that leaves nothing to train on."""
    count = params.remove_count if params.remove_count is not None else max(1, round(params.remove_fraction * num_train))
    if count >= num_train:
        raise ValueError(
            f"removing {count} of {num_train} training samples leaves nothing to train on; "
            f"lower recipe.remove_count (at most {num_train - 1}) or recipe.remove_fraction"
        )
    return count


def _plan(cfg: DictConfig, params: CleaningConfig, est: EstimatorConfig) -> Plan:
    def check_count(trial: Preflight) -> None:
        _removal_count(params, trial.num_train)

    return Plan(params.metric, params.target_samples, check_trial=check_count)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the cleaning recipe on the composed config; returns the report (also in ``report.json``)."""
    state = scored_run(cfg, CleaningConfig, _plan, _refuse_coreset_rankings)
    requested = _removal_count(state.params, state.trial.num_train)
    count = _scored_count(state, requested)
    flipped_set = _flipped_ids(state.scored.datamodule)
    flipped = torch.tensor([int(i) in flipped_set for i in state.scored.ids.tolist()], dtype=torch.bool)
    loss_column = final_loss_scores(state.scored)
    # The estimator's column was checked by fit_and_score; the final-loss ranking acts the same way.
    require_finite(
        loss_column, state.scored.ids, "the final-loss ranking (the model's training loss per sample)",
        "the trained model gives those samples no finite loss",
    )
    detection = _detection(state, flipped_set, flipped, loss_column)
    conditions = _retrain_conditions(state, count, loss_column, flipped_set)
    report = _report(state, detection, conditions, count, requested, flipped_set)
    if is_global_zero():
        if state.params.plots:
            harmful = ranking(state.scored.column)[: state.params.top_k]
            report["files"].update(_plots(state.out, state.scored, flipped, loss_column, state.dataset, harmful, flipped_set))
        write_outputs(state.out, state.cfg, report, state.scored.scores)
        _print(report, state.est.name, state.params.metric)
    return report


def _scored_count(state: RecipeRun, requested: int) -> int:
    """The rankings can only remove scored samples: where fewer were scored than ``requested``,
    every condition removes as many as were scored, with a warning."""
    if requested <= state.num_scored:
        return requested
    count = state.num_scored
    warnings.warn(
        f"the cleaning recipe was asked to remove {requested} samples ({_asked(state.params)}) but {partly_scored(state, only=True)}: "
        f"every condition (estimator, loss, random) removes {count} samples instead. Lower recipe.remove_count, or let the "
        "scoring fit see the whole training set",
        UserWarning,
        stacklevel=3,
    )
    return count


def _flipped_ids(datamodule: Any) -> set[int]:
    """The ids of the training samples whose labels the datamodule flipped (empty without ``flipped_ids``)."""
    flipped_ids = getattr(datamodule, "flipped_ids", None)
    return {int(i) for i in torch.as_tensor(flipped_ids).tolist()} if flipped_ids is not None else set()


def _detection(state: RecipeRun, flipped_set: set[int], flipped: torch.Tensor, loss_column: torch.Tensor) -> dict[str, Any]:
    """The report's ``detection``: how well the estimator's and the final-loss rankings find the
    flipped labels among the scored samples, and what was injected."""
    dm, n_train, fractions = state.scored.datamodule, state.num_train, list(state.params.top_fractions)
    detection: dict[str, Any] = {
        # every flipped label of the training set, and those among the scored samples (the
        # detection metrics are over the scored samples only)
        "num_flipped": len(flipped_set),
        "num_flipped_scored": int(flipped.sum()),
        "num_scored": state.num_scored,
        "noise_kind": getattr(dm, "noise_kind", None),
        # what was injected: the fraction of training labels flipped (0 with noise_kind=none),
        # next to the datamodule's label_noise setting
        "label_noise": len(flipped_set) / n_train if getattr(dm, "flipped_ids", None) is not None and n_train else None,
        "label_noise_configured": getattr(dm, "label_noise", None),
        # fraction_found takes the k = max(1, round(f * n)) lowest of the n scored samples: a random
        # ranking finds k / n of the flipped ones on average, which is f only where f * n is whole
        "top_counts": {f"found_in_top_{_pct(f)}": top_count(f, state.num_scored) for f in fractions},
        "chance": {f"found_in_top_{_pct(f)}": top_count(f, state.num_scored) / state.num_scored for f in fractions},
    }
    if bool(flipped.any()) and not bool(flipped.all()):
        detection["estimator"] = detection_metrics(state.scored.column, flipped, fractions)
        detection["loss"] = detection_metrics(loss_column, flipped, fractions)
    else:
        detection["estimator"] = detection["loss"] = None
    return detection


def _retrain_conditions(state: RecipeRun, count: int, loss_column: torch.Tensor, flipped_set: set[int]) -> dict[str, dict[str, Any]]:
    """Retrain once per seed of ``recipe.seeds`` for each condition -- no removal, the estimator's
    ``count`` most harmful, the ``count`` highest final losses, ``count`` random samples (drawn per
    seed) -- and summarise the metric and the flipped labels removed over the seeds."""
    cfg, params, ids, n_train = state.cfg, state.params, state.scored.ids, state.num_train
    all_ids = torch.arange(n_train)
    ranked = {
        "estimator": ids[ranking(state.scored.column)[:count]],
        "loss": ids[ranking(loss_column)[:count]],
    }

    def random_set(seed: int) -> torch.Tensor:
        return all_ids[random_removal(n_train, count, int(cfg.seed), int(seed))]

    conditions: dict[str, dict[str, Any]] = {}
    plans = {
        "no_removal": lambda s: torch.empty(0, dtype=torch.long),
        "estimator": lambda s: ranked["estimator"],
        "loss": lambda s: ranked["loss"],
        "random": random_set,
    }
    for name, removal_for in plans.items():
        accuracies, flipped_removed, removed_ids = [], [], []
        for seed in params.seeds:
            removed = removal_for(seed)
            removed_ids.append([int(i) for i in removed.tolist()])
            keep = all_ids[~torch.isin(all_ids, removed)]
            metrics = retrain_fresh(cfg, state.scored.datamodule, keep, seed, state.out / "retraining")
            accuracies.append(metric_of(metrics, params.metric))
            flipped_removed.append(sum(int(i) in flipped_set for i in removed.tolist()))
        conditions[name] = {
            "removed": int(removal_for(params.seeds[0]).numel()),
            "flipped_removed": summary(flipped_removed),
            params.metric: summary(accuracies),
            # per seed of recipe.seeds: the estimator's and the loss ranking's are the same every seed
            "removed_ids": removed_ids,
        }
    base = conditions["no_removal"][params.metric]["values"]
    for name in ("estimator", "loss", "random"):
        conditions[name][f"{params.metric}_minus_no_removal"] = paired_difference(conditions[name][params.metric]["values"], base)
    return conditions


def _report(
    state: RecipeRun, detection: dict[str, Any], conditions: dict[str, dict[str, Any]], count: int, requested: int, flipped_set: set[int]
) -> dict[str, Any]:
    cfg, params, est, scored, n_train = state.cfg, state.params, state.est, state.scored, state.num_train
    ids, column = scored.ids, scored.column
    harmful = ranking(column)[: params.top_k]
    helpful = ranking(column, descending=True)[: params.top_k]  # NaN last, as InfluenceScores.most_helpful
    return {
        "recipe": "cleaning",
        "estimator": {"name": est.name, "options": est.options},
        "target": params.target.value,
        "sign_convention": scored.scores.metadata.get("sign_convention"),
        "score_metadata": scored.scores.metadata,
        "num_train_samples": n_train,
        "num_scored": len(ids),
        "num_negative": int((column < 0).sum()),
        "num_positive": int((column > 0).sum()),
        "score_sum": float(column.sum()),
        "fit_seconds": round(scored.fit_seconds, 3),
        "score_seconds": round(scored.score_seconds, 3),
        "detection": detection,
        "removal": {"count": count, "requested_count": requested, "fraction": count / n_train, "seeds": list(params.seeds), "metric": params.metric, "conditions": conditions},
        "most_harmful": sample_rows(state.dataset, ids[harmful], column[harmful], flipped_set),
        "most_helpful": sample_rows(state.dataset, ids[helpful], column[helpful], flipped_set),
        "summary": [
            {
                "recipe": "cleaning",
                "method": est.name if name == "estimator" else BASELINE_METHODS[name],
                "condition": name,
                "fraction": count / n_train if name != "no_removal" else 0.0,
                "seed": int(cfg.seed),
                "metric": params.metric,
                params.metric: conditions[name][params.metric]["mean"],
                "baseline": name != "estimator",
            }
            for name in conditions
        ],
        "files": {"scores": "scores.pt", "csv": "scores.csv", "report": "report.json", "config": "config.yaml"},
        "versions": versions(),
    }


def _plots(
    out: Path, scored: ScoredRun, flipped: torch.Tensor, loss_column: torch.Tensor, dataset: Any, harmful: torch.Tensor, flipped_set: set[int]
) -> dict[str, str]:
    from lightning_influence import plots

    name = str(scored.scores.metadata.get("estimator", "estimator"))
    files = {}
    plots.score_histogram(out / "score_histogram.png", scored.column, flipped, xlabel="score (target-loss change when removed)", title=f"{name} scores")
    files["score_histogram"] = "score_histogram.png"
    if bool(flipped.any()):
        plots.detection_curve(out / "detection_curve.png", {name: scored.column, "final loss": loss_column}, flipped)
        files["detection_curve"] = "detection_curve.png"
    images, captions = [], []
    try:
        for i, v in zip(scored.ids[harmful].tolist(), scored.column[harmful].tolist(), strict=True):
            item = dataset[i]
            images.append(plots.as_image(item[0] if isinstance(item, (tuple, list)) else item["x"]))
            (y,) = labels_of(dataset, [i])
            captions.append(f"id {i} y={'?' if y is None else f'{y:g}'}{' flip' if i in flipped_set else ''}\n{v:.2e}")
    except (ValueError, KeyError, TypeError, IndexError):
        return files  # not image data
    plots.image_grid(out / "most_harmful.png", images, captions, title="most harmful training samples")
    files["most_harmful_images"] = "most_harmful.png"
    return files


def _print(report: dict[str, Any], name: str, metric: str) -> None:
    det = report["detection"]
    lines = [
        "",
        f"Cleaning with {name} (target {report['target']}): {report['num_scored']} training samples scored, "
        f"fit {report['fit_seconds']:.1f}s, scoring after fit {report['score_seconds']:.1f}s.",
        "Score = predicted change of the target loss when the sample is removed: positive helps, negative hurts.",
        "",
        f"{'rank':>4}  {'id':>6}  {'score':>11}  {'label':>5}  flipped   (most harmful)",
    ]
    for rank, row in enumerate(report["most_harmful"], 1):
        label = "?" if row["label"] is None else str(row["label"])
        lines.append(f"{rank:>4}  {row['id']:>6}  {row['score']:>11.3e}  {label:>5}  {'yes' if row['flipped'] else 'no'}")
    if det["estimator"] is not None:
        keys = [k for k in det["chance"]]
        scored, flipped = report["num_scored"], det.get("num_flipped_scored", det["num_flipped"])
        kind = det["noise_kind"]  # None for a user datamodule that does not name how its labels were flipped
        if scored < report["num_train_samples"]:
            flips = (
                f"Flipped labels: {flipped} among the {scored} scored samples ({det['num_flipped']} in the whole training set "
                f"of {report['num_train_samples']}{'' if kind is None else f'; {kind}'}); the detection metrics are over the "
                "scored samples."
            )
        else:
            flips = f"Flipped labels: {det['num_flipped']}" + ("." if kind is None else f" ({kind}).")
        width = max(len("ranking"), len("final loss"), len(name))
        lines += ["", flips, f"{'ranking':<{width}} {'ROC-AUC':>8}  " + "  ".join(f"{k.removeprefix('found_in_'):>12}" for k in keys)]
        for key, title in (("estimator", name), ("loss", "final loss")):
            row = det[key]
            lines.append(f"{title:<{width}} {row['auroc']:>8.3f}  " + "  ".join(f"{row[k]:>12.1%}" for k in keys))
        lines.append(f"{'chance':<{width}} {0.5:>8.3f}  " + "  ".join(f"{det['chance'][k]:>12.1%}" for k in keys))
        counts = det.get("top_counts") or {}
        if any(k in counts and abs(counts[k] - _fraction_of(k) * scored) > 1e-9 for k in keys):
            taken = ", ".join(f"{k.removeprefix('found_in_')} {counts[k]}" for k in keys if k in counts)
            lines.append(f"(of the {scored} scored samples the top fractions take {taken}; chance is that share)")
    rem = report["removal"]
    asked = f" ({rem['requested_count']} asked for; only {report['num_scored']} were scored)" if rem["requested_count"] != rem["count"] else ""
    lines += ["", f"Retrained without {rem['count']} samples{asked}, {len(rem['seeds'])} seed(s); {metric} mean +- std (paired change vs no removal):"]
    for cond, row in rem["conditions"].items():
        s = row[metric]
        delta = row.get(f"{metric}_minus_no_removal")
        change = f"  ({delta['mean']:+.4f} +- {delta['std']:.4f})" if delta else ""
        lines.append(
            f"  {cond:<11} {s['mean']:.4f} +- {s['std']:.4f}{change}   removed: {row['removed']}, flipped removed: {row['flipped_removed']['mean']:.1f}"
        )
    lines.append("Wrote " + ", ".join(report["files"].values()))
    print("\n".join(lines), flush=True)
