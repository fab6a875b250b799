"""What the recipes check and keep consistent around the scoring run: the aggregation pools only
seeds, the deletion recipe measures the change on the target subset it predicts for, values that
would fail after training are refused before it, data dtype and precision agree, DDP honours an
unshuffled training loader, and files of an earlier run in the output folder are named. Real
Hydra compositions and recipe runs on small settings (one epoch, one retraining seed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_influence.app import run
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import Classifier
from lightning_influence.scores import InfluenceScores
from lightning_influence.recipes import aggregate, cleaning, common, coreset, deletion, outputs
from lightning_influence.recipes.common import harmonise_precision
from lightning_influence.recipes.preflight import check_training_steps
from lightning_influence.recipes.retraining import subset_datamodule, target_subset
from lightning_influence.recipes.scoring import predicts_removal, ranking, removal_effect_estimators
from lightning_influence.recipes.training_set import distributed_train_loader
from lightning_influence.targets import TargetGradient

CONF = "lightning_influence.conf"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
QUICK = ("trainer.max_epochs=1", "recipe.seeds=[0]", "recipe.plots=false")


def compose_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------------- aggregation
def _job(root: Path, name: str, overrides: list[str], rows: list[dict], estimator: str) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "report.json").write_text(json.dumps({"estimator": {"name": estimator}, "summary": rows}))


def _cleaning_rows(estimator: str, seed: int, acc: float, no_removal: float, random: float) -> list[dict]:
    common = {"recipe": "cleaning", "seed": seed, "metric": "test_acc"}
    return [
        {**common, "method": estimator, "fraction": 0.1, "accuracy": acc},
        {**common, "method": "no_removal", "fraction": 0.0, "accuracy": no_removal},
        {**common, "method": "random", "fraction": 0.1, "accuracy": random},
    ]


def test_aggregation_keeps_configurations_apart_and_pools_seeds(tmp_path: Path) -> None:
    """A sweep over model.lr x seed: one table per learning rate, each pooled over the two seeds;
    nothing of lr 0.1 is averaged with lr 0.5."""
    values = {("0.1", 0): 0.70, ("0.1", 1): 0.72, ("0.5", 0): 0.86, ("0.5", 1): 0.88}
    for i, ((lr, seed), acc) in enumerate(values.items()):
        _job(tmp_path, str(i), [f"model.lr={lr}", f"seed={seed}", "recipe.seeds=[0]"], _cleaning_rows("diffin", seed, acc, acc, acc), "diffin")
    rows = aggregate.collect(tmp_path)
    assert aggregate.configurations(rows) == (["model.lr"], ["seed"])
    cells = aggregate.aggregate(rows)
    for lr in ("0.1", "0.5"):
        cell = cells[("cleaning", "test_acc", f"model.lr={lr}", "no removal (baseline)", 0.0)]
        assert cell["n"] == 2 and cell["values"] == [values[(lr, 0)], values[(lr, 1)]]
    assert len(cells) == 6
    table = aggregate.markdown_table(cells, ["seed"])
    assert "cleaning: test_acc [model.lr=0.1], mean +- std over jobs differing in seed (n)" in table
    assert "| no removal (baseline) | 0.7100 +- 0.0141 (2) |" in table and "| no removal (baseline) | 0.8700 +- 0.0141 (2) |" in table


def test_baselines_count_once_per_run_not_per_coinciding_value(tmp_path: Path) -> None:
    """Estimators x retraining seeds: the baselines of diffin's and tracin's jobs with the same
    recipe.seeds are one run (counted once), those of different recipe.seeds are two runs even
    where their accuracies coincide (multiples of 1/297)."""
    same = 276 / 297
    for i, (estimator, seeds) in enumerate([("diffin", "[0]"), ("tracin", "[0]"), ("diffin", "[1]"), ("tracin", "[1]")]):
        rows = _cleaning_rows(estimator, 0, 0.9 + i / 100, same, same)
        _job(tmp_path, str(i), [f"estimator={estimator}", f"recipe.seeds={seeds}", "trainer.max_epochs=1"], rows, estimator)
    rows = aggregate.collect(tmp_path)
    assert aggregate.configurations(rows) == ([], ["recipe.seeds"])
    cells = aggregate.aggregate(rows)
    assert cells[("cleaning", "test_acc", "", "no removal (baseline)", 0.0)]["n"] == 2
    assert cells[("cleaning", "test_acc", "", "random removal (baseline)", 0.1)]["n"] == 2
    assert cells[("cleaning", "test_acc", "", "diffin", 0.1)]["n"] == cells[("cleaning", "test_acc", "", "tracin", 0.1)]["n"] == 2
    # the estimator's own rows are never merged, even with equal values
    for i, estimator in enumerate(["diffin", "diffin"]):
        _job(tmp_path / "again", str(i), [f"seed={i}"], _cleaning_rows(estimator, i, same, same, same), estimator)
    again = aggregate.aggregate(aggregate.collect(tmp_path / "again"))
    assert again[("cleaning", "test_acc", "", "diffin", 0.1)]["n"] == again[("cleaning", "test_acc", "", "no removal (baseline)", 0.0)]["n"] == 2


def test_multirun_over_a_learning_rate_is_not_pooled(tmp_path: Path) -> None:
    """The real sweep: -m model.lr=0.1,0.5 seed=0,1, then the aggregation command."""
    sweep = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_influence", "-m", "recipe=coreset", "estimator=random", "recipe.fraction=0.5",
         "model.lr=0.1,0.5", "seed=0,1", *QUICK, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert aggregate.main([str(sweep), "--no-plot"]) == 0
    lines = (sweep / "aggregate.csv").read_text().splitlines()
    assert lines[0] == "recipe,metric,method,fraction,mean,std,n,config" and len(lines) == 3
    by_lr: dict[str, list[float]] = {}
    for report in sweep.glob("*/report.json"):
        r = json.loads(report.read_text())
        lr = next(o.split("=")[1] for o in (report.parent / ".hydra" / "overrides.yaml").read_text().split() if o.startswith("model.lr="))
        by_lr.setdefault(lr, []).append(r["test_acc"]["mean"])
    for line in lines[1:]:
        recipe, metric, method, fraction, mean, _, n, config = line.split(",")
        lr = config.removeprefix("model.lr=")
        assert (recipe, method, fraction, n) == ("coreset", "random", "0.5", "2")
        assert float(mean) == pytest.approx(sum(by_lr[lr]) / 2, abs=1e-6)
    assert "differing in seed" in (sweep / "aggregate.md").read_text()


# ---------------------------------------------------------------------- deletion on a target subset
@pytest.mark.parametrize("target", ["val", "train"])
def test_deletion_measures_the_change_on_the_scored_target_subset(target: str, tmp_path: Path) -> None:
    """With recipe.target_samples the scores predict the change of the loss over that subset of the
    target, and the retraining measures it there: predicted and actual agree as without a subset
    (on the full validation set the 5-sample predictions matched in sign only half the time)."""
    cfg = compose_cfg("recipe=deletion", f"recipe.target={target}", "recipe.target_samples=5", "recipe.sizes=[5,20]", *QUICK, f"output_dir={tmp_path}")
    report = run(cfg)
    assert report["target_samples"] == 5 and report["score_metadata"]["target_samples"] == 5
    corr = report["correlation"]
    assert corr["sign_agreement"] == 1.0 and corr["pearson"] > 0.95 and corr["spearman"] > 0.8, corr
    for row in report["sets"]:
        if row["kind"] == "random" and abs(row["predicted"]) > 1e-3:
            assert row["actual"] == pytest.approx(row["predicted"], rel=0.5)


def test_target_subset_is_the_estimators_draw() -> None:
    data = DigitsDataModule(seed=0)
    data.setup()
    val = list(data.val_dataloader())
    picked = target_subset("val", val, 7, 3)
    chooser = TargetGradient("val", lambda: val, sample_count=7, seed=3)
    chooser._resolve_subset()
    positions = chooser.subset.tolist()
    x = torch.cat([b[0] for b in picked])
    assert len(positions) == 7 and torch.equal(x, torch.stack([data.val_set[i][0] for i in positions]))
    train = [data.train_set[i] for i in range(len(data.train_set))]
    batches = list(DataLoader(data.train_set, batch_size=256))
    by_id = target_subset("train", batches, 4, 1, sample_ids=lambda b: b[-1])
    chooser = TargetGradient("train", lambda: batches, sample_count=4, seed=1, sample_ids=lambda b: b[-1])
    chooser._resolve_subset()
    assert torch.cat([b[-1] for b in by_id]).tolist() == chooser.subset.tolist() and len(train) == 1200
    assert target_subset("val", val, None, 0) is val


# ---------------------------------------------------------------------- refused before training
@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (cleaning, ["recipe.metric=test_accuracy"], r"recipe.metric='test_accuracy' is not logged.*'test_acc'"),
        (coreset, ["recipe=coreset", "recipe.metric=acc"], r"recipe.metric='acc' is not logged"),
        (cleaning, ["recipe.remove_count=5000"], r"removing 5000 of 1200 .*at most 1199"),
        (deletion, ["recipe=deletion", "recipe.sizes=[10,1200]"], r"recipe.sizes \[1200\] would remove the whole training set of 1200"),
        (cleaning, ["recipe.target_samples=301"], r"target_samples=301 exceeds the 300 samples of the val target"),
        (cleaning, ["trainer.max_epochs=0"], r"trainer.max_epochs=0 runs no training step"),
        (coreset, ["recipe=coreset", "+trainer.limit_train_batches=0"], r"trainer.limit_train_batches=0 runs no training step"),
        (cleaning, ["trainer.max_epochs=-1"], r"trainer.max_epochs=-1 trains without end.*trainer.max_steps is not set"),
        (coreset, ["recipe=coreset", "estimator=forgetting"], r"forgetting events.*runs 1 full epoch.*trainer.max_epochs to at least 2"),
        (coreset, ["recipe=coreset", "estimator=forgetting", "trainer.max_epochs=3", "+trainer.max_steps=40"],
         r"runs 1 full epoch.*trainer.max_steps to at least 76 \(two epochs of 38 steps\)"),
        # Post-hoc estimators' options that depend on the model: refused on the trial model, not after the scoring fit.
        (cleaning, ["estimator=influence_function", "estimator.options.params=nothing.x"],
         r"estimator=influence_function refused the one-step trial model \(Classifier with 2410 trainable values in 4 tensors: "
         r"net.0.weight, net.0.bias, net.2.weight, net.2.bias\) with its estimator.options, before the scoring fit: no trainable "
         r"parameter name matches params=\['nothing.x'\]; the names are like .*; set estimator.options.params to patterns of these names \(e.g. \['net.0.\*'\]\)"),
        (deletion, ["recipe=deletion", "estimator=influence_function", "estimator.options.solver=exact", "model.hidden=[100]"],
         r"estimator=influence_function refused the one-step trial model \(Classifier with 7510 trainable values.*solver='exact' builds "
         r"the explicit 7510 x 7510 curvature .*above max_exact_parameters=5000: use solver='cg'"),
        (deletion, ["recipe=deletion", "estimator=datainf", "estimator.options.params=[head.*]"], r"estimator=datainf refused the one-step trial model"),
        (coreset, ["recipe=coreset", "estimator=grand", "estimator.options.params=nothing"], r"estimator=grand refused the one-step trial model"),
        (cleaning, ["estimator=outlier_gradient", "estimator.options.params=[x]"], r"estimator=outlier_gradient refused the one-step trial model"),
        (deletion, ["recipe=deletion", "estimator=forward_inf", "estimator.options.params=[x]"], r"estimator=forward_inf refused the one-step trial model"),
    ],
)
def test_values_that_fail_after_training_are_refused_before(recipe, overrides: list[str], message: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_scoring_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the scoring run started")

    monkeypatch.setattr(common, "fit_and_score", no_scoring_run)
    cfg = compose_cfg(*QUICK, *overrides, f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match=message):
        run(cfg)


class ClassifierWithoutClassScores(Classifier):
    """A user's model (built by ``_target_``) that gives no per-sample class scores."""

    per_sample_outputs = None


class ClassifierWithSmoothedLoss(Classifier):
    """A user's model whose per-sample loss the default output split does not reproduce."""

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize(
    ("recipe", "overrides", "error", "message"),
    [
        (coreset, ["recipe=coreset", "estimator=el2n", f"model._target_={__name__}.ClassifierWithoutClassScores"], TypeError,
         r"estimator=el2n refused the one-step trial model .*does not provide per-sample class scores: define a method per_sample_outputs"),
        (cleaning, ["estimator=influence_function", f"model._target_={__name__}.ClassifierWithSmoothedLoss"], ValueError,
         r"estimator=influence_function refused the one-step trial model .*the default split .* does not reproduce module.per_sample_loss"),
    ],
)
def test_model_contracts_that_fail_after_training_are_refused_on_the_trial_model(recipe, overrides: list[str], error: type, message: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A model without what the estimator reads from it (class scores, an output split that
    reproduces the per-sample loss) is refused on the one-step trial, not after the scoring fit."""

    def no_scoring_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the scoring run started")

    monkeypatch.setattr(common, "fit_and_score", no_scoring_run)
    with pytest.raises(error, match=message):
        run(compose_cfg(*QUICK, *overrides, f"output_dir={tmp_path}"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["estimator=influence_function", "estimator.options.solver=exact", "model.hidden=[100]", "estimator.options.params=[net.2.*]"],
        ["estimator=influence_function", "model.hidden=[100]"],  # auto: cg above max_exact_parameters
        ["estimator=datainf", "estimator.options.params=[net.2.*]"],
    ],
)
def test_model_dependent_estimator_options_that_fit_pass_the_trial(overrides: list[str], tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The trial model check refuses only what the scoring would: an exact solve over the parameters
    that params selects (1010 of 7510), the automatic solver, patterns that match, reach the scoring run."""

    def scoring_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the scoring run started")

    monkeypatch.setattr(common, "fit_and_score", scoring_run)
    with pytest.raises(AssertionError, match="the scoring run started"):
        run(compose_cfg(*QUICK, *overrides, f"output_dir={tmp_path}"))


def test_an_epoch_limit_of_minus_one_needs_another_bound() -> None:
    check_training_steps(compose_cfg("trainer.max_epochs=-1", "+trainer.max_steps=20"))
    check_training_steps(compose_cfg("trainer.max_epochs=-1", "+trainer.max_time=00:00:01:00"))
    with pytest.raises(ValueError, match=r"max_epochs=-1 trains without end .*: trainer.max_steps=-1 \(no limit\) and neither is trainer.max_time"):
        check_training_steps(compose_cfg("trainer.max_epochs=-1", "+trainer.max_steps=-1"))


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (cleaning, ["estimator.options.window=abc"], r"estimator=diffin: estimator.options refused: estimator 'diffin': option window must be an integer, got 'abc'"),
        (coreset, ["recipe=coreset", "estimator.options.window=0"], r"estimator.options refused: window must be a positive int, got 0"),
        (deletion, ["recipe=deletion", "estimator.options.mode=foo"], r"estimator.options refused: mode must be 'replay' or 'online'"),
        (cleaning, ["estimator=tracin", "estimator.options.target_every=0"], r"estimator=tracin: estimator.options refused: target_every"),
        (coreset, ["recipe=coreset", "+estimator.options.windw=3"],
         r"estimator.options refused: estimator 'diffin' has no option 'windw': did you mean window\?; did you mean estimator.options.window\? "
         r"Remove the option with ~estimator.options.windw on the command line$"),
        (cleaning, ["estimator=influence_function", "+estimator.options.dampin=0.1"],
         r"estimator=influence_function: estimator.options refused: .*'dampin'.*; did you mean estimator.options.damping or "
         r"estimator.options.damping_scale\? Remove the option with ~estimator.options.dampin"),
        # an option a preset sets for Diff-In, under another estimator (the source is named under Hydra: see the CLI test)
        (cleaning, ["experiment=synthetic_large", "estimator=tracin"],
         r"estimator=tracin: estimator.options refused: estimator 'tracin' has no option 'mode': its options are target, .*\. "
         r"Remove the option with ~estimator.options.mode on the command line"),
        # the estimator's own defaults count where its config leaves an option out: DiffIn's and TracIn's target is val
        (coreset, ["recipe=coreset", "~estimator.options.target"],
         r"^the diffin estimator would record its scores for the val target \(the default of DiffIn's target: the "
         r"estimator config sets no estimator.options.target\) while recipe.target=train asks for \(and measures\) the train target. "
         r"Add \+estimator.options.target=train on the command line"),
        (deletion, ["recipe=deletion", "recipe.target=train", "estimator=tracin", "~estimator.options.target"],
         r"the tracin estimator would record its scores for the val target \(the default of TracIn's target"),
        (coreset, ["recipe=coreset", "recipe.target_samples=50", "~estimator.options.target_samples"],
         r"the diffin estimator would record its scores against the whole target \(the default of DiffIn's target_samples: the "
         r"estimator config sets no estimator.options.target_samples\) while recipe.target_samples=50 asks for a subset of 50. "
         r"Add \+estimator.options.target_samples=50 on the command line"),
        (cleaning, ["estimator.options.target_samples=20"],
         r"estimator.options.target_samples=20 contradicts recipe.target_samples=null: the estimator would score against a random "
         r"subset of 20 target samples while the recipe asks for \(and measures\) the whole target. Set recipe.target_samples=20"),
        (cleaning, ["recipe.target_samples=20", "estimator.options.target_samples=null"],
         r"estimator.options.target_samples=null contradicts recipe.target_samples=20.*Set estimator.options.target_samples=20"),
        (cleaning, ["recipe.target_samples=20", "estimator.options.seed=3"],
         r"the diffin estimator would draw its subset of recipe.target_samples=20 target samples with seed=3 \(estimator.options.seed=3\) "
         r"while the recipe measures on the subset drawn with seed=0: two different subsets. Set estimator.options.seed=0"),
        (coreset, ["recipe=coreset", "recipe.target_samples=20", "seed=4", "estimator=tracin", "~estimator.options.seed"],
         r"with seed=0 \(the default of TracIn's seed: the estimator config sets no estimator.options.seed\) while the recipe measures "
         r"on the subset drawn with seed=4.*Add \+estimator.options.seed=4"),
        (cleaning, ["estimator.options.target=train"], r"estimator.options.target=train contradicts recipe.target=val.*Set recipe.target=train"),
        (coreset, ["recipe=coreset", "estimator=tracin", "estimator.options.target=val"], r"estimator.options.target=val contradicts recipe.target=train"),
        (deletion, ["recipe=deletion", "recipe.target_samples=5", "estimator.options.target_samples=7"],
         r"estimator.options.target_samples=7 contradicts recipe.target_samples=5"),
        *[
            (deletion, ["recipe=deletion", f"estimator={name}"],
             rf"estimator '{name}' ranks samples in its own units: its scores are not predicted changes of the target loss.*"
             r"Use an estimator that predicts removal effects: datainf, diffin, diffin_checkpoints, forward_inf, influence_function, sgd_influence, tracin, tracin_checkpoints")
            for name in ("loss", "random", "outlier_gradient")
        ],
    ],
)
def test_estimator_configs_are_refused_before_data_setup(recipe, overrides: list[str], message: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Estimator options and their agreement with the recipe are checked by constructing the
    estimator and its callback, before the data are set up (no trial fit, no training)."""

    def no_data(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the data were set up")

    monkeypatch.setattr(common, "preflight", no_data)
    with pytest.raises((ValueError, TypeError), match=message):
        run(compose_cfg(*QUICK, *overrides, f"output_dir={tmp_path}"))


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        # the defaults agree with the recipe: no override needed
        (cleaning, ["~estimator.options.target", "~estimator.options.seed"]),
        (coreset, ["recipe=coreset", "estimator.options.target=train", "~estimator.options.seed", "seed=3"]),  # no subset: the seed draws nothing
        (coreset, ["recipe=coreset", "estimator=random", "recipe.target_samples=5"]),  # post-hoc: the recipe passes its target
        (cleaning, ["experiment=synthetic_large", "estimator=tracin", "~estimator.options.mode"]),
    ],
)
def test_estimator_defaults_that_agree_with_the_recipe_pass(recipe, overrides: list[str], tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_data(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the data were set up")

    monkeypatch.setattr(common, "preflight", no_data)
    with pytest.raises(AssertionError, match="the data were set up"):
        run(compose_cfg(*QUICK, *overrides, f"output_dir={tmp_path}"))


def test_a_preset_option_another_estimator_does_not_take_is_traced_to_the_preset(tmp_path: Path) -> None:
    """experiment=synthetic_large sets Diff-In's mode: under estimator=tracin the refusal says the preset
    set it (the command line did not) and how to remove it, before the data are set up."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_influence", "experiment=synthetic_large", "estimator=tracin", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert (
        "estimator 'tracin' has no option 'mode': its options are target, target_loader, target_samples, seed, target_every, "
        "batch_removal, save_path, name. The command line does not set estimator.options.mode: the preset experiment=synthetic_large does (for the "
        "estimator it was written for), and estimator=tracin does not take it. Remove the option with ~estimator.options.mode "
        "on the command line (or drop it from the config that sets it)"
    ) in proc.stderr
    assert "Sanity Checking" not in proc.stderr + proc.stdout and "Epoch" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_multirun_jobs_sharing_one_output_dir_are_refused_before_training(tmp_path: Path) -> None:
    """-m with a fixed output_dir: every job would write into one folder (the last job's kept). A
    fixed path, and an interpolated one that does not differ between the jobs, are refused before
    the first job runs (lightning_influence.sweep); ${hydra:job.num} gives each job its own folder."""
    common = ["-m", "recipe=coreset", "estimator=random", "seed=0,1", *QUICK]

    def sweep(name: str, output_dir: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lightning_influence", *common, f"output_dir={output_dir}", f"hydra.sweep.dir={tmp_path / name}"],
            cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        )

    fixed = sweep("fixed", str(tmp_path / "out"))
    assert fixed.returncode != 0 and not (tmp_path / "out").exists() and not (tmp_path / "fixed").exists()
    assert (
        f"output_dir={tmp_path / 'out'} is one fixed folder for every job of this multirun: each job would write its outputs "
        "(scores.pt, report.json, ...) over the previous job's, and only the last job's would be kept. Use output_dir=null"
    ) in fixed.stderr and f"'output_dir={tmp_path / 'out'}/${{hydra:job.num}}'" in fixed.stderr
    shared = sweep("shared", str(tmp_path / "by_lr" / "${model.lr}"))
    assert shared.returncode != 0 and not (tmp_path / "by_lr").exists() and "Outputs in" not in shared.stdout
    assert (
        "1 of the 2 jobs of this multirun have a config that would be refused when the job starts; no job was run" in shared.stderr
        and "job 1 (recipe=coreset estimator=random seed=1 " in shared.stderr
        and f"output_dir resolves to {tmp_path / 'by_lr' / '0.1'}, the output folder of job 0 too" in shared.stderr
    ), shared.stderr[-3000:]
    per_job = sweep("per_job", str(tmp_path / "jobs" / "${hydra:job.num}"))
    assert per_job.returncode == 0, per_job.stderr[-3000:]
    seeds = {int(p.parent.name): json.loads(p.read_text())["summary"][0]["seed"] for p in (tmp_path / "jobs").glob("*/report.json")}
    assert seeds == {0: 0, 1: 1}


@pytest.mark.slow
def test_every_job_of_a_multirun_is_checked_before_the_first_one_runs(tmp_path: Path) -> None:
    """An out-of-range value in some jobs of a sweep (given on the command line, and through a
    preset's hydra.sweeper.params) refuses the whole sweep before any job runs, naming each
    failing job; a sweep whose jobs all pass goes on (the multirun tests above)."""
    def sweep(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lightning_influence", "-m", *overrides, *QUICK, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        )

    bad = sweep("recipe=coreset", "estimator=random", "seed=0,1", "recipe.fraction=0.5,1.5")
    assert bad.returncode == 1 and not (tmp_path / "sweep").exists() and "Launching" not in bad.stderr + bad.stdout
    assert "2 of the 4 jobs of this multirun have a config that would be refused when the job starts; no job was run" in bad.stderr
    assert "job 1 (recipe=coreset estimator=random seed=0 recipe.fraction=1.5" in bad.stderr
    assert "job 3 (recipe=coreset estimator=random seed=1 recipe.fraction=1.5" in bad.stderr
    assert bad.stderr.count("recipe.fraction must be in (0, 1], got 1.5") == 2
    preset = sweep("experiment=coreset_sweep", "hydra.sweeper.params.seed='0,-3'")
    assert preset.returncode == 1 and not (tmp_path / "sweep").exists()
    # 20 jobs with seed=-3, and the 4 forgetting-events jobs of seed=0 (QUICK trains one epoch; forgetting needs two)
    assert "24 of the 40 jobs" in preset.stderr and "seed=-3 is out of range" in preset.stderr and "... and 19 more" in preset.stderr
    # the recipe's own config checks, and jobs sharing a Hydra job folder
    recipe = sweep("trainer.precision=32-true,bf16-mixed", "data.dtype=float64", "estimator=random,el2n")
    assert recipe.returncode == 1 and not (tmp_path / "sweep").exists()
    assert "3 of the 4 jobs" in recipe.stderr and "data.dtype=float64 does not match trainer.precision=bf16-mixed" in recipe.stderr
    assert "estimator 'el2n' ranks samples for a coreset" in recipe.stderr
    shared = sweep("recipe=coreset", "estimator=random,loss", "hydra.sweep.subdir=same")
    assert shared.returncode == 1 and not (tmp_path / "sweep").exists()
    assert "job 1 (recipe=coreset estimator=loss" in shared.stderr and f"resolves to {tmp_path / 'sweep' / 'same'}, the output folder of job 0 too" in shared.stderr
    # Trainer settings that run no step, and forgetting events over one epoch: config-only, so checked up front too
    trainer = sweep("recipe=coreset", "estimator=forgetting,random", "+trainer.max_steps=0,-1")
    assert trainer.returncode == 1 and not (tmp_path / "sweep").exists()
    assert "3 of the 4 jobs" in trainer.stderr and trainer.stderr.count("trainer.max_steps=0 runs no training step") == 2
    assert "job 1 (recipe=coreset estimator=forgetting +trainer.max_steps=-1" in trainer.stderr and "runs 1 full epoch(s)" in trainer.stderr


def test_a_single_run_keeps_its_output_dir_and_reruns_of_a_job_may_reuse_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lightning_influence.config import check_output_dir
    check_output_dir(compose_cfg(f"output_dir={tmp_path}"))  # not a multirun: a fixed folder is fine
    runtime = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path / "sweep" / "0")), job=SimpleNamespace(num=0))
    monkeypatch.setattr(outputs, "in_multirun", lambda: True)
    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", staticmethod(lambda: runtime))
    outputs.claim_output_dir(tmp_path)
    outputs.claim_output_dir(tmp_path)  # the same job again
    runtime.job.num, runtime.runtime.output_dir = 1, str(tmp_path / "sweep" / "1")
    with pytest.raises(ValueError, match=r"the output folder of job 0 of this multirun"):
        outputs.claim_output_dir(tmp_path)
    runtime.runtime.output_dir = str(tmp_path / "another_sweep" / "1")
    outputs.claim_output_dir(tmp_path)  # another sweep into that folder: its stale files are named at the end


@pytest.mark.parametrize("blocked", ["report.json", "scores.pt", "config.yaml"])
def test_an_output_file_name_taken_by_a_folder_is_refused_before_training(blocked: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_data(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the data were set up")

    monkeypatch.setattr(common, "preflight", no_data)
    (tmp_path / blocked).mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path / blocked} is a folder: the recipe writes its {blocked} there after training and "
                       r"retraining, and could not. Remove or rename that folder, or write into another output folder"):
        run(compose_cfg("recipe=coreset", *QUICK, f"output_dir={tmp_path}"))


def test_an_output_folder_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match=rf"the output folder {tmp_path / 'out'} is a file, not a folder: .*Choose another output folder"):
        run(compose_cfg("recipe=coreset", *QUICK, f"output_dir={tmp_path / 'out'}"))


def test_an_output_folder_without_write_permission_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import lightning_influence.scores as scores_module

    def no_data(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the data were set up")

    def denied(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")  # a read-only folder (root may write into one)

    monkeypatch.setattr(common, "preflight", no_data)
    monkeypatch.setattr(scores_module.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match=rf"the output folder {tmp_path} is not writable \(PermissionError: Permission denied\): the "
                       r"recipe writes scores.pt, report.json, ... into it after training. Make that folder writable"):
        run(compose_cfg("recipe=coreset", *QUICK, f"output_dir={tmp_path}"))


def test_out_of_range_recipe_values_are_refused_before_the_run_starts(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Composing checks keys and types, not ranges (--cfg job prints remove_fraction: 1.5): the run
    refuses the value first, before its start line and before anything is set up."""
    from lightning_influence.config import check_config

    cfg = compose_cfg("recipe.remove_fraction=1.5", f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"recipe.remove_fraction must be in \(0, 1\), got 1.5"):
        check_config(cfg)
    with pytest.raises(ValueError, match=r"recipe.remove_fraction must be in"):
        run(cfg)
    assert "outputs in" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"recipe.sizes has repeated sizes 10"):
        check_config(compose_cfg("recipe=deletion", "recipe.sizes=[10,10]"))


def test_only_removal_effects_are_predicted_and_calibration_follows_the_metadata(tmp_path: Path) -> None:
    """The deletion recipe sums scores into predicted target-loss changes: the registry's rankings
    are not removal effects; Forward-INF's default scores are per unit of summed learning rate, so
    the report says they are not calibrated (with a warning)."""
    assert removal_effect_estimators() == ["datainf", "diffin", "diffin_checkpoints", "forward_inf", "influence_function", "sgd_influence", "tracin", "tracin_checkpoints"]
    assert not any(predicts_removal(n) for n in ("loss", "random", "outlier_gradient", "el2n", "grand", "forgetting"))
    assert deletion.in_target_loss_units({"target": "val"}) and deletion.in_target_loss_units({"calibrated": True})
    assert not deletion.in_target_loss_units({"calibrated": False, "units": "target-loss change"})
    cfg = compose_cfg("recipe=deletion", "estimator=forward_inf", "model=logreg", "recipe.sizes=[5]", *QUICK, f"output_dir={tmp_path}")
    with pytest.warns(RuntimeWarning, match=r"forward_inf's scores are not in units of the target-loss change \(score metadata 'calibrated': False; units: .*per unit of summed"):
        report = run(cfg)
    assert report["predicted_calibrated"] is False


class StopBeforeTraining(L.Callback):
    """Stops every fit before its first step (as a too short max_time would)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_a_scoring_fit_without_steps_says_so(tmp_path: Path) -> None:
    cfg = compose_cfg("recipe=coreset", *QUICK, f"+callbacks.stop._target_={__name__}.StopBeforeTraining", f"output_dir={tmp_path}")
    with pytest.raises(RuntimeError, match="the scoring fit ran no optimizer step"):
        run(cfg)


# ---------------------------------------------------------------------- part of the training set scored
PARTIAL = ("model=logreg", "data.shuffle=false", *QUICK)


def test_cleaning_removes_at_most_the_scored_samples_in_every_condition(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Two batches of 32 scored: remove_count=100 removes the 64 scored samples in every
    condition (the random one too), says so, and reports the count asked for."""
    cfg = compose_cfg(*PARTIAL, "+trainer.limit_train_batches=2", "recipe.remove_count=100", f"output_dir={tmp_path}")
    with pytest.warns(UserWarning, match=r"asked to remove 100 samples \(recipe.remove_count=100\) but the estimator scored only 64 of the 1200.*removes 64"):
        report = run(cfg)
    removal = report["removal"]
    assert (removal["count"], removal["requested_count"], report["num_scored"]) == (64, 100, 64)
    assert {k: c["removed"] for k, c in removal["conditions"].items()} == {"no_removal": 0, "estimator": 64, "loss": 64, "random": 64}
    assert "Retrained without 64 samples (100 asked for; only 64 were scored)" in capsys.readouterr().out


def test_partly_scored_cleaning_reports_how_many_flipped_labels_it_scored(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Three batches of 32 scored: the ROC-AUC and found-in-top shares are over the flipped labels
    among those 96, and the report and the printed line say how many that is (not only the 120 of
    the whole training set)."""
    from hydra.utils import instantiate

    cfg = compose_cfg(*PARTIAL, "+trainer.limit_train_batches=3", "recipe.remove_count=50", f"output_dir={tmp_path}")
    report = run(cfg)
    data = instantiate(cfg.data)
    data.setup("fit")
    scored = set(InfluenceScores.load(tmp_path / "scores.pt").ids.tolist())
    among = len(scored & set(data.flipped_ids.tolist()))
    det = report["detection"]
    assert (det["num_flipped"], det["num_flipped_scored"], det["num_scored"], len(scored)) == (120, among, 96, 96) and 0 < among < 96
    assert det["label_noise"] == 0.1 and det["label_noise_configured"] == 0.1
    assert (
        f"Flipped labels: {among} among the 96 scored samples (120 in the whole training set of 1200; uniform); the detection "
        "metrics are over the scored samples."
    ) in capsys.readouterr().out
    assert type(det["estimator"]["auroc"]) is float and type(det["loss"]["auroc"]) is float


def test_without_label_noise_the_report_says_none_was_injected(tmp_path: Path) -> None:
    report = run(compose_cfg(*PARTIAL, "+trainer.limit_train_batches=2", "recipe.remove_count=10", "data.noise_kind=none", f"output_dir={tmp_path}"))
    det = report["detection"]
    assert (det["num_flipped"], det["num_flipped_scored"], det["label_noise"], det["noise_kind"]) == (0, 0, 0.0, "none")
    assert det["label_noise_configured"] == 0.1 and det["estimator"] is None


def test_detection_roc_auc_is_a_float64_python_float() -> None:
    """7 of 12 pairs ranked right: 7/12 exactly in float64, not float32-rounded; ties count one half."""
    from lightning_influence.evaluation.metrics import detection_auroc

    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    flipped = torch.tensor([True, False, True, False, False, False, True])
    result = cleaning.detection_metrics(values, flipped, [0.5])["auroc"]
    pairs = sum(float(v) < float(w) for v, p in zip(values, flipped) if p for w, q in zip(values, flipped) if not q)
    assert type(result) is float and pairs == 7 and result == 7 / 12 == detection_auroc(values, flipped)
    assert result != float(torch.tensor(result, dtype=torch.float32))
    assert detection_auroc(torch.zeros(5), torch.tensor([True, False, False, True, False])) == 0.5
    assert detection_auroc(torch.tensor([2.0, 1.0, 1.0, 0.0]), torch.tensor([False, True, False, True])) == 0.875
    with pytest.raises(ValueError, match="needs both positive and negative samples"):
        detection_auroc(values, torch.ones(7, dtype=torch.bool))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 997, 5000])
def test_detection_roc_auc_is_the_pairwise_share_with_ties_counting_one_half(n: int) -> None:
    """The cleaning recipe's ROC-AUC (``detection_auroc``) on tied scores: exactly the share of
    (flipped, clean) pairs in which the flipped sample scores lower, a tie counting one half."""
    from fractions import Fraction

    from lightning_influence.evaluation.metrics import detection_auroc

    g = torch.Generator().manual_seed(n)
    for values in (torch.randint(0, max(1, n // 4), (n,), generator=g).double(), torch.randint(0, 3, (n,), generator=g).float()):
        flipped = torch.rand(n, generator=g) < 0.3
        if n > 1:
            flipped[0], flipped[-1] = True, False
        if bool(flipped.all()) or not bool(flipped.any()):
            with pytest.raises(ValueError, match="needs both positive and negative samples"):
                detection_auroc(values, flipped)
            continue
        pos, neg = values[flipped].tolist(), torch.sort(values[~flipped]).values
        below = torch.searchsorted(neg, torch.tensor(pos, dtype=neg.dtype), right=False)  # clean samples scoring lower
        at_most = torch.searchsorted(neg, torch.tensor(pos, dtype=neg.dtype), right=True)
        right = sum(Fraction(len(neg) - int(a)) + Fraction(int(a) - int(b), 2) for a, b in zip(at_most, below))
        expected = right / (len(pos) * len(neg))
        assert detection_auroc(values, flipped) == float(expected) == cleaning.detection_metrics(values, flipped, [0.5])["auroc"]


def test_the_detection_table_fits_long_estimator_names(capsys) -> None:  # type: ignore[no-untyped-def]
    row = {"auroc": 0.9, "found_in_top_5pct": 0.5}
    report = {
        "target": "val", "num_scored": 10, "num_train_samples": 10, "fit_seconds": 1.0, "score_seconds": 1.0, "most_harmful": [],
        "detection": {"num_flipped": 2, "num_flipped_scored": 2, "noise_kind": "uniform", "estimator": row, "loss": row,
                      "chance": {"found_in_top_5pct": 0.05}},
        "removal": {"count": 1, "requested_count": 1, "seeds": [0], "conditions": {}}, "files": {},
    }
    cleaning._print(report, "influence_function", "test_acc")
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("Flipped labels: 2 (uniform).") + 1 :][:4]
    assert [line.split()[0] for line in table] == ["ranking", "influence_function", "final", "chance"]
    assert len({line.index("  ", len("influence_function")) for line in table[1:]}) == 1
    assert len({len(line) for line in table}) == 1
    # a user datamodule that does not say how its labels were flipped: no "(None)"
    report["detection"]["noise_kind"] = None
    cleaning._print(report, "diffin", "test_acc")
    out = capsys.readouterr().out
    assert "Flipped labels: 2.\n" in out and "None" not in out
    report["num_scored"] = 5
    cleaning._print(report, "diffin", "test_acc")
    assert "(2 in the whole training set of 10); the detection" in capsys.readouterr().out


def test_coreset_of_partly_scored_data_says_what_it_kept(tmp_path: Path) -> None:
    """A recording estimator scores what the scoring fit saw (10 batches of 32)."""
    cfg = compose_cfg(*PARTIAL, "recipe=coreset", "+trainer.limit_train_batches=10", f"output_dir={tmp_path}")
    with pytest.warns(UserWarning, match=r"scored 320 of the 1200 .*keeps 160, fraction 0.5 of the scored samples, which is 0.1333 of the training set; the 880 unscored"):
        report = run(cfg)
    assert (report["num_kept"], report["num_unscored"], report["fraction"]) == (160, 880, 0.5)
    assert report["kept_fraction"] == report["summary"][0]["kept_fraction"] == pytest.approx(160 / 1200)


def test_deletion_sets_beyond_the_scored_samples_are_refused() -> None:
    ids, column = torch.arange(64), torch.linspace(-1, 1, 64)
    with pytest.raises(ValueError, match=r"100 samples exceeds the 64 samples the estimator scored \(of 1200"):
        deletion.deletion_sets(ids, column, [5, 100], ["harmful"], seed=0, num_train=1200)
    assert len(deletion.deletion_sets(ids, column, [64], ["random"], seed=0, num_train=1200)[0]["ids"]) == 64


def test_random_deletion_sets_do_not_depend_on_the_order_of_the_ids() -> None:
    ids = torch.arange(100)
    column = torch.linspace(-1, 1, 100, dtype=torch.float64)
    shuffled = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    kinds = ["harmful", "helpful", "random"]
    in_order = deletion.deletion_sets(ids, column, [5, 20], kinds, seed=7)
    reordered = deletion.deletion_sets(ids[shuffled], column[shuffled], [5, 20], kinds, seed=7)
    for a, b in zip(in_order, reordered, strict=True):
        assert (a["kind"], a["size"]) == (b["kind"], b["size"]) and a["ids"].tolist() == b["ids"].tolist()
    other_seed = deletion.deletion_sets(ids, column, [20], ["random"], seed=8)[0]["ids"]
    assert other_seed.tolist() != in_order[-1]["ids"].tolist()


def test_every_estimator_deletes_the_same_random_sets(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The same seed and sizes give the same random deletion sets and LDS subsets whatever the
    estimator: influence functions return the ids in the (shuffled) loader's order, DiffIn sorted,
    and the sets used to be drawn by position in that order, so a sweep over estimators compared
    each with other random sets."""
    from lightning_influence import evaluation

    drawn: list[dict[str, Any]] = []
    sets_of, removals_of = deletion.deletion_sets, evaluation.random_removals

    def spy_sets(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        sets = sets_of(ids, *args, **kwargs)
        drawn.append({"ids": ids.clone(), "random": [s["ids"].tolist() for s in sets if s["kind"] == "random"]})
        return sets

    def spy_removals(*args, **kwargs):  # type: ignore[no-untyped-def]
        removals = removals_of(*args, **kwargs)
        drawn[-1]["lds"] = removals
        return removals

    monkeypatch.setattr(deletion, "deletion_sets", spy_sets)
    monkeypatch.setattr(evaluation, "random_removals", spy_removals)
    reports = {}
    for name in ("diffin", "influence_function"):
        reports[name] = run(compose_cfg(
            "recipe=deletion", f"estimator={name}", "model=logreg", "recipe.sizes=[5,20]", "recipe.kinds=[random]",
            "recipe.lds_subsets=3", *QUICK, f"output_dir={tmp_path / name}",
        ))
    diffin, influence = drawn
    returned = {name: InfluenceScores.load(tmp_path / name / "scores.pt").ids.tolist() for name in reports}
    assert returned["diffin"] == list(range(1200)), "DiffIn returns the ids sorted"
    assert returned["influence_function"] != list(range(1200)) and sorted(returned["influence_function"]) == list(range(1200)), (
        "influence functions return them in the shuffled loader's order: the case this test is about"
    )
    assert diffin["ids"].tolist() == influence["ids"].tolist() == list(range(1200)), "the recipe ranks in sample-id order"
    assert diffin["random"] == influence["random"] and len(diffin["random"]) == 2
    assert diffin["lds"] == influence["lds"] and len(diffin["lds"]) == 3
    actual = {name: [r["actual"] for r in report["sets"]] for name, report in reports.items()}
    assert actual["diffin"] == pytest.approx(actual["influence_function"], rel=1e-9, abs=1e-12), "the same sets, the same replay"


def test_step_budget_counts_a_partial_batch_as_a_step(tmp_path: Path) -> None:
    """budget=steps: a one-sample coreset takes one step per epoch, so it retrains for the scoring
    fit's 38 steps (38 epochs), not 1200 epochs."""
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
    trainer = compose_cfg().trainer
    assert coreset.steps_per_epoch(1200, loader, trainer) == 300 and coreset.steps_per_epoch(1, loader, trainer) == 1
    assert coreset.steps_per_epoch(10, DataLoader(TensorDataset(torch.arange(10)), batch_size=4, drop_last=True), trainer) == 2
    limited = compose_cfg("+trainer.limit_train_batches=5", "trainer.accumulate_grad_batches=2").trainer
    assert coreset.steps_per_epoch(1200, loader, limited) == 3 and coreset.steps_per_epoch(1200, loader, trainer, world_size=2) == 150
    report = run(compose_cfg("recipe=coreset", "estimator=random", "model=logreg", "recipe.fraction=0.001", "recipe.budget=steps", *QUICK, f"output_dir={tmp_path}"))
    assert (report["num_kept"], report["budget_steps"], report["retrain_steps_per_epoch"], report["retrain_max_epochs"]) == (1, 38, 1, 38)


# ---------------------------------------------------------------------- aggregation of failed jobs and other recipes
def test_aggregation_names_jobs_without_a_report_and_reports_it_cannot_table(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rows = [{"recipe": "coreset", "method": "random", "fraction": 0.5, "seed": 0, "metric": "test_acc", "accuracy": 0.8}]
    _job(tmp_path, "0", ["seed=0"], rows, "random")
    for failed in ("1", "10"):
        (tmp_path / failed / ".hydra").mkdir(parents=True)
    deletion_rows = [{"recipe": "deletion", "method": "diffin", "kind": "harmful", "fraction": 0.01, "seed": 0, "predicted": -0.1, "actual": -0.1}]
    _job(tmp_path, "2", ["seed=2"], deletion_rows, "diffin")
    (tmp_path / "2" / "report.json").write_text(json.dumps({"recipe": "deletion", "summary": deletion_rows}))
    with pytest.warns(UserWarning, match=r"skipped 2 job folder\(s\) without report.json \(failed, killed or unfinished jobs\): 1, 10"):
        assert len(aggregate.collect(tmp_path)) == 1
    assert aggregate.main([str(tmp_path), "--no-plot"]) == 0
    out, err = capsys.readouterr()
    assert "Note: Skipped 2 job folder(s) without report.json" in out and "1, 10" in (tmp_path / "aggregate.md").read_text()
    assert "Skipped 1 report(s) without accuracy rows: 2 (deletion); aggregate tabulates the cleaning and coreset recipes" in out
    assert err.count("warning: ") == 2
    # a deletion sweep alone: the error says what aggregate tables
    _job(tmp_path / "deletion_sweep", "0", ["seed=0"], deletion_rows, "diffin")
    assert aggregate.main([str(tmp_path / "deletion_sweep")]) == 2
    assert "aggregate tabulates the accuracy rows of the cleaning and coreset recipes" in capsys.readouterr().err


# ---------------------------------------------------------------------- precision and data dtype
def test_precision_and_data_dtype_follow_each_other() -> None:
    assert harmonise_precision(compose_cfg("trainer.precision=64-true")).data.dtype == "float64"
    assert harmonise_precision(compose_cfg("data.dtype=float64")).trainer.precision == "64-true"
    assert harmonise_precision(compose_cfg("trainer.precision=64")).data.dtype == "float64"
    cfg = compose_cfg("trainer.precision=bf16-mixed")
    assert harmonise_precision(cfg) is cfg  # mixed precision: float32 weights and data
    with pytest.raises(ValueError, match=r"data.dtype=float64 does not match trainer.precision=bf16-mixed.*64-true"):
        harmonise_precision(compose_cfg("data.dtype=float64", "trainer.precision=bf16-mixed"))


@pytest.mark.parametrize("override", ["trainer.precision=64-true", "data.dtype=float64"])
def test_float64_from_either_side_runs(override: str, tmp_path: Path) -> None:
    """Each alone used to fail deep in torch (mat1 and mat2 must have the same dtype)."""
    report = run(compose_cfg(override, *QUICK, "recipe.remove_count=50", f"output_dir={tmp_path}"))
    written = (tmp_path / "config.yaml").read_text()
    assert "dtype: float64" in written and "precision: 64-true" in written
    assert 0.0 < report["removal"]["conditions"]["no_removal"]["test_acc"]["mean"] <= 1.0
    assert report["detection"]["estimator"]["auroc"] > 0.5


# ---------------------------------------------------------------------- data order under DDP
def test_an_unshuffled_loader_gets_an_unshuffled_distributed_sampler() -> None:
    dataset = TensorDataset(torch.arange(10))
    trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    ordered = distributed_train_loader(DataLoader(dataset, batch_size=3), trainer)
    assert isinstance(ordered.sampler, DistributedSampler) and not ordered.sampler.shuffle
    assert [b[0].tolist() for b in ordered] == [[1, 3, 5], [7, 9]]
    shuffled = DataLoader(dataset, batch_size=3, shuffle=True)
    assert distributed_train_loader(shuffled, trainer) is shuffled  # Lightning's own shuffling sampler
    plain = DataLoader(dataset, batch_size=3)
    assert distributed_train_loader(plain, SimpleNamespace(distributed_sampler_kwargs=None)) is plain
    assert distributed_train_loader(plain, None) is plain


def test_retraining_honours_an_unshuffled_loader() -> None:
    data = DigitsDataModule(batch_size=4, shuffle=False)
    data.setup()
    keep = [9, 3, 700, 5, 1199]
    ids = [int(i) for batch in subset_datamodule(data, keep, seed=1).train_dataloader() for i in batch[2]]
    assert ids == keep
    shuffled = DigitsDataModule(batch_size=4)
    shuffled.setup()
    assert sorted(int(i) for b in subset_datamodule(shuffled, keep, seed=1).train_dataloader() for i in b[2]) == sorted(keep)


BATCH_LOG = '''
import json, os
import lightning as L

class BatchLog(L.Callback):
    """Appends rank, world size and the sample ids of every training batch of each fit to <path>/<pid>.jsonl."""

    def __init__(self, path):
        self.path, self.ids = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += batch[-1].tolist()

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.path, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "world": trainer.world_size, "ids": self.ids}) + "\\n")
'''


def test_ddp_honours_data_shuffle_false(tmp_path: Path) -> None:
    """trainer=ddp data.shuffle=false: the scoring fit and the retraining read each rank's shard in
    dataset order (Lightning's injected sampler would shuffle it); the trial fit before them runs
    on one device in each process."""
    (tmp_path / "batch_log.py").write_text(textwrap.dedent(BATCH_LOG))
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [
        sys.executable, "-m", "lightning_influence", "trainer=ddp", "recipe=coreset", "estimator=random", "model=logreg",
        "data.batch_size=64", "data.shuffle=false", "recipe.fraction=0.5", *QUICK, f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.log._target_=batch_log.BatchLog", f"+callbacks.log.path={logs}",
    ]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["num_kept"] == 600
    processes = [[json.loads(line) for line in p.read_text().splitlines()] for p in logs.glob("*.jsonl")]
    assert len(processes) == 2
    for trial, scoring, retraining in processes:
        assert (trial["world"], trial["ids"]) == (1, list(range(64)))
        rank = scoring["rank"]
        assert scoring["world"] == retraining["world"] == 2 and retraining["rank"] == rank
        assert scoring["ids"] == list(range(rank, 1200, 2))
        assert retraining["ids"] == sorted(retraining["ids"]) and len(retraining["ids"]) == 300
    assert {p[1]["rank"] for p in processes} == {0, 1}


# ---------------------------------------------------------------------- files of an earlier run
def test_files_of_an_earlier_run_are_named_and_left(tmp_path: Path) -> None:
    (tmp_path / "predicted_vs_actual.png").write_bytes(b"an earlier deletion run")
    (tmp_path / "notes.txt").write_text("the user's own")
    (tmp_path / "report.json").write_text(json.dumps({"files": {"extra": "extra_plot.png", "report": "report.json"}}))
    (tmp_path / "extra_plot.png").write_bytes(b"listed by the earlier report")
    cfg = compose_cfg("recipe=coreset", "estimator=random", *QUICK, f"output_dir={tmp_path}")
    with pytest.warns(UserWarning, match=r"did not write: extra_plot.png, predicted_vs_actual.png\. They are left"):
        report = run(cfg)
    assert report["stale_files"] == ["extra_plot.png", "predicted_vs_actual.png"]
    assert json.loads((tmp_path / "report.json").read_text())["stale_files"] == report["stale_files"]
    assert (tmp_path / "predicted_vs_actual.png").read_bytes() == b"an earlier deletion run" and (tmp_path / "notes.txt").is_file()


# ---------------------------------------------------------------------- a sweep over estimators: one row per procedure
def test_a_sweep_over_estimators_gives_each_procedure_its_own_row(tmp_path: Path) -> None:
    """-m estimator=random,loss (cleaning): the random estimator's removal and the random-removal
    baseline, the loss estimator and the final-loss baseline (the same ranking in the loss job) are
    separate rows, each counted once per job; the baselines every job repeats count once."""
    sweep = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_influence", "-m", "estimator=random,loss", "model=logreg", "data.batch_size=64",
         *QUICK, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = {r["estimator"]["name"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/report.json"))}
    assert sorted(reports) == ["loss", "random"]
    methods = {row["method"] for r in reports.values() for row in r["summary"]}
    assert methods == {"random", "loss", "no removal (baseline)", "final loss (baseline)", "random removal (baseline)"}
    rows = aggregate.collect(sweep)
    cells = aggregate.aggregate(rows)
    fraction = round(reports["random"]["removal"]["fraction"], 6)
    conditions = {name: r["removal"]["conditions"] for name, r in reports.items()}
    expected = {
        ("random", fraction): conditions["random"]["estimator"]["test_acc"]["mean"],
        ("random removal (baseline)", fraction): conditions["random"]["random"]["test_acc"]["mean"],
        ("loss", fraction): conditions["loss"]["estimator"]["test_acc"]["mean"],
        ("final loss (baseline)", fraction): conditions["loss"]["loss"]["test_acc"]["mean"],
        ("no removal (baseline)", 0.0): conditions["loss"]["no_removal"]["test_acc"]["mean"],
    }
    assert {(k[3], k[4]) for k in cells} == set(expected)
    for (method, f), value in expected.items():
        cell = cells[("cleaning", "test_acc", "", method, f)]
        assert cell["n"] == 1 and cell["values"] == [pytest.approx(value)], method
    assert aggregate.main([str(sweep), "--no-plot"]) == 0
    table = (sweep / "aggregate.md").read_text()
    assert "| random |" in table and "| random removal (baseline) |" in table and "| final loss (baseline) |" in table


def test_reports_with_bare_baseline_names_are_renamed_not_pooled(tmp_path: Path) -> None:
    """Reports written before the baselines had names of their own (bare no_removal, loss, random
    with or without the baseline flag) tabulate as the recipe names them now."""
    common = {"recipe": "cleaning", "seed": 0, "metric": "test_acc"}
    flagged = [
        {**common, "method": "random", "fraction": 0.1, "accuracy": 0.78, "baseline": False},
        {**common, "method": "no_removal", "fraction": 0.0, "accuracy": 0.84, "baseline": True},
        {**common, "method": "loss", "fraction": 0.1, "accuracy": 0.80, "baseline": True},
        {**common, "method": "random", "fraction": 0.1, "accuracy": 0.81, "baseline": True},
    ]
    _job(tmp_path, "0", ["estimator=random"], flagged, "random")
    unflagged = [{k: v for k, v in row.items() if k != "baseline"} for row in flagged]
    unflagged[0] = {**unflagged[0], "method": "loss", "accuracy": 0.80}
    _job(tmp_path, "1", ["estimator=loss"], unflagged, "loss")
    cells = aggregate.aggregate(aggregate.collect(tmp_path))
    got = {k[3]: (v["n"], v["values"]) for k, v in cells.items()}
    assert got == {
        "random": (1, [0.78]), "loss": (1, [0.80]), "no removal (baseline)": (1, [0.84]),
        "final loss (baseline)": (1, [0.80]), "random removal (baseline)": (1, [0.81]),
    }
    assert aggregate.baseline_method("final loss (baseline)") == "final loss (baseline)"


# ---------------------------------------------------------------------- trajectory retraining under DDP
def test_trajectory_retraining_under_ddp_is_refused_before_anything_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """recipe=deletion trainer=ddp with the default replay: refused before the data are set up,
    naming recipe.retraining=fresh; with fresh the check lets it through to the trial fit."""

    class Reached(Exception):
        pass

    def no_data(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise Reached

    monkeypatch.setattr(common, "preflight", no_data)
    with pytest.raises(ValueError, match=r"recipe.retraining=trajectory .*StepRecorder records the batches one process sees.* trains with "
                       r"2 processes.*Use recipe.retraining=fresh .* or train on one device \(trainer.devices=1"):
        run(compose_cfg("recipe=deletion", "trainer=ddp", *QUICK, f"output_dir={tmp_path}"))
    with pytest.raises(Reached):
        run(compose_cfg("recipe=deletion", "trainer=ddp", "recipe.retraining=fresh", *QUICK, f"output_dir={tmp_path}"))
    with pytest.raises(Reached):
        run(compose_cfg("recipe=deletion", "trainer=ddp", "trainer.devices=1", *QUICK, f"output_dir={tmp_path}"))


# ---------------------------------------------------------------------- NaN scores
def test_nan_scores_rank_last_in_every_selection() -> None:
    ids = torch.arange(6)
    column = torch.tensor([0.5, float("nan"), 0.9, 0.1, float("nan"), 0.3], dtype=torch.float64)
    assert coreset.select_coreset(ids, column, 2 / 6).tolist() == [0, 2]
    assert coreset.select_coreset(ids, column, 0.5, [0, 0, 0, 1, 1, 1]).tolist() == [0, 2, 3, 5]  # 2 per class, NaN last
    sets = deletion.deletion_sets(ids + 10, column, [2], ["harmful", "helpful"], seed=0)
    assert [s["ids"].tolist() for s in sets] == [[13, 15], [12, 10]]
    assert ranking(column).tolist() == [3, 5, 0, 2, 1, 4] and ranking(column, descending=True).tolist() == [2, 0, 5, 3, 1, 4]
    ties = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert ranking(ties).tolist() == [1, 3, 0, 2] and ranking(ties, descending=True).tolist() == [0, 2, 1, 3]  # ties in order


def test_detection_ranks_nan_last_in_both_metrics_and_counts_them() -> None:
    """The ROC-AUC and the share found agree on where a NaN ranks (last: least suspicious)."""
    values = torch.tensor([float("nan"), -2.0, -1.0, float("-inf"), 0.5, float("nan"), 1.0, 0.0], dtype=torch.float64)
    flipped = torch.tensor([True, True, False, False, True, False, False, True])
    got = cleaning.detection_metrics(values, flipped, [0.25, 0.5])
    replaced = torch.tensor([10.0, -2.0, -1.0, -10.0, 0.5, 10.0, 1.0, 0.0], dtype=torch.float64)  # the same order
    expected = cleaning.detection_metrics(replaced, flipped, [0.25, 0.5])
    assert got == {**expected, "num_nan": 2} and expected["num_nan"] == 0
    assert got["found_in_top_25pct"] == 0.25 and got["found_in_top_50pct"] == 0.5  # -inf, -2 | -1, 0


def test_a_nan_final_loss_stops_cleaning_before_detection_and_retraining(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = cleaning.final_loss_scores

    def with_nan(run_):  # type: ignore[no-untyped-def]
        column = real(run_).clone()
        column[[3, 7]] = float("nan")
        return column

    def no_retraining(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("retraining started")

    monkeypatch.setattr(cleaning, "final_loss_scores", with_nan)
    monkeypatch.setattr(cleaning, "retrain_fresh", no_retraining)
    cfg = compose_cfg("estimator=random", "model=logreg", *QUICK, f"output_dir={tmp_path}")
    with pytest.raises(FloatingPointError, match=r"the final-loss ranking .* gave 2 NaN of its 1200 scores \(sample ids 3, 7\).*stops before detection"):
        run(cfg)


def test_nan_estimator_scores_are_counted_and_named(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lightning_influence.estimators.coreset import RandomScores

    real = RandomScores.scores

    def with_nan(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        scores = real(self, *args, **kwargs)
        scores.values[scores.ids == 5] = float("nan")
        scores.values[scores.ids == 9] = float("inf")
        return scores

    monkeypatch.setattr(RandomScores, "scores", with_nan)
    cfg = compose_cfg("recipe=coreset", "estimator=random", "model=logreg", *QUICK, f"output_dir={tmp_path}")
    with pytest.raises(FloatingPointError, match=r"estimator 'random' gave 1 NaN and 1 infinite of its 1200 scores \(sample ids 5, 9\)"):
        run(cfg)


def test_deletion_with_a_post_hoc_estimator_on_a_partial_fit_draws_its_sets_from_the_trained_samples(tmp_path: Path) -> None:
    """A post-hoc estimator scores every sample of the loader, also those the fit never drew: the
    retraining along the recorded steps can only measure the removal of trained ones, so the sets
    are drawn from them (said in a warning) instead of failing (or measuring a removal of 0)."""
    cfg = compose_cfg(
        *PARTIAL, "recipe=deletion", "estimator=influence_function", "+trainer.limit_train_batches=3", "recipe.sizes=[10]",
        "recipe.lds_subsets=4", f"output_dir={tmp_path}",
    )
    with pytest.warns(UserWarning, match=r"1104 of the 1200 scored samples were never trained on.*drawn from the 96 trained ones"):
        report = run(cfg)
    assert [row["size"] for row in report["sets"]] == [10, 10, 10] and report["lds"]["subsets"] == 4


def test_tied_scores_rank_by_sample_id_whatever_order_the_estimator_returns(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The recipes rank ties by sample id: the same scores returned in another order (and coarsened,
    so that many tie) give the same harmful and helpful lists and the same removals."""
    from lightning_influence.recipes import scoring

    real_build = scoring.build

    def reordering(order: str):  # type: ignore[no-untyped-def]
        def build(name, **options):  # type: ignore[no-untyped-def]
            estimator = real_build(name, **options)
            scores = estimator.scores

            def tied(*args, **kwargs):  # type: ignore[no-untyped-def]
                s = scores(*args, **kwargs)
                perm = torch.argsort(s.ids, descending=order == "descending")
                return InfluenceScores(s.ids[perm], (s.values[perm] * 2).round() / 2, s.metadata)  # four or five distinct values

            estimator.scores = tied  # type: ignore[method-assign]
            return estimator

        return build

    reports = []
    for order in ("ascending", "descending"):
        monkeypatch.setattr(scoring, "build", reordering(order))
        out = tmp_path / order
        reports.append(run(compose_cfg(*QUICK, "estimator=loss", "recipe.top_k=20", "recipe.remove_count=30", f"output_dir={out}")))
    a, b = reports
    assert a["most_harmful"] == b["most_harmful"] and a["most_helpful"] == b["most_helpful"]
    assert a["removal"]["conditions"]["estimator"] == b["removal"]["conditions"]["estimator"]
    ids = [row["id"] for row in a["most_harmful"]]
    assert len(set(row["score"] for row in a["most_harmful"])) < len(ids), "the test needs ties"


# ---------------------------------------------------------------------- results of an earlier run in a job's folder
@pytest.mark.slow
def test_a_failed_job_does_not_pass_off_the_earlier_runs_results_as_its_own(tmp_path: Path) -> None:
    """A second sweep into the same sweep folder whose job 1 fails at runtime (a metric the model does
    not log): job 1's folder keeps the first sweep's report.json, scores.pt, ... (not deleted), its
    job marker says the run failed, the run warns that those files are not its own, and the
    aggregation skips the job, naming it and why, instead of tabulating the old numbers under the
    failed job's overrides. Then a single run into job 0's folder (hydra.run.dir) refused before its
    folder was marked: Hydra rewrote .hydra/, and job 0 is skipped too (its config changed)."""
    sweep = tmp_path / "multirun"

    def launch(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lightning_influence", *overrides, "recipe=coreset", "estimator=random", "recipe.fraction=0.5", *QUICK],
            cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        )

    first = launch("-m", f"hydra.sweep.dir={sweep}", "model.lr=0.1,0.5")
    assert first.returncode == 0, first.stderr[-4000:]
    earlier = {name: (sweep / "1" / name).read_bytes() for name in ("report.json", "scores.pt", "config.yaml")}
    marker = json.loads((sweep / "1" / outputs.JOB_MARKER).read_text())
    assert marker["status"] == "finished" and marker["run_id"] == json.loads(earlier["report.json"])["run"]["id"]
    second = launch("-m", f"hydra.sweep.dir={sweep}", "model.lr=0.1", "recipe.metric=test_acc,nope")
    assert "recipe.metric='nope' is not logged by the model" in second.stderr, second.stderr[-4000:]
    assert f"the run failed; {sweep / '1'} holds outputs of an earlier run, not of this one: config.yaml, report.json, scores.csv, scores.pt" in second.stderr
    assert {name: (sweep / "1" / name).read_bytes() for name in earlier} == earlier, "the earlier files are left"
    marker = json.loads((sweep / "1" / outputs.JOB_MARKER).read_text())
    assert marker["status"] == "failed" and marker["error"].startswith("SetupRefused: recipe.metric='nope'") and marker["job_num"] == 1
    assert "recipe.metric=nope" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()

    found = aggregate.scan(sweep)
    assert [job for job, _ in found.not_own] == ["1"] and {row["job"] for row in found.rows} == {"0"}
    assert "the last run there, started " in found.not_own[0][1] and ", failed: SetupRefused: recipe.metric='nope'" in found.not_own[0][1]
    assert aggregate.main([str(sweep), "--no-plot"]) == 0
    table = (sweep / "aggregate.md").read_text()
    assert "nope" not in table.split("Note:")[0] and "[" not in table.split("Note:")[0], "one configuration: job 0's"
    assert "Note: Skipped 1 job folder(s) whose report.json is not the last run's there" in table

    refused = launch(f"hydra.run.dir={sweep / '0'}", "model.lr=0.3", "seed=-3")
    assert refused.returncode != 0 and "seed=-3 is out of range" in refused.stderr, refused.stderr[-3000:]
    assert f"the run failed; {sweep / '0'} holds outputs of an earlier run, not of this one: config.yaml, report.json" in refused.stderr
    assert json.loads((sweep / "0" / outputs.JOB_MARKER).read_text())["status"] == "finished", "refused before the folder was marked"
    found = aggregate.scan(sweep)
    assert [job for job, _ in found.not_own] == ["0", "1"] and not found.rows
    assert "its .hydra/config.yaml is not the config its report.json's run started with" in found.not_own[0][1]
    with pytest.raises(ValueError, match=r"no report.json with accuracy rows below .*skipped 2 job folder\(s\) whose report.json is not the last run's"):
        aggregate.collect(sweep)


def test_aggregation_checks_each_report_against_its_folders_job_marker(tmp_path: Path) -> None:
    """Folders written before reports carried a run id aggregate as before; a report whose run id is
    not the job marker's (or that has none, under a marker that has one) is skipped with a warning
    that names the folder and says why; the marker of a run that is still running or was killed
    says so."""
    rows = [{"recipe": "coreset", "method": "random", "fraction": 0.5, "seed": 0, "metric": "test_acc", "accuracy": 0.8}]
    for name in ("legacy", "own", "killed", "upgraded"):
        _job(tmp_path, name, ["seed=0"], rows, "random")
    (tmp_path / "legacy" / outputs.JOB_MARKER).write_text(json.dumps({"sweep_dir": str(tmp_path), "job_num": 0}))  # before run ids

    def report_of(name: str, run_id: str) -> None:
        path = tmp_path / name / "report.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "run": {"id": run_id, "hydra_config_sha256": None}}))

    def mark(name: str, run_id: str, status: str) -> None:
        (tmp_path / name / outputs.JOB_MARKER).write_text(json.dumps({"run_id": run_id, "status": status, "started": "T0"}))

    report_of("own", "a"), mark("own", "a", "finished")
    report_of("killed", "b"), mark("killed", "c", "running")
    mark("upgraded", "d", "failed")  # a report written before run ids, then a run of this version that failed
    with pytest.warns(UserWarning, match=r"skipped 2 job folder\(s\) whose report.json is not the last run's there") as caught:
        found = aggregate.collect(tmp_path)
    assert sorted(row["job"] for row in found) == ["legacy", "own"]
    message = str(caught[0].message)
    assert "killed (the last run there, started T0, did not finish (killed, or still running); its report.json is of an earlier run (run b" in message
    assert "upgraded (the last run there, started T0, failed; its report.json is of an earlier run (without run id" in message


# ---------------------------------------------------------------------- sample ids must be positions
class _TrainOnly(L.LightningDataModule):
    def __init__(self, dataset) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return DataLoader(self.dataset, batch_size=16, shuffle=True)


def test_recipes_refuse_sample_ids_that_are_not_positions_of_the_training_set() -> None:
    """The recipes retrain on ``Subset(dataset, kept ids)`` and read labels by position: ids kept
    from before a shuffle, or an IndexedDataset split with random_split (a Subset carrying the full
    set's positions), retrained without other samples than the scored ones (QA: 12 flagged ids
    removed, 12 others left out, report unchanged)."""
    from lightning_influence import IndexedDataset
    from lightning_influence.config import SetupRefused
    from lightning_influence.models import Classifier
    from lightning_influence.recipes.preflight import check_ids_are_positions

    x, y = torch.randn(40, 64), torch.randint(0, 10, (40,))
    model = Classifier(hidden=(8,))
    permuted = TensorDataset(x, y, torch.randperm(40, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"sample id i must be item i of the training dataset, but item \d+ carries sample id \d+ \(TensorDataset of 40 items\)"):
        check_ids_are_positions(model, _TrainOnly(permuted))
    split = torch.utils.data.random_split(IndexedDataset(TensorDataset(x, y)), [30, 10], generator=torch.Generator().manual_seed(0))[0]
    with pytest.raises(ValueError, match=r"carries sample id .*\(Subset of 30 items\).*a Subset of an IndexedDataset carries the full set's positions"):
        check_ids_are_positions(model, _TrainOnly(split))
    check_ids_are_positions(model, _TrainOnly(IndexedDataset(TensorDataset(x, y))))
    check_ids_are_positions(model, _TrainOnly(TensorDataset(x, y, torch.arange(40))))
    assert issubclass(SetupRefused, ValueError)


def test_the_ids_check_collates_as_the_loader_does_and_trial_refusals_are_the_librarys_own() -> None:
    """The probes are collated in the loader's batch size (a fixed-shape collate refused 66 items at
    once); a fault in the user's own code is raised as itself, with its traceback, not as a
    one-line refusal."""
    from lightning_influence import IndexedDataset
    from lightning_influence.models import Classifier
    from lightning_influence.recipes.preflight import _raised_by_library, check_ids_are_positions

    class FixedShape(_TrainOnly):
        def train_dataloader(self):  # type: ignore[no-untyped-def]
            def collate(items):  # type: ignore[no-untyped-def]
                assert len(items) <= 16, f"collate got {len(items)} items"
                return torch.utils.data.default_collate(items)

            return DataLoader(self.dataset, batch_size=16, collate_fn=collate)

    class Own(torch.utils.data.Dataset):  # items carry their own index, without IndexedDataset
        def __len__(self) -> int:
            return 200

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            return torch.zeros(64), 0, i

    check_ids_are_positions(Classifier(hidden=(8,)), FixedShape(Own()))
    check_ids_are_positions(Classifier(hidden=(8,)), FixedShape(IndexedDataset(TensorDataset(torch.zeros(40, 64), torch.zeros(40).long()))))

    def user_code() -> None:
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")

    for raise_it, ours in ((user_code, False), (lambda: check_ids_are_positions(Classifier(hidden=(8,)), _TrainOnly(TensorDataset(torch.zeros(4, 64), torch.zeros(4).long(), torch.tensor([3, 2, 1, 0])))), True)):
        with pytest.raises((TypeError, ValueError)) as err:
            raise_it()
        assert _raised_by_library(err.value) is ours
