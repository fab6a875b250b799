"""The deletion recipe: does removing a set of samples change the target as the scores predict?

1. Train with the estimator attached and score every training sample for the target. The
   estimator must predict removal effects (:func:`~lightning_influence.recipes.scoring.predicts_removal`:
   diffin, tracin, influence functions, ...); rankings in other units (loss, outlier_gradient,
   random, the coreset scores) are refused before any training. ``predicted_calibrated`` in the
   report says whether the scores are in target-loss units (:func:`in_target_loss_units`).
2. For each size in ``recipe.sizes`` and kind in ``recipe.kinds`` pick a deletion set: the
   lowest scores (``harmful``), the highest (``helpful``) or a seeded random set (``random``).
   Predicted change of the target loss = the sum of the set's scores (additivity; units of the
   target loss; positive: removing the set raises the loss).
3. Actual change of the same target (with ``recipe.target_samples``: the loss over the same
   subset of target samples the scores were computed for), per ``recipe.retraining``:

   - ``trajectory`` (default): the recorded run re-run without the set -- same initial weights,
     same batches with the set's samples taken out, same optimizer and learning rates
     (:func:`~lightning_influence.evaluation.subset_retraining`): exactly the counterfactual the
     scores estimate. Single-device runs (it records the run with
     :class:`~lightning_influence.evaluation.StepRecorder`): a multi-process Trainer is refused
     before any training (:func:`check_trajectory_on_one_device`), naming ``fresh``.
   - ``fresh``: a new seeded Trainer run on the kept data per seed of ``recipe.seeds``, minus a
     full-data run of the same seed, averaged over the seeds (the effect a user sees, with the
     noise of a different batch order and initialisation).

4. Pearson and Spearman correlation of predicted with actual over the sets, the share of sets
   whose sign agrees, and (``recipe.lds_subsets`` > 0) the linear datamodeling score over that
   many random subsets keeping ``recipe.lds_keep_fraction``.

Writes ``scores.pt``, ``scores.csv``, ``report.json``, ``config.yaml`` and (``recipe.plots``)
``predicted_vs_actual.png`` into the run directory (global rank zero only).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from omegaconf import DictConfig

from lightning_influence.config import DeletionConfig, EstimatorConfig
from lightning_influence.distributed import is_global_zero
from lightning_influence.evaluation.metrics import pearson, spearman
from lightning_influence.recipes import common
from lightning_influence.recipes.common import Plan, RecipeRun, baseline_generator, scored_run
from lightning_influence.recipes.outputs import versions, write_outputs
from lightning_influence.recipes.preflight import Preflight
from lightning_influence.recipes.retraining import retrain_fresh, summary, target_batches, target_subset
from lightning_influence.recipes.scoring import ranking, require_removal_scores
from lightning_influence.recipes.trainers import world_size_of

__all__ = ["run", "deletion_sets", "in_target_loss_units", "check_trajectory_on_one_device"]


def in_target_loss_units(metadata: dict[str, Any]) -> bool:
    """Are scores with this metadata predicted target-loss changes in the target loss's units (so
    that a set's sum predicts its actual change)? Every estimator whose scores are not says so in
    its metadata (``calibrated: False``: DataInf, the rankings, Forward-INF outside plain SGD with
    ``learning_rate_sum``); the library's convention holds otherwise."""
    return metadata.get("calibrated") is not False


def deletion_sets(
    ids: torch.Tensor, column: torch.Tensor, sizes: list[int], kinds: list[str], seed: int, num_train: int | None = None
) -> list[dict[str, Any]]:
    """``[{kind, size, ids}]``: the ``size`` lowest / highest / random scores for each size and kind,
    among the scored ``ids`` (``num_train``: the training set's size, when not every sample was scored).
    NaN scores rank last for both ``harmful`` and ``helpful`` (the recipe itself refuses them). A
    ``random`` set depends on ``seed``, ``size`` and the set of scored ids only, not on the order in
    which the estimator returned them (drawn from the ids in ascending order), so that every
    estimator of a sweep deletes the same random sets; its generator is
    :func:`~lightning_influence.recipes.common.baseline_generator` ``("deletion random set", seed,
    size)``, salted so that it never draws what a user's ``torch.manual_seed(seed)`` draws."""
    order = ranking(column)  # lowest first; NaN last in both directions
    helpful = ranking(column, descending=True)
    pool = torch.sort(ids).values
    total = len(ids) if num_train is None else num_train
    sets = []
    for size in sizes:
        if size >= total:
            raise ValueError(f"a deletion set of {size} samples removes the whole training set of {total}; lower recipe.sizes")
        if size > len(ids):
            raise ValueError(
                f"a deletion set of {size} samples exceeds the {len(ids)} samples the estimator scored (of {total} training samples: "
                "the scoring fit saw only those, e.g. trainer.limit_train_batches); lower recipe.sizes to at most "
                f"{len(ids)}, or let the scoring fit see the whole training set"
            )
        for kind in kinds:
            if kind == "harmful":
                chosen = ids[order[:size]]
            elif kind == "helpful":
                chosen = ids[helpful[:size]]
            else:
                g = baseline_generator("deletion random set", seed, size)
                chosen = pool[torch.randperm(len(pool), generator=g)[:size]]
            sets.append({"kind": kind, "size": size, "ids": chosen})
    return sets


def check_trajectory_on_one_device(cfg: DictConfig) -> None:
    """``recipe.retraining=trajectory`` replays the recorded run in one process: refuse, before any
    data setup or training, a Trainer that trains with several processes (DDP: each process
    records only its shard of every batch), naming the two ways out."""
    world = world_size_of(cfg)
    if world > 1:
        strategy = cfg.trainer.get("strategy", "auto")
        raise ValueError(
            f"recipe.retraining=trajectory (the default) re-runs the recorded training without each deletion set, and its "
            f"StepRecorder records the batches one process sees: the Trainer (trainer.strategy={strategy}) trains with "
            f"{world} processes, each seeing only its shard, so the replay would follow a trajectory of part of the data. "
            "Use recipe.retraining=fresh (seeded Trainer runs, which run under DDP), or train on one device "
            "(trainer.devices=1, e.g. trainer=cpu); DiffIn's scores do not depend on the number of processes"
        )


def _target_subset_of(est: Any, target_samples: int | None, seed: int) -> tuple[int | None, int]:
    """``(count, seed)`` of the target subset the estimator scores against: its own
    ``target_samples`` and ``seed`` options where it takes them (the recording estimators, whose
    configs default them to ``recipe.target_samples`` and ``seed``), else the recipe's."""
    if "target_samples" in est.options:
        count = est.options["target_samples"]
        return (None if count is None else int(count)), int(est.options.get("seed", 0) or 0)
    return target_samples, seed


def _predicted(ids: torch.Tensor, column: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(column[torch.isin(ids, chosen)].sum())


def _correlations(predicted: list[float], actual: list[float]) -> dict[str, Any]:
    result: dict[str, Any] = {"pearson": None, "spearman": None}
    if len(predicted) >= 3:
        for name, fn in (("pearson", pearson), ("spearman", spearman)):
            try:
                result[name] = fn(torch.tensor(predicted), torch.tensor(actual))
            except ValueError:  # constant values: no correlation defined
                result[name] = None
    signs = [(p > 0) == (a > 0) for p, a in zip(predicted, actual, strict=True) if p != 0 and a != 0]
    result["sign_agreement"] = sum(signs) / len(signs) if signs else None
    return result


def _check_deletion_config(cfg: DictConfig, params: DeletionConfig, est: EstimatorConfig) -> None:
    require_removal_scores(est.name, est.options, "deletion", predicted=True)
    if params.retraining.value == "trajectory":
        check_trajectory_on_one_device(cfg)


def checked_settings(cfg: DictConfig) -> tuple[DictConfig, DeletionConfig, Any]:
    """The recipe's checks that need the config alone (run before any setup, and by a multirun
    for every job before the first): ``(cfg with precision and data dtype agreed, the recipe's
    parameters, the estimator's)``."""
    return common.checked_settings(cfg, DeletionConfig, _check_deletion_config)


def _plan(cfg: DictConfig, params: DeletionConfig, est: EstimatorConfig) -> Plan:
    """The trial checks the target subset the estimator scores against and, for fresh retraining,
    that sample ids are positions (trajectory retraining removes by id); the scoring fit records
    its steps for trajectory retraining."""

    def check_sizes(trial: Preflight) -> None:
        too_large = [size for size in params.sizes if size >= trial.num_train]
        if too_large:
            raise ValueError(
                f"recipe.sizes {too_large} would remove the whole training set of {trial.num_train} samples; "
                f"keep every size below {trial.num_train}"
            )

    mode = params.retraining.value
    subset_count, _ = _target_subset_of(est, params.target_samples, int(cfg.seed))
    callbacks: list[Any] = []
    if mode == "trajectory":
        from lightning_influence.evaluation import StepRecorder

        callbacks.append(StepRecorder())
    return Plan(None, subset_count, ids_are_positions=mode == "fresh", check_trial=check_sizes, callbacks=callbacks)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the deletion recipe on the composed config; returns the report (also in ``report.json``)."""
    state = scored_run(cfg, DeletionConfig, _plan, _check_deletion_config)
    params, scored, target = state.params, state.scored, state.params.target.value
    recorder = state.plan.callbacks[0] if state.plan.callbacks else None
    ids, column = _trained_on(state, recorder)
    sets = deletion_sets(ids, column, list(params.sizes), [k.value for k in params.kinds], int(state.cfg.seed), state.num_train)
    # The actual change is measured on the target the scores are about: with target_samples, the
    # same subset of the target samples (the estimators' draw).
    subset_count, subset_seed = _target_subset_of(state.est, params.target_samples, int(state.cfg.seed))
    sample_ids = scored.model.sample_ids if target == "train" else None  # type: ignore[attr-defined]
    batches = target_subset(target, target_batches(target, scored.datamodule), subset_count, subset_seed, sample_ids)

    lds_removals: list[tuple[int, ...]] = []
    if params.lds_subsets:
        from lightning_influence.evaluation import random_removals

        # From the ids in ascending order: the same subsets whatever order the estimator returned them in.
        lds_removals = random_removals(torch.sort(ids).values, params.lds_subsets, params.lds_keep_fraction, seed=int(state.cfg.seed))
    removals = [tuple(int(i) for i in s["ids"].tolist()) for s in sets]
    if recorder is not None:
        actual, actual_spread, lds_actual = _replayed_changes(state, recorder, removals, lds_removals, batches)
    else:
        actual, actual_spread, lds_actual = _retrained_changes(state, removals, lds_removals, batches)

    rows = [
        {
            "kind": s["kind"], "size": s["size"], "predicted": _predicted(ids, column, s["ids"]), "actual": a, "actual_std": spread,
            "ids": [int(i) for i in s["ids"].tolist()],  # the set removed: most harmful / helpful first, random as drawn
        }
        for s, a, spread in zip(sets, actual, actual_spread, strict=True)
    ]
    lds = _lds(ids, column, lds_removals, lds_actual, params.lds_keep_fraction) if lds_removals else None
    report = _report(state, ids, rows, lds, subset_count)
    if is_global_zero():
        if params.plots:
            from lightning_influence import plots

            plots.predicted_vs_actual(
                state.out / "predicted_vs_actual.png",
                [r["predicted"] for r in rows],
                actual,
                [f"{r['kind']}" for r in rows],
                units=f"{target} loss",
                title=f"deletion: {state.est.name}, {params.retraining.value} retraining",
            )
            report["files"]["predicted_vs_actual"] = "predicted_vs_actual.png"
        write_outputs(state.out, state.cfg, report, scored.scores)
        _print(report)
    return report


def _trained_on(state: RecipeRun, recorder: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored ids and their scores from which the deletion sets are drawn: with trajectory
    retraining, those the recorded fit trained on (a warning names how many were not)."""
    ids, column = state.scored.ids, state.scored.column
    if recorder is None:
        return ids, column
    # Retraining along the recorded steps measures only the removal of samples they trained on: a
    # post-hoc estimator also scores samples the fit never drew (e.g. trainer.limit_train_batches).
    from lightning_influence.evaluation import recorded_ids

    trained = torch.isin(ids, recorded_ids(state.scored.model, recorder.steps))
    if bool(trained.all()):
        return ids, column
    warnings.warn(
        f"{int((~trained).sum())} of the {len(ids)} scored samples were never trained on in the recorded fit "
        f"(e.g. trainer.limit_train_batches): the deletion sets are drawn from the {int(trained.sum())} trained "
        "ones, whose removal the retraining measures",
        stacklevel=3,
    )
    return ids[trained], column[trained]


def _replayed_changes(
    state: RecipeRun, recorder: Any, removals: list[tuple[int, ...]], lds_removals: list[tuple[int, ...]], batches: list[Any]
) -> tuple[list[float], list[float], list[float]]:
    """``recipe.retraining=trajectory``: the actual target change of each removal (and each LDS
    subset) along the recorded run; the spread over seeds is 0."""
    from lightning_influence.evaluation import subset_retraining

    retrained = subset_retraining(
        state.scored.model, recorder.initial_params, recorder.steps, recorder.optimizer, [*removals, *lds_removals], batches
    )
    changes = retrained.changes.tolist()
    return changes[: len(removals)], [0.0] * len(removals), changes[len(removals) :]


def _retrained_changes(
    state: RecipeRun, removals: list[tuple[int, ...]], lds_removals: list[tuple[int, ...]], batches: list[Any]
) -> tuple[list[float], list[float], list[float]]:
    """``recipe.retraining=fresh``: the target change of each removal against the full set, mean
    and spread over ``recipe.seeds`` (each LDS subset: its first seed only)."""
    cfg, dm, seeds, out = state.cfg, state.scored.datamodule, state.params.seeds, state.out / "retraining"
    all_ids = torch.arange(state.num_train)
    base = [retrain_fresh(cfg, dm, all_ids, s, out, {"target": batches})["target_loss/target"] for s in seeds]
    per_set: list[list[float]] = []
    for removal in [*removals, *lds_removals]:
        keep = all_ids[~torch.isin(all_ids, torch.tensor(removal, dtype=torch.long))]
        set_seeds = seeds if len(per_set) < len(removals) else seeds[:1]  # LDS: one seed per subset
        per_set.append([
            retrain_fresh(cfg, dm, keep, s, out, {"target": batches})["target_loss/target"] - base[k] for k, s in enumerate(set_seeds)
        ])
    actual = [summary(v)["mean"] for v in per_set[: len(removals)]]
    actual_spread = [summary(v)["std"] for v in per_set[: len(removals)]]
    return actual, actual_spread, [v[0] for v in per_set[len(removals) :]]


def _lds(ids: torch.Tensor, column: torch.Tensor, removals: list[tuple[int, ...]], actual: list[float], keep_fraction: float) -> dict[str, Any]:
    """The linear datamodelling score: the rank correlation of the predicted and actual changes over the random subsets."""
    predicted = [_predicted(ids, column, torch.tensor(r, dtype=torch.long)) for r in removals]
    try:
        value = spearman(torch.tensor(predicted), torch.tensor(actual))
    except ValueError:
        value = None
    return {"subsets": len(removals), "keep_fraction": keep_fraction, "lds": value}


def _report(state: RecipeRun, ids: torch.Tensor, rows: list[dict[str, Any]], lds: dict[str, Any] | None, subset_count: int | None) -> dict[str, Any]:
    params, est, metadata, n_train = state.params, state.est, state.scored.scores.metadata, state.num_train
    mode = params.retraining.value
    calibrated = in_target_loss_units(metadata)
    if not calibrated:
        why = f"score metadata 'calibrated': False; units: {metadata.get('units', 'not stated')}"
        warnings.warn(
            f"{est.name}'s scores are not in units of the target-loss change ({why}): "
            "the predicted changes of the deletion sets are off in scale; read the correlations and sign agreement, "
            "not predicted against actual magnitudes",
            RuntimeWarning,
            stacklevel=3,
        )
    kinds = dict.fromkeys(r["kind"] for r in rows)
    return {
        "recipe": "deletion",
        "predicted_calibrated": calibrated,
        "estimator": {"name": est.name, "options": est.options},
        "target": params.target.value,
        "units": "target loss (mean over the target samples)",
        "target_samples": subset_count,
        "sign_convention": metadata.get("sign_convention"),
        "score_metadata": metadata,
        "retraining": mode,
        "seeds": list(params.seeds) if mode == "fresh" else None,
        "num_train_samples": n_train,
        "num_scored": len(ids),
        "fit_seconds": round(state.scored.fit_seconds, 3),
        "score_seconds": round(state.scored.score_seconds, 3),
        "sets": rows,
        "correlation": _correlations([r["predicted"] for r in rows], [r["actual"] for r in rows]),
        "correlation_by_kind": {
            k: _correlations([r["predicted"] for r in rows if r["kind"] == k], [r["actual"] for r in rows if r["kind"] == k]) for k in kinds
        },
        "lds": lds,
        "summary": [
            {"recipe": "deletion", "method": est.name, "kind": r["kind"], "fraction": r["size"] / n_train, "seed": int(state.cfg.seed), "predicted": r["predicted"], "actual": r["actual"]}
            for r in rows
        ],
        "files": {"scores": "scores.pt", "csv": "scores.csv", "report": "report.json", "config": "config.yaml"},
        "versions": versions(),
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _print(report: dict[str, Any]) -> None:
    lines = [
        "",
        f"Deletion with {report['estimator']['name']} (target {report['target']}, {report['retraining']} retraining): "
        "predicted vs actual change of the target loss when the set is removed.",
        f"{'kind':<8} {'size':>5}  {'predicted':>11}  {'actual':>11}",
    ]
    for r in report["sets"]:
        lines.append(f"{r['kind']:<8} {r['size']:>5}  {r['predicted']:>11.4e}  {r['actual']:>11.4e}")
    c = report["correlation"]
    lines.append(f"Pearson {_fmt(c['pearson'])}, Spearman {_fmt(c['spearman'])}, sign agreement {_fmt(c['sign_agreement'], '.0%')}")
    if report["lds"] is not None:
        lines.append(f"LDS over {report['lds']['subsets']} random subsets (keep {report['lds']['keep_fraction']:g}): {_fmt(report['lds']['lds'])}")
    lines.append("Wrote " + ", ".join(report["files"].values()))
    print("\n".join(lines), flush=True)
