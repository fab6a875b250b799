"""Structured-config schemas of the recipes and the estimator group, registered in Hydra's
ConfigStore so that a misspelt key, a wrong type or an unknown choice is refused when the
config is composed (before any training), and out-of-range values when the run starts, before
anything is set up (:func:`check_config`, and the recipe itself, call :func:`recipe_params`, which
runs each schema's ``__post_init__``). Composing does not check ranges: ``--cfg job`` prints
them; a multirun checks every job's config before its first job runs (:mod:`lightning_influence.sweep`).

The YAML files of ``lightning_influence.conf`` extend these schemas through their defaults
lists (``recipe/cleaning.yaml`` starts from ``cleaning_schema``, every ``estimator/*.yaml``
from ``estimator_schema``). :func:`register_configs` runs when the config package is imported,
so it is in place for ``python -m lightning_influence`` and for a user's own Hydra app that
adds ``hydra.searchpath=[pkg://lightning_influence.conf]``. It also registers the resolver
``${li.datamodule:<name>[,<default>]}`` (:func:`data_property`), through which the model configs
take their output size (``num_classes``) and input width (``in_features``) from the data config.

The ``_target_`` groups (``data``, ``model``, ``trainer``, ``callbacks`` and any node with a
``_target_``) have no schema of their own: :func:`check_config` checks each node's values
against the signature and type annotations of the constructor it names (a misspelt key, a
value of a type the annotation does not admit, a missing required argument) and that the
model's sizes agree with the data, before any training (:func:`lightning_influence.app.run`
calls it first).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from os import PathLike
from pathlib import PurePath
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_influence.validation import SEED_RANGE, check_fraction, check_seed, did_you_mean

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "RecipeTarget",
    "DeletionKind",
    "RetrainingMode",
    "EstimatorConfig",
    "CleaningConfig",
    "DeletionConfig",
    "CoresetConfig",
    "RECIPE_SCHEMAS",
    "register_configs",
    "SEED_RANGE",
    "check_schema_keys",
    "estimator_option_names",
    "check_estimator_keys",
    "check_schema_nodes",
    "recipe_params",
    "estimator_params",
    "check_estimator_target",
    "estimator_defaults",
    "effective_estimator_options",
    "DATA_LINKED_MODEL_KEYS",
    "data_property",
    "check_target_node",
    "check_data_and_model",
    "check_top_level",
    "check_output_dir",
    "in_multirun",
    "check_config",
]


class ConfigError(ValueError):
    """A config refused by its checks before anything was set up or trained
    (:func:`lightning_influence.app.run`); the message names the key, the value and the fix.
    The command line prints it without a traceback and exits with status 1."""


class ConfigTypeError(ConfigError, TypeError):
    """A :class:`ConfigError` for a value of the wrong type (e.g. a non-integer seed); still a
    ``TypeError`` for callers that catch that."""


class SetupRefused(ConfigError):
    """The configured model or datamodule, run for one trial step before the scoring fit (a
    recipe's preflight), was refused: a metric it does not log, a method it lacks, sample ids that
    are not positions, ... Like a refused config, printed without a traceback (the run's log has
    it); the trial step trains nothing and writes no result."""


class SetupTypeRefused(SetupRefused, TypeError):
    """A :class:`SetupRefused` for a missing method or a value of the wrong type."""


def refused_config(err: ValueError | TypeError, *, setup: bool = False) -> ConfigError:
    """``err``, raised by a config check, as the :class:`ConfigError` (or :class:`ConfigTypeError`)
    with the same message; ``setup``: raised while a recipe's trial step checked the model and
    data, as a :class:`SetupRefused` (or :class:`SetupTypeRefused`)."""
    if isinstance(err, ConfigError):
        return err
    kinds = (SetupTypeRefused, SetupRefused) if setup else (ConfigTypeError, ConfigError)
    return (kinds[0] if isinstance(err, TypeError) else kinds[1])(str(err))


class RecipeTarget(Enum):
    """What the scores are about: the mean validation loss or the mean training loss (self influence)."""

    val = "val"
    train = "train"


class DeletionKind(Enum):
    """How a deletion set is picked: the lowest scores, the highest scores, or at random."""

    harmful = "harmful"
    helpful = "helpful"
    random = "random"


class RetrainingMode(Enum):
    """``trajectory``: re-run the recorded steps without the set (same initial weights and batches,
    the quantity the scores predict). ``fresh``: new Trainer runs on the kept data, one per seed."""

    trajectory = "trajectory"
    fresh = "fresh"


def _check_distinct(name: str, values: list[Any], what: str) -> None:
    plain = [v.value if isinstance(v, Enum) else v for v in values]
    repeated = sorted({str(v) for v in plain if plain.count(v) > 1})
    if repeated:
        raise ValueError(f"{name} has repeated {what} {', '.join(repeated)} in {plain}: each must differ (a repeat only repeats rows)")


def _check_seeds(name: str, seeds: list[int]) -> None:
    if len(seeds) == 0:
        raise ValueError(f"{name} needs at least one retraining seed, e.g. {name}=[0,1,2]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{name} has repeated seeds {list(seeds)}: each retraining seed must differ")
    for seed in seeds:
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ValueError(
                f"{name}={list(seeds)} holds the seed {seed}, out of range: each retraining seed must be an integer in "
                f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}] (numpy's range, which lightning.seed_everything seeds), e.g. {name}=[0,1,2]"
            )


@dataclass
class EstimatorConfig:
    """``name``: a registry name (:func:`lightning_influence.estimators.available`); ``options``:
    keyword arguments of the estimator's constructor."""

    name: str = "diffin"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lightning_influence.estimators.base import REGISTRY

        if self.name not in REGISTRY:
            raise ValueError(f"estimator.name={self.name!r} is not registered; choose one of {', '.join(sorted(REGISTRY))}")


@dataclass
class CleaningConfig:
    """Find flipped labels, remove the most harmful samples, retrain and compare.

    ``remove_count`` (when set) or ``remove_fraction`` of the training set is removed by each
    ranking; ``seeds``: one fresh retraining per seed and condition; ``metric``: the test metric
    the module logs (e.g. ``test_acc``)."""

    name: str = "cleaning"
    target: RecipeTarget = RecipeTarget.val
    target_samples: Optional[int] = None
    top_fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    remove_fraction: float = 0.1
    remove_count: Optional[int] = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    metric: str = "test_acc"
    top_k: int = 10
    plots: bool = True

    def __post_init__(self) -> None:
        for f in self.top_fractions:
            check_fraction("recipe.top_fractions entries", f, include_one=True)
        _check_distinct("recipe.top_fractions", list(self.top_fractions), "fractions")
        check_fraction("recipe.remove_fraction", self.remove_fraction, include_one=False)
        if self.remove_count is not None and self.remove_count < 1:
            raise ValueError(f"recipe.remove_count must be >= 1 or null (then remove_fraction is used), got {self.remove_count}")
        if self.target_samples is not None and self.target_samples < 1:
            raise ValueError(f"recipe.target_samples must be >= 1 or null, got {self.target_samples}")
        if self.top_k < 1:
            raise ValueError(f"recipe.top_k must be >= 1, got {self.top_k}")
        _check_seeds("recipe.seeds", self.seeds)


@dataclass
class DeletionConfig:
    """Delete sets picked by score, predict the target change (sum of the set's scores, units of
    the target loss), retrain without each set and compare. ``lds_subsets`` > 0 adds the linear
    datamodeling score over that many random subsets keeping ``lds_keep_fraction``."""

    name: str = "deletion"
    target: RecipeTarget = RecipeTarget.val
    target_samples: Optional[int] = None
    sizes: list[int] = field(default_factory=lambda: [10, 30, 100])
    kinds: list[DeletionKind] = field(default_factory=lambda: [DeletionKind.harmful, DeletionKind.helpful, DeletionKind.random])
    retraining: RetrainingMode = RetrainingMode.trajectory
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lds_subsets: int = 0
    lds_keep_fraction: float = 0.5
    plots: bool = True

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"recipe.sizes must be a non-empty list of positive set sizes, got {list(self.sizes)}")
        _check_distinct("recipe.sizes", list(self.sizes), "sizes")
        if not self.kinds:
            raise ValueError("recipe.kinds must name at least one of harmful, helpful, random")
        _check_distinct("recipe.kinds", list(self.kinds), "kinds")
        if self.lds_subsets != 0 and self.lds_subsets < 3:
            raise ValueError(f"recipe.lds_subsets must be 0 (off) or >= 3, got {self.lds_subsets}")
        check_fraction("recipe.lds_keep_fraction", self.lds_keep_fraction, include_one=False)
        if self.target_samples is not None and self.target_samples < 1:
            raise ValueError(f"recipe.target_samples must be >= 1 or null, got {self.target_samples}")
        _check_seeds("recipe.seeds", self.seeds)


@dataclass
class CoresetConfig:
    """Keep ``fraction`` of the training set, the highest scores first (more worth keeping),
    per class when ``class_balanced``; retrain on it once per seed; report the test metric."""

    name: str = "coreset"
    target: RecipeTarget = RecipeTarget.train
    target_samples: Optional[int] = None
    fraction: float = 0.5
    class_balanced: bool = False
    # "epochs": retrain for the trainer's max_epochs (fewer optimizer steps on a smaller coreset);
    # "steps": retrain for as many optimizer steps as the scoring fit (max_epochs x its steps per
    # epoch), in epochs of ceil(kept / batch size) steps over the coreset (rounded up).
    budget: str = "epochs"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    metric: str = "test_acc"
    plots: bool = True

    def __post_init__(self) -> None:
        check_fraction("recipe.fraction", self.fraction, include_one=True)
        if self.budget not in ("epochs", "steps"):
            raise ValueError(f"recipe.budget must be 'epochs' or 'steps', got {self.budget!r}")
        if self.target_samples is not None and self.target_samples < 1:
            raise ValueError(f"recipe.target_samples must be >= 1 or null, got {self.target_samples}")
        _check_seeds("recipe.seeds", self.seeds)


RECIPE_SCHEMAS: dict[str, type] = {"cleaning": CleaningConfig, "deletion": DeletionConfig, "coreset": CoresetConfig}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): ``recipe/<name>_schema`` and
    ``estimator/estimator_schema``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, schema in RECIPE_SCHEMAS.items():
        cs.store(group="recipe", name=f"{name}_schema", node=schema)
    cs.store(group="estimator", name="estimator_schema", node=EstimatorConfig)
    OmegaConf.register_new_resolver("li.datamodule", _datamodule_resolver, replace=True)


def _schema_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def check_schema_keys(node: DictConfig | Mapping[str, Any], schema: type, where: str, elsewhere: Mapping[str, str] | None = None) -> None:
    """Refuse keys of ``node`` that are not fields of the dataclass ``schema``, naming the closest
    fields as ``<where>.<field>``. Hydra refuses a misspelt key of a schema node when the config is
    composed, and its message suggests ``+<where>.<key>=...``, which adds the key all the same
    (``+`` opens the schema); :func:`OmegaConf.to_object` then drops it without a word. So the
    recipes (:func:`recipe_params`, :func:`estimator_params`) and :func:`check_config` check the
    keys themselves. ``elsewhere``: keys that belong in another node, with their path there
    (``mode`` -> ``estimator.options.mode``), suggested first."""
    fields = _schema_fields(schema)
    for key in node.keys():
        key = str(key)
        if key in fields:
            continue
        other = dict(elsewhere or {})
        hints = [other[key]] if key in other else []
        hints += [f"{where}.{f}" for f in difflib.get_close_matches(key, fields, n=3, cutoff=0.6)]
        if not hints:
            hints = [other[k] for k in difflib.get_close_matches(key, list(other), n=3, cutoff=0.6)]
        hint = f"did you mean {' or '.join(dict.fromkeys(hints))}?" if hints else f"its keys are {', '.join(fields)}."
        raise ValueError(
            f"{where}.{key} is not a key of {where} ({schema.__name__}), so the run would not read it (a key added with "
            f"+{where}.{key}=... is ignored): {hint} Fix the spelling (without +), or remove the key (~{where}.{key} on the "
            "command line)"
        )


def recipe_params(node: DictConfig, schema: type) -> Any:
    """The recipe node as its schema's dataclass, validated (ranges, choices). A key the schema
    does not have (misspelt, or added with ``+``) is refused with the closest keys
    (:func:`check_schema_keys`); a node composed without the schema (a user's own YAML) is merged
    onto it, so that its types are checked too."""
    check_schema_keys(node, schema, "recipe")
    if OmegaConf.get_type(node) is not schema:
        node = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(node)


def estimator_option_names(node: DictConfig | Mapping[str, Any]) -> list[str]:
    """The options the estimator node could mean: those its config sets (the shipped configs list
    them all; DiffIn's class takes ``**options``) and the keyword arguments of the estimator class
    it names (where the name is registered and its module imports)."""
    options = node.get("options")
    names = [str(k) for k in options.keys()] if isinstance(options, (DictConfig, Mapping)) else []
    try:
        from lightning_influence.estimators.base import estimator_class

        params = _parameters(estimator_class(str(node.get("name"))).__init__) or {}
    except Exception:  # an unregistered name (refused with the choices) or a missing optional dependency
        params = {}
    kinds = inspect.Parameter
    names += [n for n, p in params.items() if n != "self" and p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    return list(dict.fromkeys(names))


def check_estimator_keys(node: DictConfig | Mapping[str, Any]) -> None:
    """Refuse keys of the estimator node other than ``name`` and ``options`` (e.g. ``+estimator.mode=online``),
    suggesting ``estimator.options.<key>`` where the key is one of the estimator's options."""
    check_schema_keys(node, EstimatorConfig, "estimator", {n: f"estimator.options.{n}" for n in estimator_option_names(node)})


def estimator_params(node: DictConfig) -> EstimatorConfig:
    """The estimator node as a validated :class:`EstimatorConfig` with plain-Python options
    (interpolations resolved, enums as their names). A key other than ``name`` and ``options``
    is refused (:func:`check_estimator_keys`)."""
    check_estimator_keys(node)
    raw = node.get("options")
    options = {} if raw is None else OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    if not isinstance(options, dict):
        raise TypeError(f"estimator.options must be a mapping of constructor arguments, got {type(options).__name__}")
    return EstimatorConfig(name=str(node.name), options=dict(options))


_ABSENT = object()


def estimator_defaults(name: str) -> dict[str, tuple[Any, str]]:
    """The default of each option of the estimator registered under ``name``, with whose default
    it is: its constructor's keyword defaults and, for an estimator whose ``**options`` are its
    callback's arguments (:attr:`~lightning_influence.estimators.base.Estimator.options_from`:
    DiffIn, TracIn), the callback constructor's (``{"target": ("val", "DiffIn"), ...}``). Empty
    where the name is not registered or its module does not import (refused elsewhere)."""
    try:
        from lightning_influence.estimators.base import estimator_class

        cls = estimator_class(name)
    except Exception:  # an unregistered name (refused with the choices) or a missing optional dependency
        return {}
    defaults: dict[str, tuple[Any, str]] = {}
    for owner in (getattr(cls, "options_from", None), cls):
        if owner is None:
            continue
        for key, param in (_parameters(owner.__init__) or {}).items():
            if key != "self" and param.default is not _EMPTY and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                defaults.setdefault(key, (param.default, owner.__name__))
    return defaults


def effective_estimator_options(estimator: EstimatorConfig) -> dict[str, tuple[Any, str | None]]:
    """What each option of the estimator will be: ``(value, None)`` for the options its config
    sets, ``(default, "<class>")`` for those it leaves to a constructor default
    (:func:`estimator_defaults`)."""
    result: dict[str, tuple[Any, str | None]] = {k: (v, owner) for k, (v, owner) in estimator_defaults(estimator.name).items()}
    result.update({str(k): (v, None) for k, v in estimator.options.items()})
    return result


def check_estimator_target(
    estimator: EstimatorConfig, target: RecipeTarget | str, target_samples: int | None = None, seed: int | None = None
) -> None:
    """Refuse, before any training, estimator options that contradict the recipe: a recording
    estimator's ``target`` (what it records for during fit) other than ``recipe.target`` (what the
    recipe scores and measures), its ``target_samples`` other than ``recipe.target_samples`` (a
    subset where the recipe wants the whole target counts, and the other way round), and, with a
    subset, its ``seed`` (which draws the subset) other than the recipe's ``seed``. The values
    compared are the ones the estimator will use: the options its config sets, else its (or its
    callback's) constructor defaults (:func:`effective_estimator_options`): an estimator config
    without ``options.target`` records for DiffIn's default ``val``. The shipped estimator configs
    follow the recipe's values (``target: ${recipe.target}``, ...)."""
    wanted = target.value if isinstance(target, Enum) else str(target)
    effective = effective_estimator_options(estimator)
    name = estimator.name
    value, default_of = effective.get("target", (_ABSENT, None))
    if value is not _ABSENT and value is not None and str(value) != wanted:
        if default_of is None:
            raise ValueError(
                f"estimator.options.target={value} contradicts recipe.target={wanted}: the {name} estimator would "
                f"record its scores for the {value} target while the recipe asks for (and measures) the {wanted} target. "
                f"Set recipe.target={value} to score that target, or drop the estimator.options.target override "
                "(its config follows recipe.target)"
            )
        raise ValueError(
            f"the {name} estimator would record its scores for the {value} target (the default of {default_of}'s target: "
            f"the estimator config sets no estimator.options.target) while recipe.target={wanted} asks for (and measures) "
            f"the {wanted} target. Add +estimator.options.target={wanted} on the command line (or, in the estimator's "
            "config file, options.target: ${recipe.target}, as the shipped configs do), or set "
            f"recipe.target={value} to score that target"
        )
    count, count_default_of = effective.get("target_samples", (_ABSENT, None))
    if count is _ABSENT or isinstance(count, bool) or not isinstance(count, (int, type(None))):
        return  # no such option, or a value of the wrong type: building the estimator refuses it with its own message
    recipe_count = None if target_samples is None else int(target_samples)
    estimator_count = None if count is None else int(count)
    if estimator_count != recipe_count:
        shown = "null" if estimator_count is None else estimator_count
        wanted_count = "null" if recipe_count is None else recipe_count
        what = "the whole target" if estimator_count is None else f"a random subset of {estimator_count} target samples"
        asked = "the whole target" if recipe_count is None else f"a subset of {recipe_count}"
        if count_default_of is not None:
            raise ValueError(
                f"the {name} estimator would record its scores against {what} (the default of {count_default_of}'s "
                f"target_samples: the estimator config sets no estimator.options.target_samples) while "
                f"recipe.target_samples={wanted_count} asks for {asked}. Add +estimator.options.target_samples={wanted_count} "
                "on the command line (or, in the estimator's config file, options.target_samples: ${recipe.target_samples}, "
                "as the shipped configs do)"
            )
        fix = (
            "Set recipe.target_samples only (the estimator's config follows it)" if recipe_count is not None and estimator_count is not None
            else f"Set recipe.target_samples={shown} to score against that subset, or drop the estimator.options.target_samples "
            "override (its config follows recipe.target_samples)" if recipe_count is None
            else f"Set estimator.options.target_samples={wanted_count} (or drop the override: the shipped configs follow "
            "recipe.target_samples)"
        )
        raise ValueError(
            f"estimator.options.target_samples={shown} contradicts recipe.target_samples={wanted_count}: the estimator would "
            f"score against {what} while the recipe asks for (and measures) {asked}. {fix}"
        )
    drawn, seed_default_of = effective.get("seed", (_ABSENT, None))
    if recipe_count is None or seed is None or drawn is _ABSENT or drawn is None:
        return
    if isinstance(drawn, int) and not isinstance(drawn, bool) and drawn != int(seed):
        source = (
            f"the default of {seed_default_of}'s seed: the estimator config sets no estimator.options.seed"
            if seed_default_of is not None else f"estimator.options.seed={drawn}"
        )
        raise ValueError(
            f"the {name} estimator would draw its subset of recipe.target_samples={recipe_count} target samples with "
            f"seed={drawn} ({source}) while the recipe measures on the subset drawn with seed={seed}: two different "
            f"subsets. {'Add +' if seed_default_of is not None else 'Set '}estimator.options.seed={seed} on the command "
            "line (or options.seed: ${seed} in the estimator's config file, as the shipped configs do)"
        )


# ---------------------------------------------------------------------- _target_ nodes
#: Keys that Hydra's ``instantiate`` reads itself: never constructor arguments.
_HYDRA_KEYS = frozenset({"_target_", "_convert_", "_recursive_", "_partial_", "_args_"})

#: Model arguments that must equal a property of the training data: model key -> the data's name
#: for it (see :func:`data_property`). The shipped model configs interpolate them with
#: ``${li.datamodule:<name>}``, and :func:`check_data_and_model` refuses an override that differs.
DATA_LINKED_MODEL_KEYS: dict[str, str] = {"num_classes": "num_classes", "in_features": "num_features"}

#: Constructor arguments the recipes pass themselves, per config node, with where a user sets them.
_SET_BY_RECIPES: dict[str, dict[str, str]] = {
    "trainer": {
        "callbacks": "the recipes pass the callbacks group's callbacks (and the estimator's) to every Trainer; "
        "add yours as callbacks.<name>._target_=... (+callbacks.<name>._target_=... on the command line)"
    },
}

_NO_DEFAULT = object()
_EMPTY = inspect.Parameter.empty
_NONE_TYPE = type(None)


def _get_object(target: str) -> Any:
    """What the dotted path ``target`` names (Hydra's lookup, without its error log line: the caller
    reports the failure)."""
    from hydra.utils import get_object

    log = logging.getLogger("hydra.utils")
    disabled, log.disabled = log.disabled, True
    try:
        return get_object(target)
    finally:
        log.disabled = disabled


def _parameters(obj: Any) -> dict[str, inspect.Parameter] | None:
    """The parameters of ``obj``'s signature (a class: its constructor's); ``None`` where Python cannot tell."""
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return None


def _annotations(obj: Any) -> dict[str, Any]:
    """The evaluated type annotations of ``obj``'s parameters (a class: its ``__init__``'s). Where they
    cannot all be evaluated (names imported for type checkers only), the ones that are not strings."""
    try:
        return get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
    except Exception:  # NameError, TypeError, ...: whatever evaluating foreign annotations raises
        params = _parameters(obj) or {}
        return {n: p.annotation for n, p in params.items() if p.annotation is not _EMPTY and not isinstance(p.annotation, str)}


def data_property(data: Any, name: str) -> tuple[Any, str] | None:
    """The training data's ``name`` (e.g. ``num_classes``) and where it was read: the data config's
    key ``name``, else the default of the datamodule constructor's argument ``name``, else a
    number or string class attribute of the datamodule (``DigitsDataModule.num_classes``).
    ``None`` where the data declare none."""
    if not isinstance(data, DictConfig):
        return None
    if name in data:
        return data[name], f"data.{name}"
    target = data.get("_target_")
    if not isinstance(target, str):
        return None
    try:
        cls = _get_object(target)
    except Exception:  # an unimportable _target_ is reported by check_target_node
        return None
    param = (_parameters(cls) or {}).get(name)
    if param is not None and param.default is not _EMPTY and param.default is not None:
        return param.default, f"the default of {target}({name}=...)"
    value = getattr(cls, name, None)
    if isinstance(value, (int, float, str)):
        return value, f"{target}.{name}"
    return None


def _datamodule_resolver(name: str, default: Any = _NO_DEFAULT, *, _root_: DictConfig) -> Any:
    """``${li.datamodule:<name>[,<default>]}``: :func:`data_property` of the config's ``data`` node,
    else ``default``."""
    found = data_property(_root_.get("data"), name)
    if found is not None:
        return found[0]
    if default is not _NO_DEFAULT:
        return default
    raise ValueError(
        f"${{li.datamodule:{name}}}: the data config declares no {name} (no key data.{name}, and its _target_ has no "
        f"{name} argument default or class attribute). Add data.{name} to the data config, or set the value explicitly"
    )


def _is_target(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _is_class(tp: Any) -> bool:
    return isinstance(tp, type)


def _accepts(value: Any, tp: Any) -> bool:
    """Can the plain config value ``value`` (as ``OmegaConf.to_container`` gives it) be passed where
    ``tp`` is annotated? A ``_target_`` node is instantiated first, so it passes (it is checked
    on its own); an annotation this cannot read accepts anything."""
    if tp is Any or tp is _EMPTY or _is_target(value):
        return True
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _accepts(value, args[0])
    if origin is Union or origin is types.UnionType:
        return any(_accepts(value, a) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hasattr(tp, "__supertype__"):  # typing.NewType
        return _accepts(value, tp.__supertype__)
    if tp is None or tp is _NONE_TYPE:
        return value is None
    if value is None:
        return False
    container = origin if origin is not None else tp
    if not _is_class(container):
        return True  # TypeVar, ForwardRef, a string annotation, ...
    if isinstance(value, list) and (container in (tuple, set, frozenset) or issubclass(list, container)):
        if container is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            return len(args) == len(value) and all(_accepts(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_accepts(v, args[0]) for v in value)
    if isinstance(value, dict) and issubclass(container, Mapping):
        return len(args) != 2 or all(_accepts(k, args[0]) and _accepts(v, args[1]) for k, v in value.items())
    if args:  # list[int], Iterable[Logger], Callable[...], type[X]: no plain value but the containers above
        return False
    if container is float or container is complex:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if container is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if issubclass(container, (PurePath, PathLike)):
        return isinstance(value, (str, PurePath))
    if issubclass(container, Enum):
        return isinstance(value, container) or value in container.__members__ or value in [m.value for m in container]
    try:
        return isinstance(value, container)
    except TypeError:  # a protocol that is not runtime-checkable
        return True


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _join(parts: list[str]) -> str:
    unique = list(dict.fromkeys(parts))
    return unique[0] if len(unique) == 1 else f"{', '.join(unique[:-1])} or {unique[-1]}"


def _describe(tp: Any) -> str:
    """What ``tp`` admits, in the words of a config value: ``an integer or null``, ``one of ...``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is _EMPTY:
        return "any value"
    if origin is Annotated:
        return _describe(args[0])
    if origin is Union or origin is types.UnionType:
        literals = [v for a in args if get_origin(a) is Literal for v in get_args(a)]
        others = [_describe(a) for a in args if get_origin(a) is not Literal]
        return _join(([_describe(Literal[tuple(literals)])] if literals else []) + others)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is None or tp is _NONE_TYPE:
        return "null"
    container = origin if origin is not None else tp
    if not _is_class(container):
        return str(tp)
    if issubclass(container, Mapping):
        return f"a mapping (each value: {_describe(args[1])})" if len(args) == 2 else "a mapping"
    if container in (tuple, set, frozenset) or issubclass(list, container):
        return f"a list (each entry: {_describe(args[0])})" if args else "a list"
    words = {bool: "true or false", int: "an integer", float: "a number", complex: "a number", str: "a string"}
    if container in words:
        return words[container]
    if issubclass(container, (PurePath, PathLike)):
        return "a path"
    if issubclass(container, Enum):
        return "one of " + ", ".join(container.__members__)
    return f"{_article(container.__name__)} (a _target_ node)"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"{_article(type(value).__name__)}"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else _article(type(value).__name__)


def _as_override(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _example(tp: Any, default: Any) -> str | None:
    """A value ``tp`` admits, for the message: the argument's own default where it is a plain
    non-null value, else a value of the first kind the annotation admits."""
    if isinstance(default, (bool, int, float, str)) and _accepts(default, tp):
        return _as_override(default)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _example(args[0], _EMPTY)
    if origin is Union or origin is types.UnionType:
        return next((e for e in (_example(a, _EMPTY) for a in args if a is not _NONE_TYPE) if e is not None), None)
    if origin is Literal:
        return _as_override(args[0]) if args else None
    return {bool: "true", int: "1", float: "0.5"}.get(tp)


def _nested_targets(value: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The ``_target_`` nodes in a plain config value, with their paths."""
    if _is_target(value):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _nested_targets(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nested_targets(item, f"{where}[{i}]")


def check_target_node(node: DictConfig | Mapping[str, Any], where: str, set_elsewhere: Mapping[str, str] | None = None) -> None:
    """Refuse, before anything is instantiated, what the callable that ``node._target_`` names would
    refuse only when called, or take and fail with later: a key that is none of its arguments
    (naming the closest ones), a value that its type annotation does not admit (naming the value,
    what is expected and a value that fits), a required argument the node does not set, and an
    argument in ``set_elsewhere`` (passed by the recipes themselves, with where the user sets it).
    ``where``: the node's path in the config (``trainer``, ``callbacks.early_stopping``), named in
    every message. ``_target_`` nodes among the values are checked in turn. Arguments without a
    type annotation take any value; a callable without a readable signature is not checked. Every
    problem of the node is named in one error (a config swapped to another ``_target_`` has several)."""
    values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True) if isinstance(node, DictConfig) else dict(node)
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else values
    assert isinstance(values, dict) and isinstance(raw, dict)
    target = values.get("_target_")
    if not isinstance(target, str) or not target:
        raise ValueError(f"{where}._target_ must be the dotted import path of a class or function, got {target!r}")
    try:
        obj = _get_object(target)
    except Exception as err:  # ImportError, AttributeError, ...: whatever importing its module raises
        cause = err.__cause__ or err
        raise ValueError(
            f"{where}._target_={target!r} cannot be imported ({type(cause).__name__}: {cause}). Check its spelling, "
            "and that its module is installed or on PYTHONPATH"
        ) from err
    params = _parameters(obj)
    if params is None:
        return
    hints = _annotations(obj)
    kinds = inspect.Parameter
    any_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params.values())
    keyword = {n: p for n, p in params.items() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    positional = [p for p in params.values() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    given: dict[str, tuple[str, Any]] = {}
    args = values.get("_args_") or []
    if len(args) > len(positional) and not any(p.kind is kinds.VAR_POSITIONAL for p in params.values()):
        raise ValueError(
            f"{where}._args_ has {len(args)} entries but {target} takes at most {len(positional)} positional arguments"
        )
    for i, value in enumerate(args[: len(positional)]):
        given[positional[i].name] = (f"{where}._args_[{i}]", value)
    elsewhere = set_elsewhere or {}
    problems: list[str] = []  # every key's problem at once: a config swapped to another target has several
    for key, value in values.items():
        if key in _HYDRA_KEYS:
            continue
        if key in elsewhere:
            problems.append(
                f"{where}.{key} is not taken from the config: {elsewhere[key]}. Remove it (~{where}.{key} on the command line)"
            )
        elif key in keyword:
            given[key] = (f"{where}.{key}", value)
        elif not any_keyword:
            hint = did_you_mean(key, keyword, f"its arguments are {', '.join(keyword) or 'none'}.")
            problems.append(
                f"{where}.{key} is not an argument of {target}: {hint} Fix the spelling, or remove the key "
                f"(~{where}.{key} on the command line)"
            )
    for name, (path, value) in given.items():
        tp = hints.get(name, _EMPTY)
        if not _accepts(value, tp):
            expected = _describe(tp)
            example = _example(tp, params[name].default)
            source = raw.get(name) if path == f"{where}.{name}" else None
            via = f", from {source}" if isinstance(source, str) and "${" in source else ""
            problems.append(
                f"{path}={value!r} ({_kind(value)}{via}) is not accepted by {target}: its argument {name} takes {expected}. "
                f"Set {path}{' or what it interpolates' if via else ''} to such a value"
                f"{f' (e.g. {path}={example})' if example is not None else ''}, on the command line or in the config file"
            )
    if not values.get("_partial_", False):
        missing = [n for n, p in params.items() if p.default is _EMPTY and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
                   and n not in given and n not in elsewhere]
        if missing:
            problems.append(
                f"{where} ({target}) needs the argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which the config "
                f"does not set: add {' and '.join(f'{where}.{n}' for n in missing)} "
                f"(+{where}.{missing[0]}=<value> on the command line)"
            )
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{where} ({target}) has {len(problems)} problems: " + "; ".join(f"({k}) {p}" for k, p in enumerate(problems, 1)))
    for name, (path, value) in given.items():
        if (name == "seed" or name.endswith("_seed")) and isinstance(value, int):
            check_seed(path, value)  # seeds generators that refuse negative or 64-bit values, mid-setup
        if values.get("_recursive_", True):
            for inner_where, inner in _nested_targets(value, path):
                check_target_node(inner, inner_where)


def check_data_and_model(cfg: DictConfig) -> None:
    """Refuse a model whose size contradicts the data: each key of :data:`DATA_LINKED_MODEL_KEYS`
    that the model config sets must equal the data's value, where the data declare one
    (:func:`data_property`). The shipped model configs follow the data (``${li.datamodule:...}``),
    so a contradiction comes from an override of the model's key."""
    model, data = cfg.get("model"), cfg.get("data")
    if not isinstance(model, DictConfig) or not isinstance(data, DictConfig):
        return
    for model_key, data_key in DATA_LINKED_MODEL_KEYS.items():
        if model_key not in model:
            continue
        found = data_property(data, data_key)
        value = model[model_key]
        if found is None or value == found[0]:
            continue
        wanted, source = found
        change = (
            f"set data.{data_key}={value} instead" if source == f"data.{data_key}"
            else f"use a data config with {data_key}={value} (e.g. data=synthetic data.{data_key}={value})"
        )
        raise ValueError(
            f"model.{model_key}={value} contradicts the data: their {data_key} is {wanted} ({source}), and the model's "
            f"{model_key} must equal it. Drop the model.{model_key} override (the shipped model configs take it from the "
            f"data: ${{li.datamodule:{data_key}}}); to train with {value}, {change}"
        )
    side = model.get("side")
    found = data_property(data, "num_features") if isinstance(side, int) else None
    if found is not None and side * side != found[0]:
        root = math.isqrt(found[0])
        fix = f"set model.side={root}" if root * root == found[0] else "use data with a square number of features"
        raise ValueError(
            f"model.side={side} takes {side}x{side} = {side * side} inputs per sample, but the data have num_features="
            f"{found[0]} ({found[1]}): {fix} (e.g. data=synthetic data.num_features={side * side})"
        )


def _target_nodes(node: Any, where: str) -> Iterator[tuple[str, DictConfig]]:
    """The outermost ``_target_`` nodes under ``node`` (interpolated entries are not followed)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield where, node
            return
        keys: list[Any] = [k for k in node.keys() if not (where == "" and k == "hydra")]
    elif isinstance(node, ListConfig):
        keys = list(range(len(node)))
    else:
        return
    for key in keys:
        if not OmegaConf.is_interpolation(node, key):
            path = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
            yield from _target_nodes(node[key], path)


TOP_LEVEL_KEYS: tuple[str, ...] = ("seed", "num_threads", "output_dir", "data", "model", "trainer", "estimator", "recipe", "callbacks", "hydra")
"""The top-level keys that the recipes read (``conf/config.yaml``)."""


def check_top_level(cfg: DictConfig) -> None:
    """Refuse a top-level key that no recipe reads but that is close to one that it does
    (``+sed=3``: did you mean ``seed``?; ``ValueError``) and warn about other unknown ones (a
    user's own app may keep notes there; the recipes ignore them). Refuse a ``seed`` that is not
    an integer (``TypeError``) or lies outside ``[0, 2**32 - 1]`` (numpy's range, which
    ``lightning.seed_everything`` seeds; ``ValueError``) and a ``num_threads`` that is not a
    positive integer or null (``ValueError``): values that the groups interpolate
    (``data.seed: ${seed}``) or the recipes apply, so they are named before the nodes that use them."""
    for key in cfg.keys():
        if str(key) in TOP_LEVEL_KEYS:
            continue
        hint = did_you_mean(str(key), TOP_LEVEL_KEYS, "")
        if hint:
            raise ValueError(f"unknown top-level key {key!r} (no recipe reads it): {hint} Fix the override, e.g. seed=3 instead of +sed=3")
        warnings.warn(
            f"top-level key {key!r} is not read by the recipes and has no effect; they read {', '.join(TOP_LEVEL_KEYS[:-1])}",
            UserWarning,
            stacklevel=2,
        )
    seed, threads = cfg.get("seed", 0), cfg.get("num_threads")
    check_seed("seed", seed)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(
            f"num_threads must be a positive integer or null, got {threads!r}: e.g. num_threads=1, or num_threads=null for torch's default"
        )


def check_schema_nodes(cfg: DictConfig) -> None:
    """Refuse keys that the schema of the ``recipe`` node (the one its ``name`` selects in
    :data:`RECIPE_SCHEMAS`) or of the ``estimator`` node does not have, with the closest keys: a
    key added with ``+`` is not refused when the config is composed (:func:`check_schema_keys`);
    and the recipe's out-of-range values (:func:`recipe_params`: its schema's ``__post_init__``),
    which composing the config does not check either (``--cfg job`` prints them)."""
    recipe, estimator = cfg.get("recipe"), cfg.get("estimator")
    if isinstance(recipe, DictConfig) and str(recipe.get("name")) in RECIPE_SCHEMAS:
        recipe_params(recipe, RECIPE_SCHEMAS[str(recipe.get("name"))])  # keys, then types and ranges
    if isinstance(estimator, DictConfig):
        check_estimator_keys(estimator)


def check_output_dir(cfg: DictConfig) -> None:
    """Refuse, in a Hydra multirun (``-m``, or a preset with ``hydra.mode: MULTIRUN``), an
    ``output_dir`` that is one fixed path (no interpolation): every job of the sweep would write
    its ``scores.pt``, ``report.json``, ... into that one folder, each over the one before. A
    single run with ``output_dir`` set and a multirun with ``output_dir=null`` (each job's own
    folder under the sweep dir) pass, and so does an interpolated path (e.g. with
    ``${hydra:job.num}``); one that still resolves to a folder of another job of the sweep is
    refused when that job starts (:func:`lightning_influence.recipes.outputs.claim_output_dir`)."""
    explicit = cfg.get("output_dir")
    if explicit is None or not in_multirun() or OmegaConf.is_interpolation(cfg, "output_dir"):
        return
    raise ValueError(
        f"output_dir={explicit} is one fixed folder for every job of this multirun: each job would write its outputs "
        "(scores.pt, report.json, ...) over the previous job's, and only the last job's would be kept. Use output_dir=null "
        "(each job writes into its own folder under hydra.sweep.dir), or give each job its own folder, e.g. "
        f"'output_dir={explicit}/${{hydra:job.num}}' (quoted on the command line)"
    )


def in_multirun() -> bool:
    """Does this job run as part of a Hydra multirun?"""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_config(cfg: DictConfig) -> None:
    """Check a composed config before any training: the top-level values (:func:`check_top_level`),
    an ``output_dir`` that every job of a multirun would share (:func:`check_output_dir`),
    every ``_target_`` node (``data``, ``model``, ``trainer``, each ``callbacks`` entry, and
    ``_target_`` nodes in their values) against the signature of what it names
    (:func:`check_target_node`), the keys of the ``recipe`` and ``estimator`` nodes against their
    schemas (:func:`check_schema_nodes`: keys added with ``+``), and the model's sizes against the
    data (:func:`check_data_and_model`). Raises ``ValueError`` (``TypeError`` for a non-integer seed)
    naming the key, the value, what is expected and the fix."""
    check_top_level(cfg)
    check_output_dir(cfg)
    check_schema_nodes(cfg)
    for where, node in _target_nodes(cfg, ""):
        check_target_node(node, where, _SET_BY_RECIPES.get(where))
    check_data_and_model(cfg)
