"""Every config of every group composes and instantiates; the structured schemas refuse
misconfiguration at composition or when a recipe starts; a user's own app finds the
shipped configs through the Hydra search path."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import ConfigKeyError, ValidationError

from lightning_influence.config import RECIPE_SCHEMAS, CleaningConfig, estimator_params, recipe_params
from lightning_influence.estimators.base import REGISTRY, Estimator, build
from lightning_influence.recipes.common import make_trainer, user_callbacks

CONF = "lightning_influence.conf"
GROUPS = ("data", "model", "trainer", "estimator", "recipe", "callbacks", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (files(CONF) / group).iterdir() if p.name.endswith(".yaml"))


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def instantiate_all(cfg: DictConfig, tmp_path: Path) -> None:
    """Instantiate every node of a composed config the way the recipes do."""
    data = instantiate(cfg.data)
    assert isinstance(data, L.LightningDataModule)
    model = instantiate(cfg.model)
    assert isinstance(model, L.LightningModule)
    assert model(torch.rand(3, 64)).shape == (3, 10)
    params = estimator_params(cfg.estimator)
    estimator = build(params.name, **params.options)
    assert isinstance(estimator, Estimator) and estimator.name == params.name
    recipe = recipe_params(cfg.recipe, RECIPE_SCHEMAS[cfg.recipe.name])
    assert recipe.name == cfg.recipe.name
    callbacks = user_callbacks(cfg)
    assert all(isinstance(c, L.Callback) for c in callbacks)
    trainer = make_trainer(cfg, tmp_path)
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs


def test_groups_ship_in_the_package() -> None:
    for group in GROUPS:
        assert options(group), group
    assert {"mlp", "logreg", "cnn"} <= set(options("model"))
    assert {"digits", "synthetic"} <= set(options("data"))
    assert {"cleaning", "deletion", "coreset"} == set(options("recipe"))
    assert set(REGISTRY) == set(options("estimator")), "one estimator config per registered estimator"


@pytest.mark.parametrize(("group", "name"), [(g, n) for g in GROUPS for n in options(g)])
def test_every_config_composes_and_instantiates(group: str, name: str, tmp_path: Path) -> None:
    cfg = compose_cfg(f"{group}={name}")
    assert cfg.get(group) is not None or group in ("experiment", "callbacks")
    instantiate_all(cfg, tmp_path)


@pytest.mark.parametrize("recipe", options("recipe"))
@pytest.mark.parametrize("estimator", options("estimator"))
def test_every_estimator_composes_with_every_recipe(recipe: str, estimator: str) -> None:
    cfg = compose_cfg(f"recipe={recipe}", f"estimator={estimator}")
    params = estimator_params(cfg.estimator)
    est = build(params.name, **params.options)
    if "target" in params.options:  # estimators that record for one target get the recipe's
        assert params.options["target"] == cfg.recipe.target.value
    assert isinstance(est, Estimator)


def test_defaults_and_overrides_reach_the_objects(tmp_path: Path) -> None:
    cfg = compose_cfg("model=logreg", "estimator.options.mode=online", "estimator.options.window=16", "data.label_noise=0.2",
                      "data.noise_kind=class_conditional")
    assert list(cfg.model.hidden) == []
    params = estimator_params(cfg.estimator)
    callback = build(params.name, **params.options).callback()
    assert callback.mode == "online" and callback.window == 16 and callback.target == "val"
    data = instantiate(cfg.data)
    assert data.label_noise == 0.2 and data.noise_kind == "class_conditional" and data.seed == cfg.seed
    coreset = compose_cfg("recipe=coreset")
    assert estimator_params(coreset.estimator).options["target"] == "train", "the coreset recipe scores the training target"


@pytest.mark.parametrize(
    "override",
    ["recipe.target=validation", "recipe.remove_fraction=lots", "recipe.no_such_key=1", "recipe.seeds=[a]", "recipe.plots=maybe"],
)
def test_schema_refuses_misconfiguration_at_composition(override: str) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose_cfg(override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["recipe.remove_fraction=1.5"], "remove_fraction"),
        (["recipe.top_fractions=[0.1,0]"], "top_fractions"),
        (["recipe.seeds=[]"], "seed"),
        (["recipe.seeds=[1,1]"], "repeated"),
        (["recipe=coreset", "recipe.fraction=0"], "fraction"),
        (["recipe=deletion", "recipe.lds_subsets=2"], "lds_subsets"),
        (["recipe=deletion", "recipe.sizes=[0]"], "sizes"),
        (["recipe=deletion", "recipe.sizes=[5,10,5]"], r"recipe.sizes has repeated sizes 5 in \[5, 10, 5\]"),
        (["recipe=deletion", "recipe.kinds=[harmful,random,harmful]"], r"recipe.kinds has repeated kinds harmful"),
        (["recipe.top_fractions=[0.1,0.1]"], r"recipe.top_fractions has repeated"),
    ],
)
def test_schema_refuses_bad_values_before_training(overrides: list[str], message: str) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError, match=message):
        recipe_params(cfg.recipe, RECIPE_SCHEMAS[cfg.recipe.name])


def test_unknown_estimator_name_is_refused_with_the_choices() -> None:
    cfg = compose_cfg("estimator.name=diffinn")
    with pytest.raises(ValueError, match="not registered; choose one of"):
        estimator_params(cfg.estimator)


def test_recipe_params_checks_a_plain_user_node() -> None:
    from omegaconf import OmegaConf

    assert recipe_params(OmegaConf.create({"name": "cleaning", "seeds": [3]}), CleaningConfig).seeds == [3]
    with pytest.raises(ConfigKeyError):
        recipe_params(OmegaConf.create({"name": "cleaning", "sedes": [3]}), CleaningConfig)


def test_user_app_finds_the_shipped_configs_through_the_search_path(tmp_path: Path) -> None:
    """A user's own Hydra app: its config dir, the library's groups via hydra.searchpath, its own
    callbacks and a `_target_` override of the model."""
    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - data: digits\n  - model: mlp\n  - trainer: cpu\n  - estimator: diffin\n  - recipe: coreset\n"
        "  - callbacks: early_stopping\n  - _self_\n"
        "hydra:\n  searchpath:\n    - pkg://lightning_influence.conf\n"
        "seed: 3\nnum_threads: 1\noutput_dir: null\n"
        "callbacks:\n  timer:\n    _target_: lightning.pytorch.callbacks.Timer\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model._target_=lightning_influence.models.SmallCNN", "~model.in_features", "~model.hidden"])
    assert cfg.recipe.name == "coreset" and cfg.data.seed == 3
    model = instantiate(cfg.model)
    assert type(model).__name__ == "SmallCNN"
    names = sorted(type(c).__name__ for c in user_callbacks(cfg))
    assert names == ["EarlyStopping", "Timer"]
    trainer = make_trainer(cfg, tmp_path)
    assert {"EarlyStopping", "Timer"} <= {type(c).__name__ for c in trainer.callbacks}
