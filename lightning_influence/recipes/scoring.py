"""The scoring run and the estimator checks before it: the estimator config refused before any
data is set up (:func:`check_estimator`, :func:`require_removal_scores`), then a seeded fit with
the estimator attached and a score for every training sample (:func:`fit_and_score`).

Sign and units: a score is the predicted change of the target loss when the sample is removed
from training (positive helps, negative hurts). Coreset baselines keep the direction: higher
means more worth keeping (their metadata says ``higher_means``)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_influence.config import (
    EstimatorConfig,
    check_estimator_target,
    estimator_defaults,
    estimator_option_names,
    estimator_params,
)
from lightning_influence.estimators.base import REGISTRY, Estimator, Target, build, estimator_class
from lightning_influence.recipes.trainers import make_trainer, runs_in_this_process
from lightning_influence.recipes.training_set import train_dataset, train_loader_in_order
from lightning_influence.scores import InfluenceScores
from lightning_influence.validation import did_you_mean

__all__ = [
    "ScoredRun",
    "check_estimator",
    "final_loss_scores",
    "fit_and_score",
    "make_target",
    "predicts_removal",
    "ranking",
    "removal_effect_estimators",
    "require_finite",
    "require_removal_scores",
]


def predicts_removal(name: str) -> bool:
    """Does the estimator registered under ``name`` predict the change of the target loss when a
    sample is removed (the library's sign and units), rather than rank samples by some other
    measure (:attr:`~lightning_influence.estimators.Estimator.predicts_removal`)?"""
    return estimator_class(name).predicts_removal


def removal_effect_estimators() -> list[str]:
    """The registered estimators whose scores are predicted removal effects (:func:`predicts_removal`);
    one whose module cannot be imported (a missing optional dependency) is left out."""
    names = []
    for name in sorted(REGISTRY):
        with contextlib.suppress(ImportError, AttributeError, TypeError):
            if predicts_removal(name):
                names.append(name)
    return names


def require_removal_scores(name: str, options: dict[str, Any], recipe: str, predicted: bool = False) -> None:
    """Cleaning and deletion act on removal effects (lowest = most harmful): refuse, before any
    training, an estimator whose scores rank samples for a coreset instead. With ``predicted``
    (the deletion recipe, which sums scores into predicted target-loss changes), also refuse
    every ranking that is not a predicted removal effect (:func:`predicts_removal`: the final
    loss, outlier gradients, random numbers), naming the estimators that are."""
    if predicted and not predicts_removal(name):
        keeping = estimator_class(name).ranks_for_keeping
        kind = "ranks samples for a coreset (higher = harder, more worth keeping)" if keeping else "ranks samples"
        where = "recipe=coreset" if keeping else "recipe=cleaning or recipe=coreset, which act on rankings"
        raise ValueError(
            f"estimator {name!r} {kind} in its own units: its scores are not predicted changes of the target loss when a "
            f"sample is removed, so the {recipe} recipe's predicted change of a set (the sum of its scores) and its "
            f"comparison with the actual change would mean nothing. Use an estimator that predicts removal effects: "
            f"{', '.join(removal_effect_estimators())}; {name} belongs in {where}"
        )
    if estimator_class(name).ranks_for_keeping:
        raise ValueError(
            f"estimator {name!r} ranks samples for a coreset (higher = harder, more worth keeping, in its own units), "
            f"not by the effect of their removal: the {recipe} recipe would take its lowest scores, the easiest samples, "
            "for the most harmful. Use it with recipe=coreset, or here an influence estimator (diffin, tracin, ...), "
            "loss or outlier_gradient"
        )


def check_estimator(est: EstimatorConfig, target: Any, target_samples: int | None = None, seed: int | None = None) -> None:
    """Check the estimator config before the data are set up and anything trains: its options
    (those it sets, and the constructor defaults of those it does not) agree with
    ``recipe.target`` / ``recipe.target_samples`` and, with a target subset, the recipe's ``seed``
    (:func:`~lightning_influence.config.check_estimator_target`), and the estimator and its
    training callback (for the recording estimators, where most options are checked) construct
    from them -- cheap, no data, no training. A refused option is named as ``estimator.options``,
    with where it came from when a preset (``experiment=...``) set it."""
    check_estimator_target(est, target, target_samples, seed)
    try:
        build(est.name, **est.options).callback()
    except ValueError as err:
        raise ValueError(f"estimator={est.name}: estimator.options refused: {err}") from err
    except TypeError as err:
        raise TypeError(f"estimator={est.name}: estimator.options refused: {err}{_option_hint(est, err)}") from err


def _option_hint(est: EstimatorConfig, err: TypeError) -> str:
    """For an option the estimator does not take (``has no option 'windw'``, or Python's
    ``unexpected keyword argument 'windw'``): the closest of its options (those its config sets
    and its constructor's arguments) as ``estimator.options.<name>``, where the option came from
    when the command line did not set it (:func:`_option_source`), and how to remove it."""
    text = str(err)
    found = re.search(r"has no option '([^']+)'", text) or re.search(r"unexpected keyword argument '([^']+)'", text)
    if found is None:
        return ""
    key = found.group(1)
    known = [n for n in estimator_option_names({"name": est.name, "options": est.options}) if n != key]
    known += [n for n in estimator_defaults(est.name) if n not in known and n != key]
    hint = did_you_mean(key, known, "", prefix="estimator.options.")
    source = _option_source(key)
    remove = f"Remove the option with ~estimator.options.{key} on the command line{' (or drop it from the config that sets it)' if source else ''}"
    return f"; {hint} {source}{remove}" if hint else f". {source}{remove}"


def _option_source(key: str) -> str:
    """Where ``estimator.options.<key>`` came from, when the command line did not set it: the
    preset (``experiment=<name>``) that sets it, else the configs of the defaults list. Empty
    outside a Hydra run, or when a command-line override sets the key."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    runtime = HydraConfig.get()
    path = f"estimator.options.{key}"
    if any(str(o).lstrip("+~").split("=", 1)[0] == path for o in runtime.overrides.task):
        return ""
    choices = runtime.runtime.choices
    experiment, estimator = choices.get("experiment"), choices.get("estimator")
    if experiment and _preset_sets(str(experiment), path):
        return (
            f"The command line does not set {path}: the preset experiment={experiment} does (for the estimator it was "
            f"written for), and estimator={estimator} does not take it. "
        )
    where = f"experiment={experiment}, " if experiment else ""
    return f"The command line does not set {path}: a config of the defaults list does ({where}estimator={estimator}, ...). "


def _preset_sets(experiment: str, path: str) -> bool:
    """Does the shipped preset ``conf/experiment/<experiment>.yaml`` set the key ``path``?"""
    from importlib import resources

    try:
        text = resources.files("lightning_influence.conf").joinpath("experiment", f"{experiment}.yaml").read_text()
        return OmegaConf.select(OmegaConf.create(text), path, default=None) is not None
    except Exception:  # not a shipped preset (a user's, on the search path), or unreadable
        return False


def make_target(kind: str, datamodule: Any, sample_count: int | None = None, seed: int = 0) -> Target:
    """The :class:`Target` of a recipe: ``"val"`` (the datamodule's validation loader) or ``"train"``."""
    if kind == "val":
        return Target("val", datamodule.val_dataloader(), sample_count=sample_count, seed=seed)
    return Target("train", sample_count=sample_count, seed=seed)


@dataclass
class ScoredRun:
    """The scoring run: ``column`` holds one score per id of ``ids`` (a query target's columns
    summed), in ascending id order, so that rankings break ties by sample id (:func:`ranking`)."""

    datamodule: Any
    model: L.LightningModule
    trainer: L.Trainer
    estimator: Estimator
    scores: InfluenceScores
    ids: Tensor
    column: Tensor
    fit_seconds: float
    score_seconds: float
    callbacks: list[L.Callback] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(train_dataset(self.datamodule))


def fit_and_score(
    cfg: DictConfig,
    out: Path,
    target_kind: str,
    target_samples: int | None = None,
    extra_callbacks: Sequence[L.Callback] = (),
    datamodule: Any = None,
) -> ScoredRun:
    """Seed, instantiate data (unless ``datamodule`` is given, e.g. the trial run's:
    :func:`~lightning_influence.recipes.preflight.preflight`) / model / estimator, ``fit`` with the
    estimator's callback (and ``extra_callbacks``), then score every training sample for the
    ``target_kind`` target."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if datamodule is None:
        datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    params = estimator_params(cfg.estimator)
    estimator = build(params.name, **params.options)
    recording = estimator.callback()
    extra = [*([recording] if recording is not None else []), *extra_callbacks]
    trainer = make_trainer(cfg, out, extra)
    start = time.perf_counter()
    with train_loader_in_order(datamodule):
        trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    if runs_in_this_process(trainer) and trainer.global_step == 0:
        raise RuntimeError(
            "the scoring fit ran no optimizer step (trainer.max_epochs, max_steps, max_time, limit_train_batches or a "
            "callback stopped it before the first step): there is no training to score. Let it train at least one step"
        )
    if hasattr(datamodule, "setup"):
        # Under ddp_spawn the datamodule was set up in the worker processes only; setup is idempotent.
        datamodule.setup("fit")
    start = time.perf_counter()
    target = make_target(target_kind, datamodule, target_samples, int(cfg.seed))
    scores = estimator.scores(model, datamodule.train_dataloader(), target)
    score_seconds = time.perf_counter() - start
    if len(scores) == 0:
        raise RuntimeError(f"estimator {params.name!r} scored no training sample (did fit run any training step?)")
    column = scores.values if scores.values.dim() == 1 else scores.values.sum(dim=1)
    require_finite(column, scores.ids, f"estimator {params.name!r}", "training diverged or the estimator failed")
    by_id = torch.argsort(scores.ids, stable=True)  # ranks break ties by position: make that the id, whatever the estimator's order
    return ScoredRun(datamodule, model, trainer, estimator, scores, scores.ids[by_id], column[by_id], fit_seconds, score_seconds, extra)


def ranking(column: Tensor, descending: bool = False) -> Tensor:
    """Positions of ``column`` in ascending order (``descending``: highest first), NaN last in
    both directions (as :meth:`~lightning_influence.InfluenceScores.most_helpful`), ties in
    position order (ascending sample id for a :class:`ScoredRun`'s column). ``torch.argsort(descending=True)`` would put NaN first."""
    # ascending order puts NaN last; negating ranks the highest first and keeps ties in order
    return torch.argsort(-column if descending else column, stable=True)


def require_finite(column: Tensor, ids: Tensor, what: str, why: str) -> None:
    """Refuse a score column with NaN or infinite values, saying how many and which samples: the
    recipes rank, remove, keep and sum every score, so the run stops here, after the scoring fit
    and before any detection, selection or retraining."""
    bad = ~torch.isfinite(column)
    if not bool(bad.any()):
        return
    nan, inf = int(torch.isnan(column).sum()), int(torch.isinf(column).sum())
    first = ids[bad][:5].tolist()
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    raise FloatingPointError(
        f"{what} gave {' and '.join(p for p in parts if p)} of its {column.numel()} scores (sample ids "
        f"{', '.join(str(i) for i in first)}{', ...' if int(bad.sum()) > len(first) else ''}): {why}. The recipe acts on "
        "every score (a NaN has no rank), so it stops before detection, selection and retraining; look for a diverging "
        "run (a lower learning rate, gradient clipping) or a non-finite input or loss in those samples"
    )


@torch.no_grad()
def final_loss_scores(run: ScoredRun) -> Tensor:
    """The plain final-loss ranking, aligned with ``run.ids``: minus each sample's training loss
    at the final parameters (the lowest = the highest loss = the most suspicious)."""
    try:
        scores = build("loss", progress=False).scores(run.model, run.datamodule.train_dataloader(), "train")
        lookup = scores.to_dict()
        return torch.tensor([lookup[int(i)] for i in run.ids.tolist()], dtype=torch.float64)
    except (ImportError, KeyError, AttributeError):
        pass
    dataset = train_dataset(run.datamodule)
    model = run.model
    was_training = model.training
    model.eval()
    losses = []
    device = next(model.parameters()).device
    for batch in DataLoader(Subset(dataset, run.ids.tolist()), batch_size=512):
        batch = model.transfer_batch_to_device(batch, device, 0)
        losses.append(model.per_sample_loss(batch).detach().to("cpu", torch.float64))
    model.train(was_training)
    return -torch.cat(losses)
