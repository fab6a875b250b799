"""Structured-config schemas of the recipes and the estimator group, registered in Hydra's
ConfigStore so that a misspelt key, a wrong type or an unknown choice is refused when the
config is composed (before any training), and out-of-range values when a recipe starts
(:func:`recipe_params` calls each schema's ``__post_init__``).

The YAML files of ``lightning_influence.conf`` extend these schemas through their defaults
lists (``recipe/cleaning.yaml`` starts from ``cleaning_schema``, every ``estimator/*.yaml``
from ``estimator_schema``). :func:`register_configs` runs when the config package is imported,
so it is in place for ``python -m lightning_influence`` and for a user's own Hydra app that
adds ``hydra.searchpath=[pkg://lightning_influence.conf]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "TargetKind",
    "DeletionKind",
    "RetrainingMode",
    "EstimatorConfig",
    "CleaningConfig",
    "DeletionConfig",
    "CoresetConfig",
    "RECIPE_SCHEMAS",
    "register_configs",
    "recipe_params",
    "estimator_params",
    "check_estimator_target",
]


class TargetKind(Enum):
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


def _check_fraction(name: str, value: float, *, allow_one: bool = False) -> None:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 < value and upper_ok):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value}")


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
    target: TargetKind = TargetKind.val
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
            _check_fraction("recipe.top_fractions entries", f, allow_one=True)
        _check_distinct("recipe.top_fractions", list(self.top_fractions), "fractions")
        _check_fraction("recipe.remove_fraction", self.remove_fraction)
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
    target: TargetKind = TargetKind.val
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
        _check_fraction("recipe.lds_keep_fraction", self.lds_keep_fraction)
        if self.target_samples is not None and self.target_samples < 1:
            raise ValueError(f"recipe.target_samples must be >= 1 or null, got {self.target_samples}")
        _check_seeds("recipe.seeds", self.seeds)


@dataclass
class CoresetConfig:
    """Keep ``fraction`` of the training set, the highest scores first (more worth keeping),
    per class when ``class_balanced``; retrain on it once per seed; report the test metric."""

    name: str = "coreset"
    target: TargetKind = TargetKind.train
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
        _check_fraction("recipe.fraction", self.fraction, allow_one=True)
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


def recipe_params(node: DictConfig, schema: type) -> Any:
    """The recipe node as its schema's dataclass, validated (ranges, choices). A node composed
    without the schema (a user's own YAML) is merged onto it first, so a misspelt key fails
    here with the schema's message."""
    if OmegaConf.get_type(node) is not schema:
        node = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(node)


def estimator_params(node: DictConfig) -> EstimatorConfig:
    """The estimator node as a validated :class:`EstimatorConfig` with plain-Python options
    (interpolations resolved, enums as their names)."""
    raw = node.get("options")
    options = {} if raw is None else OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    if not isinstance(options, dict):
        raise TypeError(f"estimator.options must be a mapping of constructor arguments, got {type(options).__name__}")
    return EstimatorConfig(name=str(node.name), options=dict(options))


def check_estimator_target(estimator: EstimatorConfig, target: TargetKind | str, target_samples: int | None = None) -> None:
    """Refuse, before any training, estimator options that contradict the recipe: a recording
    estimator's ``target`` (what it records for during fit) other than ``recipe.target`` (what the
    recipe scores and measures), or its ``target_samples`` other than a ``recipe.target_samples``
    the recipe sets. The shipped estimator configs default both to the recipe's values."""
    wanted = target.value if isinstance(target, Enum) else str(target)
    options = estimator.options
    if "target" in options and options["target"] is not None and str(options["target"]) != wanted:
        raise ValueError(
            f"estimator.options.target={options['target']} contradicts recipe.target={wanted}: the {estimator.name} estimator would "
            f"record its scores for the {options['target']} target while the recipe asks for (and measures) the {wanted} target. "
            f"Set recipe.target={options['target']} to score that target, or drop the estimator.options.target override "
            "(its config follows recipe.target)"
        )
    count = options.get("target_samples")
    if target_samples is not None and count is not None and int(count) != int(target_samples):
        raise ValueError(
            f"estimator.options.target_samples={count} contradicts recipe.target_samples={target_samples}: the estimator would "
            "score against another subset of the target than the recipe asks for. Set recipe.target_samples only "
            "(the estimator's config follows it)"
        )
