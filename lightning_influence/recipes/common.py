"""The opening every recipe shares: its settings checked from the config alone
(:func:`checked_settings`), the output folder prepared, the one-step trial run, and the scoring
run (:func:`scored_run`, which returns a :class:`RecipeRun`).

The pieces live in modules of their own: :mod:`~lightning_influence.recipes.outputs` (the output
folder, its job marker, the report), :mod:`~lightning_influence.recipes.preflight` (the checks
before the scoring run), :mod:`~lightning_influence.recipes.scoring` (the estimator's checks and
the scoring run), :mod:`~lightning_influence.recipes.retraining` (retraining on a kept subset and
its statistics), :mod:`~lightning_influence.recipes.trainers` (a fresh Trainer for each fit) and
:mod:`~lightning_influence.recipes.training_set` (the training set read by position, in order
under DDP).

Distributed runs (``trainer=ddp``): every process runs the whole recipe (fits, scoring and
retraining take part in the collectives; each process runs its own one-device trial fit); only
global rank zero creates folders and writes files, and the rank-zero-only code calls no
collective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from lightning_influence.config import EstimatorConfig, estimator_params, recipe_params
from lightning_influence.distributed import is_global_zero
from lightning_influence.recipes.outputs import prepare
from lightning_influence.recipes.preflight import Preflight, preflight
from lightning_influence.recipes.scoring import ScoredRun, check_estimator, fit_and_score
from lightning_influence.recipes.training_set import train_dataset

__all__ = ["Plan", "RecipeRun", "baseline_generator", "baseline_seed", "checked_settings", "harmonise_precision", "partly_scored", "scored_run"]

# Lightning's precision names (and its aliases) -> the dtype the module's parameters train in.
_PRECISION_ALIASES = {"64": "64-true", "double": "64-true", "32": "32-true", "16": "16-mixed", "half": "16-mixed", "bf16": "bf16-mixed"}
_TRUE_PRECISION_DTYPES = {"64-true": "float64", "32-true": "float32", "16-true": "float16", "bf16-true": "bfloat16"}


def harmonise_precision(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data.dtype`` and ``trainer.precision`` made to agree, so that the model and
    its inputs share one dtype in every evaluation the recipes make outside Lightning's precision
    plugin (scores, target losses, retraining). A ``*-true`` precision with the default
    ``data.dtype=float32`` makes the data follow it (``64-true``: float64 data);
    ``data.dtype=float64`` with the default ``32-true`` makes the Trainer train in ``64-true``.
    Other disagreements (float64 data with mixed precision, half data in float32, ...) are refused
    with a message. A datamodule without a ``dtype`` argument is left alone."""
    data, trainer = cfg.get("data"), cfg.get("trainer")
    if not isinstance(data, DictConfig) or not isinstance(trainer, DictConfig) or "dtype" not in data:
        return cfg
    raw = trainer.get("precision")
    precision = _PRECISION_ALIASES.get(str(raw), str(raw)) if raw is not None else "32-true"
    dtype = str(data.dtype)
    weights = _TRUE_PRECISION_DTYPES.get(precision, "float32")  # mixed precision keeps float32 weights
    if dtype == weights:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        if dtype == "float32" and precision in _TRUE_PRECISION_DTYPES:
            cfg.data.dtype = weights
            note = f"trainer.precision={raw}: the data follow, data.dtype={weights}"
        elif precision == "32-true" and dtype == "float64":
            cfg.trainer.precision = "64-true"
            note = "data.dtype=float64: the model follows, trainer.precision=64-true"
        else:
            raise ValueError(
                f"data.dtype={dtype} does not match trainer.precision={raw} (the model trains in {weights}): the recipes "
                "evaluate the model on the data outside Lightning's precision plugin. Use data.dtype=float64 with "
                f"trainer.precision=64-true, or data.dtype={weights} with trainer.precision={raw}"
            )
    if is_global_zero():
        print(note, flush=True)
    return cfg


def checked_settings(
    cfg: DictConfig, schema: type, extra: Callable[[DictConfig, Any, EstimatorConfig], None] | None = None
) -> tuple[DictConfig, Any, EstimatorConfig]:
    """A recipe's checks that need the config alone (run before any setup, and by a multirun for
    every job before the first): precision and data dtype agreed (:func:`harmonise_precision`),
    the recipe's parameters read with ``schema`` (its structured config: ranges refused), the
    estimator's options checked against them (:func:`~lightning_influence.recipes.scoring.check_estimator`),
    then the recipe's own checks ``extra(cfg, params, est)``. Returns ``(cfg with precision and
    data dtype agreed, the recipe's parameters, the estimator's)``."""
    cfg = harmonise_precision(cfg)  # data.dtype and trainer.precision agree, or a clear error
    params = recipe_params(cfg.recipe, schema)
    est = estimator_params(cfg.estimator)
    check_estimator(est, params.target, params.target_samples, int(cfg.seed))
    if extra is not None:
        extra(cfg, params, est)
    return cfg, params, est


@dataclass
class Plan:
    """What a recipe asks of its trial run and scoring run, decided from its checked settings:
    the ``metric`` the trial must see logged (``None``: none), the ``target_samples`` it checks
    against the target's size, whether sample ids must be positions of the training set
    (:func:`~lightning_influence.recipes.preflight.preflight`), the recipe's own checks of the
    trial's sizes (``check_trial``) and ``callbacks`` added to the scoring fit."""

    metric: str | None
    target_samples: int | None
    ids_are_positions: bool = True
    check_trial: Callable[[Preflight], None] | None = None
    callbacks: Sequence[L.Callback] = ()


@dataclass
class RecipeRun:
    """A recipe after its opening (:func:`scored_run`): its config (precision and data dtype
    agreed), parameters and estimator config, output folder, :class:`Plan`, the trial run's
    findings, the scoring run and the training dataset."""

    cfg: DictConfig
    params: Any
    est: EstimatorConfig
    out: Path
    plan: Plan
    trial: Preflight
    scored: ScoredRun
    dataset: Any

    @property
    def num_train(self) -> int:
        return len(self.dataset)

    @property
    def num_scored(self) -> int:
        return len(self.scored.ids)


def scored_run(
    cfg: DictConfig,
    schema: type,
    plan: Callable[[DictConfig, Any, EstimatorConfig], Plan],
    extra: Callable[[DictConfig, Any, EstimatorConfig], None] | None = None,
) -> RecipeRun:
    """The opening of every recipe: its settings checked (:func:`checked_settings` with ``schema``
    and ``extra``), the output folder prepared (:func:`~lightning_influence.recipes.outputs.prepare`),
    the one-step trial run (:func:`~lightning_influence.recipes.preflight.preflight`) with the
    recipe's ``plan(cfg, params, est)``, then the scoring run on the trial's datamodule
    (:func:`~lightning_influence.recipes.scoring.fit_and_score`)."""
    cfg, params, est = checked_settings(cfg, schema, extra)
    out = prepare(cfg, params.plots)
    target = params.target.value
    steps = plan(cfg, params, est)
    trial = preflight(cfg, out, steps.metric, target, steps.target_samples, ids_are_positions=steps.ids_are_positions)
    if steps.check_trial is not None:
        steps.check_trial(trial)
    scored = fit_and_score(cfg, out, target, params.target_samples, list(steps.callbacks), datamodule=trial.datamodule)
    return RecipeRun(cfg, params, est, out, steps, trial, scored, train_dataset(scored.datamodule))


def partly_scored(run: RecipeRun, only: bool = False) -> str:
    """The words of a warning that the estimator scored part of the training set only."""
    return (
        f"the estimator scored {'only ' if only else ''}{run.num_scored} of the {run.num_train} training samples (the "
        "scoring fit saw only those: trainer.limit_train_batches, max_steps, ...)"
    )


#: The salt of :func:`baseline_seed`: a constant, so that a baseline's draws depend on its own
#: numbers alone and never coincide with a plain ``torch.manual_seed(seed)`` of the same numbers.
BASELINE_SALT = "lightning-influence/recipes/baseline"


def baseline_seed(purpose: str, *numbers: int) -> int:
    """The seed of a recipe's random baseline (``purpose``, e.g. ``"cleaning random removal"``)
    drawn for ``numbers`` (e.g. the run's ``seed`` and the retraining seed):

        int.from_bytes(sha256(f"{BASELINE_SALT}/{purpose}/{n1}/{n2}/...".encode()).digest()[:8], "little") >> 1

    (63 bits). Deterministic for given numbers, different for every purpose and numbers, and
    unrelated to the small seeds (0, 1, 2, ...) that a user's own code passes to
    ``torch.manual_seed``: a datamodule that flips labels with ``manual_seed(seed + 1)`` does not
    draw the same permutation as the baseline (earlier versions seeded it with
    ``1_000_003 * seed + s``, i.e. ``manual_seed(0)``, ``(1)``, ``(2)`` at ``seed=0``)."""
    text = "/".join([BASELINE_SALT, purpose, *(str(int(n)) for n in numbers)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def baseline_generator(purpose: str, *numbers: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`baseline_seed` ``(purpose, *numbers)``."""
    return torch.Generator().manual_seed(baseline_seed(purpose, *numbers))
