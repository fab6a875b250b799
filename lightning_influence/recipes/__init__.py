"""End-to-end recipes, one command each: train with the estimator attached, score every training
sample, act on the scores, retrain, measure, report.

- :mod:`~lightning_influence.recipes.cleaning`: find flipped labels, remove the most harmful
  samples, retrain and compare with no removal, the final-loss ranking and random removal.
- :mod:`~lightning_influence.recipes.deletion`: predicted vs actual target change of deleting
  the most harmful / most helpful / random sets; optional LDS.
- :mod:`~lightning_influence.recipes.coreset`: keep a fraction by score, retrain, test accuracy.
- :mod:`~lightning_influence.recipes.aggregate`: table and plot over a multirun directory.

Each ``run(cfg)`` takes the composed Hydra config (see ``lightning_influence.conf``).
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from lightning_influence.config import check_config
from lightning_influence.recipes.preflight import check_training_steps

RECIPES: dict[str, str] = {
    "cleaning": "lightning_influence.recipes.cleaning:run",
    "deletion": "lightning_influence.recipes.deletion:run",
    "coreset": "lightning_influence.recipes.coreset:run",
}

__all__ = ["RECIPES", "check_recipe", "run_recipe"]


def _recipe_module(cfg: DictConfig) -> Any:
    recipe = cfg.get("recipe")
    if recipe is None or recipe.get("name") is None:
        raise ValueError(f"the config selects no recipe: add recipe=<{'|'.join(RECIPES)}>")
    name = str(recipe.name)
    if name not in RECIPES:
        raise ValueError(f"recipe.name={name!r} is not a recipe; choose one of {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name].split(":")[0])


def check_recipe(cfg: DictConfig) -> None:
    """Every check of ``cfg`` that needs the config alone: :func:`check_config`, a Trainer config
    that runs no step or never ends (``check_training_steps``), then the selected
    recipe's own (``checked_settings``: precision against data dtype, the recipe's ranges, the
    estimator against the recipe). Raises ``ValueError`` naming what is wrong and the fix."""
    module = _recipe_module(cfg)
    check_config(cfg)
    check_training_steps(cfg)
    module.checked_settings(cfg)


def run_recipe(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe named ``cfg.recipe.name``; returns its report."""
    module = _recipe_module(cfg)
    check_config(cfg)  # also for callers that skip the Hydra entry point
    return getattr(module, RECIPES[str(cfg.recipe.name)].split(":")[1])(cfg)
