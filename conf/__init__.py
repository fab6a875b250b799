"""Hydra configs of lightning-influence, shipped as the package ``lightning_influence.conf``.

Importing it registers the structured-config schemas (:mod:`lightning_influence.config`), which
the recipe and estimator YAML files extend; Hydra imports it when it reads the configs, also
from a user's app with ``hydra.searchpath=[pkg://lightning_influence.conf]``."""

from lightning_influence.config import register_configs

register_configs()
