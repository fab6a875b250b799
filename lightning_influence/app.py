"""The main job: ``python -m lightning_influence [overrides]`` runs the selected recipe
(``recipe=cleaning`` by default; ``deletion``, ``coreset``) end to end and writes
``scores.pt``, ``scores.csv``, ``report.json``, ``config.yaml`` and PNG plots into the Hydra run
directory. Call :func:`run` with a composed config to do the same in-process (``output_dir``
must then be set).

Sign and units: a score is the predicted change of the target loss (by default the mean
validation cross-entropy, in nats) when the sample is removed from training. Positive: the
sample helps. Negative: it hurts.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lightning_influence.recipes import run_recipe
from lightning_influence.recipes.common import output_dir

__all__ = ["run", "output_dir"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe the config selects (``cfg.recipe.name``) and return its report."""
    return run_recipe(cfg)
