"""The recipes end to end through the real entry point (``python -m lightning_influence``, Hydra
run and multirun directories, real Trainer runs and retraining), their reports checked against
the data they were run on; and their building blocks (label flips, synthetic data, the small
CNN, set selection, aggregation) against direct computations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from lightning_influence import InfluenceScores
from lightning_influence.app import run
from lightning_influence.data import DIGITS_CONFUSABLE, DigitsDataModule, SyntheticDataModule, flip_labels
from lightning_influence.estimators.base import build
from lightning_influence.models import SmallCNN
from lightning_influence.recipes import aggregate
from lightning_influence.recipes.retraining import subset_datamodule, summary
from lightning_influence.recipes.coreset import select_coreset
from lightning_influence.recipes.deletion import deletion_sets

CONF = "lightning_influence.conf"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def entry_point(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def compose_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------------- end to end
def test_cleaning_finds_flipped_labels_and_retrains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = entry_point("lightning_influence", "recipe=cleaning", "trainer.max_epochs=3", "recipe.seeds=[0,1]", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("scores.pt", "scores.csv", "config.yaml", "score_histogram.png", "detection_curve.png", "most_harmful.png"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name

    data = DigitsDataModule(label_noise=0.1, seed=0)
    data.setup()
    flipped = set(data.flipped_ids.tolist())
    det = report["detection"]
    assert det["num_flipped"] == len(flipped) == 120 and det["noise_kind"] == "uniform"
    # Recompute the headline number from the score file: the share of flipped labels among the 10% lowest.
    scores = InfluenceScores.load(run_dir / "scores.pt")
    lowest = scores.ids[torch.argsort(scores.values, stable=True)[:120]].tolist()
    found = sum(i in flipped for i in lowest) / 120
    assert det["estimator"]["found_in_top_10pct"] == pytest.approx(found)
    assert found > 3 * 0.10, f"the 10% most harmful hold {found:.0%} of the flipped labels; chance is 10%"
    assert det["estimator"]["auroc"] > 0.8 and det["loss"]["auroc"] > 0.8
    assert det["estimator"]["found_in_top_5pct"] <= det["estimator"]["found_in_top_10pct"] <= det["estimator"]["found_in_top_20pct"]

    removal = report["removal"]
    assert removal["count"] == 120 and set(removal["conditions"]) == {"no_removal", "estimator", "loss", "random"}
    for name, cond in removal["conditions"].items():
        acc = cond["test_acc"]
        assert acc["n"] == 2 and all(0.0 <= v <= 1.0 for v in acc["values"]) and acc["std"] >= 0.0
        assert cond["removed"] == (0 if name == "no_removal" else 120)
    assert removal["conditions"]["estimator"]["flipped_removed"]["mean"] == sum(i in flipped for i in lowest)
    assert removal["conditions"]["random"]["flipped_removed"]["mean"] < 40
    delta = removal["conditions"]["estimator"]["test_acc_minus_no_removal"]
    assert delta["values"] == pytest.approx(
        [a - b for a, b in zip(removal["conditions"]["estimator"]["test_acc"]["values"], removal["conditions"]["no_removal"]["test_acc"]["values"])]
    )
    assert "ROC-AUC" in proc.stdout and "no_removal" in proc.stdout


def test_deletion_predictions_match_retraining(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    entry_point(
        "lightning_influence", "recipe=deletion", "trainer.max_epochs=2", "recipe.sizes=[10,40]", "recipe.lds_subsets=5",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "predicted_vs_actual.png").is_file()
    sets = report["sets"]
    assert report["predicted_calibrated"] is True  # DiffIn's scores are in target-loss units
    assert [(s["kind"], s["size"]) for s in sets] == [(k, n) for n in (10, 40) for k in ("harmful", "helpful", "random")]
    scores = InfluenceScores.load(run_dir / "scores.pt")
    lowest = torch.sort(scores.values).values
    assert sets[0]["predicted"] == pytest.approx(float(lowest[:10].sum()))
    assert sets[4]["predicted"] == pytest.approx(float(lowest.flip(0)[:40].sum()))
    for s in sets:
        if s["kind"] == "harmful":
            assert s["predicted"] < 0 and s["actual"] < 0, s
        if s["kind"] == "helpful":
            assert s["predicted"] > 0 and s["actual"] > 0, s
    assert report["retraining"] == "trajectory" and report["correlation"]["pearson"] > 0.8
    assert report["lds"]["subsets"] == 5 and report["lds"]["lds"] is not None


@pytest.mark.slow
def test_coreset_multirun_sweep_and_aggregation(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    entry_point(
        "lightning_influence", "-m", "recipe=coreset", "estimator=diffin,random", "recipe.fraction=0.3,0.6", "recipe.seeds=[0]",
        "trainer.max_epochs=2", "recipe.plots=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    reports = [json.loads(p.read_text()) for p in sorted(sweep.rglob("report.json"))]
    assert len(reports) == 4
    assert {(r["method"], r["fraction"]) for r in reports} == {(m, f) for m in ("diffin", "random") for f in (0.3, 0.6)}
    for r in reports:
        assert r["num_kept"] == round(r["fraction"] * 1200) and r["target"] == "train"
    proc = entry_point("lightning_influence.recipes.aggregate", str(sweep), cwd=tmp_path)
    table = (sweep / "aggregate.md").read_text()
    assert "| method | 0.3 kept | 0.6 kept |" in table and "| diffin |" in table and "| random |" in table
    assert table in proc.stdout
    rows = (sweep / "aggregate.csv").read_text().splitlines()
    assert rows[0] == "recipe,metric,method,fraction,mean,std,n,config" and len(rows) == 5
    by_key = {(r["method"], r["fraction"]): r["test_acc"]["mean"] for r in reports}
    for line in rows[1:]:
        _, _, method, fraction, mean, _, n, config = line.split(",")
        assert float(mean) == pytest.approx(by_key[(method, float(fraction))], abs=1e-6) and n == "1" and config == ""
    assert (sweep / "accuracy_vs_fraction.png").stat().st_size > 0


# ---------------------------------------------------------------------- in-process variants
def test_cleaning_class_conditional_with_self_influence(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "experiment=cleaning_class_conditional", "recipe.target=train", "trainer.max_epochs=2", "recipe.seeds=[0]",
        "recipe.remove_count=50", "recipe.plots=false", f"output_dir={tmp_path}",
    )
    report = run(cfg)
    assert report["target"] == "train" and report["score_metadata"]["target"] == "train"
    assert report["detection"]["noise_kind"] == "class_conditional" and report["removal"]["count"] == 50
    assert 0.0 <= report["detection"]["estimator"]["auroc"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["recipe"] == "cleaning"


def test_deletion_with_fresh_retraining(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "recipe=deletion", "recipe.retraining=fresh", "recipe.seeds=[0,1]", "recipe.sizes=[150]", "trainer.max_epochs=2",
        "recipe.plots=false", f"output_dir={tmp_path}",
    )
    report = run(cfg)
    rows = {r["kind"]: r for r in report["sets"]}
    assert report["retraining"] == "fresh" and report["seeds"] == [0, 1]
    assert rows["harmful"]["actual"] < rows["helpful"]["actual"], "deleting the most helpful samples must hurt more"
    assert rows["helpful"]["actual"] > 0 and rows["helpful"]["actual_std"] >= 0


def test_coreset_class_balanced_with_a_baseline(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "recipe=coreset", "estimator=el2n", "recipe.class_balanced=true", "recipe.fraction=0.25", "recipe.seeds=[0]",
        "trainer.max_epochs=1", f"output_dir={tmp_path}",
    )
    report = run(cfg)
    per_class = report["kept_per_class"]
    assert set(per_class) == {str(c) for c in range(10)}
    data = DigitsDataModule(label_noise=0.1, seed=0)
    data.setup()
    labels = torch.stack([data.train_set[i][1] for i in range(len(data.train_set))])
    for c, kept in per_class.items():
        assert kept == max(1, round(0.25 * int((labels == int(c)).sum())))
    assert report["higher_means"].startswith("harder") and (tmp_path / "score_histogram.png").is_file()


# ---------------------------------------------------------------------- building blocks
def test_uniform_flips_are_backward_compatible() -> None:
    """The default digits split and uniform flips are the ones drawn before noise kinds existed."""
    data = DigitsDataModule(label_noise=0.1, seed=5)
    data.setup()
    g = torch.Generator().manual_seed(5)
    torch.randperm(1797, generator=g)  # the split
    ids = torch.randperm(1200, generator=g)[:120].sort().values
    shift = torch.randint(1, 10, (120,), generator=g)
    assert torch.equal(data.flipped_ids, ids)
    noisy = torch.stack([data.train_set[i][1] for i in ids.tolist()])
    assert torch.equal(noisy, (data.clean_labels[ids] + shift) % 10)


def test_class_conditional_flips_go_to_the_confusable_partner() -> None:
    data = DigitsDataModule(label_noise=0.2, noise_kind="class_conditional", noise_seed=11)
    data.setup()
    assert len(data.flipped_ids) == 240
    noisy = torch.stack([data.train_set[i][1] for i in range(len(data.train_set))])
    changed = (noisy != data.clean_labels).nonzero().reshape(-1)
    assert torch.equal(changed, data.flipped_ids)
    for i in changed.tolist():
        assert int(noisy[i]) == DIGITS_CONFUSABLE[int(data.clean_labels[i])]
    assert all(DIGITS_CONFUSABLE[DIGITS_CONFUSABLE[c]] == c for c in range(10))
    none = DigitsDataModule(label_noise=0.2, noise_kind="none")
    none.setup()
    assert len(none.flipped_ids) == 0
    with pytest.raises(ValueError, match="noise_kind"):
        DigitsDataModule(noise_kind="pairs")
    with pytest.raises(ValueError, match="themselves"):
        flip_labels(torch.zeros(10, dtype=torch.long), 0.5, "class_conditional", 2, torch.Generator(), {0: 0, 1: 0})


def test_synthetic_data_is_seeded_and_flips_to_the_nearest_class() -> None:
    a = SyntheticDataModule(num_samples=3000, num_classes=4, val_size=500, test_size=500, label_noise=0.1, noise_kind="class_conditional", seed=2)
    b = SyntheticDataModule(num_samples=3000, num_classes=4, val_size=500, test_size=500, label_noise=0.1, noise_kind="class_conditional", seed=2)
    a.setup(), b.setup()
    assert len(a.train_set) == 2000 and len(a.flipped_ids) == 200 and torch.equal(a.flipped_ids, b.flipped_ids)
    x, y, i = a.train_set[7]
    assert x.shape == (64,) and i == 7 and torch.equal(x, b.train_set[7][0])
    xs, ys = a._tensors()
    means = torch.stack([xs[ys == c].double().mean(0) for c in range(4)])
    dist = torch.cdist(means, means) + torch.eye(4) * 1e9
    partner = a._partner(xs, ys)
    assert partner == {c: int(dist[c].argmin()) for c in range(4)}


def test_small_cnn_trains_and_has_per_sample_outputs() -> None:
    model = SmallCNN()
    x, y = torch.rand(5, 64), torch.tensor([0, 1, 2, 3, 4])
    logits, labels = model.per_sample_outputs((x, y, torch.arange(5)))
    assert logits.shape == (5, 10) and torch.equal(labels, y)
    loss = model.per_sample_loss((x, y, torch.arange(5)))
    assert loss.shape == (5,) and torch.allclose(loss, torch.nn.functional.cross_entropy(model(x.reshape(5, 1, 8, 8)), y, reduction="none"))


def test_subset_datamodule_keeps_original_ids() -> None:
    data = DigitsDataModule(batch_size=16, seed=0)
    data.setup()
    keep = [3, 5, 700, 1199]
    sub = subset_datamodule(data, keep, seed=1)
    seen = sorted(int(i) for batch in sub.train_dataloader() for i in batch[2])
    assert seen == keep
    assert len(sub.val_dataloader().dataset) == 300 and len(sub.test_dataloader().dataset) == 297


def test_set_selection() -> None:
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    column = torch.tensor([0.5, -2.0, 1.0, -1.0, 3.0, 0.0], dtype=torch.float64)
    sets = deletion_sets(ids, column, [2], ["harmful", "helpful", "random"], seed=0)
    assert sets[0]["ids"].tolist() == [11, 13] and sets[1]["ids"].tolist() == [14, 12] and len(sets[2]["ids"]) == 2
    assert select_coreset(ids, column, 0.5).tolist() == [10, 12, 14]
    assert select_coreset(ids, column, 0.5, [0, 0, 0, 1, 1, 1]).tolist() == [10, 12, 14, 15]  # round(1.5) = 2 per class
    with pytest.raises(ValueError, match="whole training set"):
        deletion_sets(ids, column, [6], ["harmful"], seed=0)


def test_summary_and_aggregation_of_hand_made_reports(tmp_path: Path) -> None:
    s = summary([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item()) and s["n"] == 3
    for job, (method, fraction, acc) in enumerate([("a", 0.5, 0.8), ("a", 0.5, 0.9), ("b", 0.5, 0.7), ("a", 0.2, 0.6)]):
        (tmp_path / str(job)).mkdir()
        row = {"recipe": "coreset", "method": method, "fraction": fraction, "seed": job, "metric": "test_acc", "accuracy": acc}
        (tmp_path / str(job) / "report.json").write_text(json.dumps({"summary": [row]}))
    cells = aggregate.aggregate(aggregate.collect(tmp_path))
    assert cells[("coreset", "test_acc", "", "a", 0.5)]["mean"] == pytest.approx(0.85) and cells[("coreset", "test_acc", "", "a", 0.5)]["n"] == 2
    table = aggregate.markdown_table(cells)
    assert "| a | 0.6000 +- 0.0000 (1) | 0.8500 +- 0.0707 (2) |" in table and "| b |  | 0.7000 +- 0.0000 (1) |" in table
    assert aggregate.main([str(tmp_path / "missing")]) == 2


def test_plots_need_matplotlib_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from lightning_influence import plots

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"lightning-influence\[plots\].*recipe.plots=false"):
        plots.require_matplotlib()


def test_final_loss_baseline_is_the_registered_estimator() -> None:
    assert build("loss").name == "loss"


@pytest.mark.parametrize("recipe", ["cleaning", "deletion"])
def test_coreset_rankings_are_refused_where_removal_effects_are_needed(recipe: str, tmp_path: Path) -> None:
    """EL2N ranks hard samples high (keep): cleaning/deletion would take the easiest samples for the
    most harmful. Refused before any training, saying where it belongs."""
    cfg = compose_cfg(f"recipe={recipe}", "estimator=el2n", "recipe.plots=false", f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"estimator 'el2n' ranks samples for a coreset.*recipe=coreset"):
        run(cfg)
    assert build("grand").ranks_for_keeping and build("forgetting").ranks_for_keeping
    assert not build("loss").ranks_for_keeping and not build("diffin").ranks_for_keeping


def test_top_level_values_of_the_wrong_type_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="seed must be an integer, got 'abc'"):
        run(compose_cfg("seed=abc", f"output_dir={tmp_path}"))
    with pytest.raises(ValueError, match="num_threads must be a positive integer or null, got 0"):
        run(compose_cfg("num_threads=0", f"output_dir={tmp_path}"))


def test_baselines_repeated_by_a_sweep_over_estimators_count_once(tmp_path: Path) -> None:
    """Two cleaning jobs (estimators diffin and tracin, seed 0) both report the no-removal and random
    baselines of the same run: one value each, not two."""
    for job, (estimator, acc) in enumerate([("diffin", 0.93), ("tracin", 0.91)]):
        rows = [
            {"recipe": "cleaning", "method": estimator, "fraction": 0.1, "seed": 0, "metric": "test_acc", "accuracy": acc},
            {"recipe": "cleaning", "method": "no_removal", "fraction": 0.0, "seed": 0, "metric": "test_acc", "accuracy": 0.92},
            {"recipe": "cleaning", "method": "random", "fraction": 0.1, "seed": 0, "metric": "test_acc", "accuracy": 0.915},
        ]
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "report.json").write_text(json.dumps({"summary": rows}))
    cells = aggregate.aggregate(aggregate.collect(tmp_path))
    assert cells[("cleaning", "test_acc", "", "no_removal", 0.0)]["n"] == cells[("cleaning", "test_acc", "", "random", 0.1)]["n"] == 1
    assert cells[("cleaning", "test_acc", "", "diffin", 0.1)]["n"] == cells[("cleaning", "test_acc", "", "tracin", 0.1)]["n"] == 1
