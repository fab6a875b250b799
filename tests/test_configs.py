"""Every config of every group composes and instantiates; the structured schemas refuse
misconfiguration at composition or when a recipe starts; the `_target_` nodes (trainer,
callbacks, model, data) are checked against their constructors' signatures; the model's size
follows the data; a user's own app finds the shipped configs through the Hydra search path."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

from lightning_influence.config import (
    RECIPE_SCHEMAS,
    CleaningConfig,
    check_config,
    estimator_params,
    recipe_params,
    register_configs,
)
from lightning_influence.estimators.base import REGISTRY, Estimator, build
from lightning_influence.recipes.trainers import make_trainer, user_callbacks

CONF = "lightning_influence.conf"
GROUPS = ("data", "model", "trainer", "estimator", "recipe", "callbacks", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (files(CONF) / group).iterdir() if p.name.endswith(".yaml"))


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def instantiate_all(cfg: DictConfig, tmp_path: Path) -> None:
    """Check the config as the app does, then instantiate every node the way the recipes do."""
    check_config(cfg)
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
        (["recipe.seeds=[0,-1]"], r"recipe.seeds=\[0, -1\] holds the seed -1, out of range: .*\[0, 4294967295\]"),
        (["recipe=deletion", "recipe.seeds=[4294967296]"], r"holds the seed 4294967296, out of range"),
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
    assert recipe_params(OmegaConf.create({"name": "cleaning", "seeds": [3]}), CleaningConfig).seeds == [3]
    with pytest.raises(ValueError, match=r"recipe.sedes is not a key of recipe \(CleaningConfig\).*did you mean recipe.seeds\?"):
        recipe_params(OmegaConf.create({"name": "cleaning", "sedes": [3]}), CleaningConfig)
    with pytest.raises(ValidationError):  # the schema's types, also for a node composed without it
        recipe_params(OmegaConf.create({"name": "cleaning", "seeds": "three"}), CleaningConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+recipe.remove_fractoin=0.5"], r"recipe.remove_fractoin is not a key of recipe \(CleaningConfig\), so the run would not read it "
         r"\(a key added with \+recipe.remove_fractoin=... is ignored\): did you mean recipe.remove_fraction"),
        (["recipe=deletion", "+recipe.size=[5]"], r"recipe.size is not a key of recipe \(DeletionConfig\).*did you mean recipe.sizes\?"),
        (["recipe=coreset", "+recipe.fractoin=0.3"], r"recipe.fractoin is not a key of recipe \(CoresetConfig\).*did you mean recipe.fraction\?"),
        (["+estimator.mode=online"], r"estimator.mode is not a key of estimator \(EstimatorConfig\).*did you mean estimator.options.mode\?"),
        (["estimator=influence_function", "+estimator.solvr=cg"], r"estimator.solvr .*did you mean estimator.options.solver\?"),
        (["+estimator.optons.mode=online"], r"estimator.optons .*did you mean estimator.options\?"),
        (["+estimator.zzz=1"], r"estimator.zzz is not a key of estimator \(EstimatorConfig\).*its keys are name, options\."),
    ],
)
def test_keys_added_with_plus_to_a_schema_node_are_refused(overrides: list[str], message: str) -> None:
    """Hydra refuses recipe.remove_fractoin=0.5 (not in the schema) and suggests +recipe.remove_fractoin=0.5,
    which composes: the config check and the recipes' readers refuse the key, with the closest keys,
    where it would otherwise be dropped without a word."""
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError, match=message):
        check_config(cfg)
    with pytest.raises(ValueError, match=message):
        if overrides[-1].startswith("+recipe."):
            recipe_params(cfg.recipe, RECIPE_SCHEMAS[cfg.recipe.name])
        else:
            estimator_params(cfg.estimator)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_epochs=abc"], r"trainer.max_epochs='abc' \(a string\) is not accepted by lightning.pytorch.Trainer: its argument "
         r"max_epochs takes an integer or null. Set trainer.max_epochs to such a value \(e.g. trainer.max_epochs=1\)"),
        (["trainer.max_epochs=1.5"], r"trainer.max_epochs=1.5 \(a float\).*an integer or null"),
        (["trainer.max_epochs=true"], r"trainer.max_epochs=True \(a boolean\).*an integer or null"),
        (["trainer.precision=33"], r"trainer.precision=33 .*takes one of 64, 32, 16, .*'32-true'.* or null"),
        (["trainer.devices=[a]"], r"trainer.devices=\['a'\].*a list \(each entry: an integer\), a string or an integer"),
        (["trainer.enable_progress_bar=maybe"], r"enable_progress_bar='maybe'.*true or false or null"),
        (["trainer.logger=csv"], r"trainer.logger='csv'.*a Logger \(a _target_ node\)"),
        (["+trainer.max_epoch=3"], r"trainer.max_epoch is not an argument of lightning.pytorch.Trainer: did you mean max_epochs"),
        (["+trainer.callbacks=[]"], r"trainer.callbacks is not taken from the config.*callbacks.<name>._target_"),
        (["+trainer.max_time={minutes:soon}"], r"trainer.max_time=\{'minutes': 'soon'\}.*a mapping \(each value: an integer\)"),
        (["trainer.logger={_target_:lightning.pytorch.loggers.CSVLogger,save_dir:logs,flush_logs_every_n_steps:often}"],
         r"trainer.logger.flush_logs_every_n_steps='often' .*lightning.pytorch.loggers.CSVLogger.*an integer"),
        (["callbacks=early_stopping", "callbacks.early_stopping.patience=soon"],
         r"callbacks.early_stopping.patience='soon' .*EarlyStopping: its argument patience takes an integer.*patience=3\)"),
        (["callbacks=early_stopping", "+callbacks.early_stopping.patince=1"], r"callbacks.early_stopping.patince .*did you mean patience"),
        (["+callbacks.mine._target_=no_such_pkg.Callback"], r"callbacks.mine._target_='no_such_pkg.Callback' cannot be imported \(ModuleNotFoundError"),
        (["+callbacks.timer._target_=lightning.pytorch.callbacks.Timer", "+callbacks.timer.duration=5"],
         r"callbacks.timer.duration=5 .*a string, a timedelta \(a _target_ node\), a mapping \(each value: an integer\) or null"),
        (["+callbacks.fixed._target_=lightning_influence.data.FixedBatches"], r"callbacks.fixed .*needs the argument batches"),
        (["model.lr=fast"], r"model.lr='fast' .*Classifier: its argument lr takes a number"),
        (["model.hidden=[a]"], r"model.hidden=\['a'\] .*a list \(each entry: an integer\)"),
        (["data.batch_size=big"], r"data.batch_size='big' .*DigitsDataModule: its argument batch_size takes an integer"),
        # a target swapped under a config written for another: every problem in one message
        (["model._target_=lightning_influence.data.FixedBatches"],
         r"model \(lightning_influence.data.FixedBatches\) has \d+ problems: \(1\) model\.\w+ is not an argument of "
         r".*\(2\) model\.\w+ is not an argument of .*needs the argument batches"),
    ],
)
def test_target_nodes_are_checked_against_their_signatures(overrides: list[str], message: str) -> None:
    """Values the Trainer, a callback, the model or the datamodule would refuse late (or, like
    max_epochs=abc, with a bare AssertionError mid-fit) are refused with the key, the value, what is
    expected and a value that fits, from the target's own signature."""
    with pytest.raises(ValueError, match=message):
        check_config(compose_cfg(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer=ddp", "trainer.precision=64", "trainer.devices=auto", "trainer.gradient_clip_val=1", "model.lr=1"],
        ["trainer.devices=[0]", "trainer.logger={_target_:lightning.pytorch.loggers.CSVLogger,save_dir:logs}", "+trainer.max_time={minutes:3}"],
        ["trainer.deterministic=warn", "+trainer.val_check_interval=0.5", "+model.optimizer_options.momentum=0.9", "model.hidden=[16,8]"],
        ["+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint", "+callbacks.ckpt.monitor=val_loss"],
    ],
)
def test_target_node_check_passes_valid_settings(overrides: list[str]) -> None:
    check_config(compose_cfg(*overrides))


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_model_output_size_follows_the_data(data: str, model: str) -> None:
    """Every model config takes its classes from every data config: digits' 10 (its datamodule's
    class attribute), the synthetic data's data.num_classes (here 3, and 12 > the old fixed 10)."""
    declared = "num_classes" in compose_cfg(f"data={data}").data
    for classes in ([3, 12] if declared else [None]):
        cfg = compose_cfg(f"data={data}", f"model={model}", *([f"data.num_classes={classes}"] if declared else []))
        check_config(cfg)
        datamodule = instantiate(cfg.data)
        assert cfg.model.num_classes == datamodule.num_classes == (classes or 10)
        width = cfg.model.in_features if "in_features" in cfg.model else cfg.model.side**2
        assert instantiate(cfg.model)(torch.rand(2, width)).shape == (2, datamodule.num_classes)


@pytest.mark.parametrize("model", [m for m in options("model") if "in_features" in compose_cfg(f"model={m}").model])
def test_model_input_width_follows_the_data(model: str) -> None:
    cfg = compose_cfg("data=synthetic", f"model={model}", "data.num_features=16")
    assert cfg.model.in_features == 16
    check_config(cfg)
    assert compose_cfg(f"model={model}").model.in_features == 64, "the digits' 8x8 features when the data declare none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_classes=5"], r"model.num_classes=5 contradicts the data: their num_classes is 10 "
         r"\(lightning_influence.data.DigitsDataModule.num_classes\).*Drop the model.num_classes override.*data=synthetic data.num_classes=5"),
        (["model=cnn", "model.num_classes=5"], r"model.num_classes=5 contradicts the data"),
        (["data=synthetic", "model.num_classes=5"], r"their num_classes is 10 \(data.num_classes\).*set data.num_classes=5 instead"),
        (["data=synthetic", "data.num_classes=4", "model=logreg", "model.num_classes=10"], r"model.num_classes=10 contradicts the data: their num_classes is 4"),
        (["data=synthetic", "model.in_features=32"], r"model.in_features=32 contradicts the data: their num_features is 64 \(data.num_features\)"),
        (["model=cnn", "data=synthetic", "data.num_features=32"], r"model.side=8 takes 8x8 = 64 inputs.*num_features=32.*square number"),
        (["model=cnn", "data=synthetic", "data.num_features=36"], r"model.side=8 takes 8x8 = 64 inputs.*set model.side=6"),
    ],
)
def test_model_size_contradicting_the_data_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_config(compose_cfg(*overrides))


def test_datamodule_resolver_names_what_is_missing() -> None:
    """A user's datamodule that declares no num_classes: the model config's interpolation says what to set."""
    register_configs()
    cfg = OmegaConf.create({"data": {"_target_": "builtins.dict"}, "model": {"num_classes": "${li.datamodule:num_classes}",
                                                                             "in_features": "${li.datamodule:num_features,64}"}})
    assert cfg.model.in_features == 64
    with pytest.raises(InterpolationResolutionError, match=r"declares no num_classes.*Add data.num_classes"):
        _ = cfg.model.num_classes


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
    assert cfg.recipe.name == "coreset" and cfg.data.seed == 3 and cfg.model.num_classes == 10
    check_config(cfg)
    model = instantiate(cfg.model)
    assert type(model).__name__ == "SmallCNN"
    names = sorted(type(c).__name__ for c in user_callbacks(cfg))
    assert names == ["EarlyStopping", "Timer"]
    trainer = make_trainer(cfg, tmp_path)
    assert {"EarlyStopping", "Timer"} <= {type(c).__name__ for c in trainer.callbacks}
