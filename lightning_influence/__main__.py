"""``python -m lightning_influence [overrides]`` / ``lightning-influence [overrides]``: run a recipe.

The configs ship inside the package (``lightning_influence.conf``), so this works from a clone
(editable install) and from an installed wheel alike. See ``--help`` and ``--cfg job``.
A user's own Hydra app reuses them with ``hydra.searchpath=[pkg://lightning_influence.conf]``.
The config is checked before any training (:func:`lightning_influence.recipes.check_recipe`; a
refused config prints its error without a traceback and exits with status 1), and
what the run prints is also logged to ``<run dir>/lightning-influence.log``
(:func:`lightning_influence.app.run_log`).
"""

from __future__ import annotations

import warnings

import hydra
from omegaconf import DictConfig

from lightning_influence.config import ConfigError, SetupRefused, register_configs

register_configs()


@hydra.main(config_path="pkg://lightning_influence.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lightning_influence.app import run

    # Known, harmless version noise of lightning on recent torch; nothing the user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    try:
        run(cfg)
    except SetupRefused as err:  # the user's model or data, refused by the trial step: no traceback
        raise SystemExit(f"lightning-influence: the one-step trial run refused the model or data, nothing was scored: {err}") from None
    except ConfigError as err:  # the user's input, not the library, is at fault: no traceback
        raise SystemExit(f"lightning-influence: the config is refused, nothing was run: {err}") from None


if __name__ == "__main__":
    main()
