"""What the recipes' reports hold: labels as they are (a regression target is no class label),
the chance row of the cleaning detection table on small training sets, random baselines that
do not coincide with a user's own seeded draws, and the sample ids behind every reported
number (each checked against a direct computation)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, InfluenceMixin, InfluenceScores
from lightning_influence.app import run
from lightning_influence.evaluation.metrics import fraction_found
from lightning_influence.recipes import aggregate, cleaning
from lightning_influence.recipes.common import BASELINE_SALT, baseline_seed
from lightning_influence.recipes.coreset import check_class_labels, select_coreset
from lightning_influence.recipes.deletion import deletion_sets
from lightning_influence.recipes.outputs import sample_rows
from lightning_influence.recipes.training_set import are_classes, class_labels, labels_of

CONF = "lightning_influence.conf"
SMALL_DATA = (
    "data=synthetic", "data.num_samples=110", "data.num_features=4", "data.num_classes=3", "data.val_size=30",
    "data.test_size=30", "data.batch_size=16", "trainer.max_epochs=1", "recipe.plots=false",
)


def compose_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------------- a user's regression task
class RegData(L.LightningDataModule):
    """y = w.x + noise + 2.5, float targets; ``flipped_ids``: the corrupted targets."""

    def __init__(self, n_train: int = 40, seed: int = 0) -> None:
        super().__init__()
        self.n_train, self.seed = n_train, seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        g = torch.Generator().manual_seed(self.seed)
        n = self.n_train + 40
        x = torch.randn(n, 3, generator=g)
        y = x @ torch.randn(3, generator=g) + 0.3 * torch.randn(n, generator=g) + 2.5
        ytr = y[: self.n_train].clone()
        self.flipped_ids = torch.arange(0, self.n_train, 8)
        ytr[self.flipped_ids] += 6.0
        a = self.n_train
        self.train_set = IndexedDataset(TensorDataset(x[:a], ytr))
        self.val_set = IndexedDataset(TensorDataset(x[a : a + 20], y[a : a + 20]))
        self.test_set = IndexedDataset(TensorDataset(x[a + 20 :], y[a + 20 :]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=64)


class Regressor(InfluenceMixin, L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ = batch
        return (self(x) - y) ** 2

    def training_step(self, batch, i):  # type: ignore[no-untyped-def]
        return self.per_sample_loss(batch).mean()

    def validation_step(self, batch, i):  # type: ignore[no-untyped-def]
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def test_step(self, batch, i):  # type: ignore[no-untyped-def]
        self.log("test_mse", self.per_sample_loss(batch).mean())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_cfg(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = compose_cfg("trainer.max_epochs=1", "recipe.seeds=[0]", "recipe.plots=false", "recipe.metric=test_mse", f"output_dir={tmp_path}", *overrides)
    with open_dict(cfg):
        cfg.data = OmegaConf.create({"_target_": f"{__name__}.RegData"})
        cfg.model = OmegaConf.create({"_target_": f"{__name__}.Regressor"})
    return cfg


# ---------------------------------------------------------------------- labels
def test_labels_are_written_as_they_are_and_regression_targets_are_no_classes() -> None:
    targets = torch.tensor([-5.46, -6.98, 0.49, 0.51, 2.2, 2.9])
    ds = IndexedDataset(TensorDataset(torch.randn(6, 2), targets))
    labels = labels_of(ds, range(6))
    assert labels == [-5.46, -6.98, 0.49, 0.51, 2.2, 2.9] and all(isinstance(y, float) for y in labels)
    assert [r["label"] for r in sample_rows(ds, torch.tensor([0, 1]), torch.tensor([-0.02, -0.01]), set())] == [-5.46, -6.98]
    classes = IndexedDataset(TensorDataset(torch.randn(3, 2), torch.tensor([2, 0, 1])))
    assert labels_of(classes, range(3)) == [2, 0, 1] and all(type(y) is int for y in labels_of(classes, range(3)))
    assert labels_of(IndexedDataset(TensorDataset(torch.randn(2, 2), torch.tensor([0.5, 1.5], dtype=torch.float64))), [0, 1]) == [0.5, 1.5]

    assert not are_classes(labels) and are_classes([0, 1.0, 2]) and not are_classes([0, None])
    assert class_labels([0.0, 1.0, 1], "x", "fix") == [0, 1, 1]  # a binary classifier's float targets are classes
    with pytest.raises(ValueError, match=r"recipe.class_balanced=true needs class labels, but 6 of the 6 .*not whole numbers.*-5\.46.*class_balanced=false"):
        select_coreset(torch.arange(6), torch.arange(6.0), 0.5, labels)
    with pytest.raises(ValueError, match="not whole numbers"):
        check_class_labels(ds, 6)
    with pytest.raises(ValueError, match="1 of 2 carry none"):
        select_coreset(torch.arange(2), torch.arange(2.0), 0.5, [0, None])
    assert select_coreset(torch.arange(4), torch.tensor([4.0, 3, 2, 1]), 0.5, [0.0, 0.0, 1.0, 1.0]).tolist() == [0, 2]


def test_regression_coreset_refuses_class_balance_before_scoring_and_names_its_metric(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not whole numbers") as refused:
        run(regression_cfg(tmp_path / "balanced", "recipe=coreset", "estimator=random", "recipe.class_balanced=true"))
    assert not (tmp_path / "balanced" / "scores.pt").exists(), refused.value  # refused in the trial, before scoring

    report = run(regression_cfg(tmp_path / "plain", "recipe=coreset", "estimator=random", "recipe.fraction=0.5"))
    assert report["kept_per_class"] is None  # a regression target has no classes to count
    (row,) = report["summary"]
    assert "accuracy" not in row and row["metric"] == "test_mse" and row["test_mse"] == report["test_mse"]["mean"]
    assert aggregate.row_value(row) == row["test_mse"]
    scores = InfluenceScores.load(tmp_path / "plain" / "scores.pt")
    assert report["kept_ids"] == sorted(scores.ids[torch.argsort(scores.values, descending=True, stable=True)[:20]].tolist())


def test_regression_cleaning_reports_float_labels(tmp_path: Path) -> None:
    report = run(regression_cfg(tmp_path, "estimator=loss", "recipe.remove_count=5"))
    data = RegData()
    data.setup()
    for row in report["most_harmful"]:
        assert row["label"] == pytest.approx(float(data.train_set[row["id"]][1]), abs=1e-6) and isinstance(row["label"], float)
    assert {r["metric"] for r in report["summary"]} == {"test_mse"} and all("test_mse" in r and "accuracy" not in r for r in report["summary"])


def test_aggregation_reads_rows_named_after_their_metric_and_older_accuracy_rows(tmp_path: Path) -> None:
    rows = [
        {"recipe": "coreset", "method": "a", "fraction": 0.5, "seed": 0, "metric": "test_mse", "test_mse": 2.0},
        {"recipe": "coreset", "method": "a", "fraction": 0.5, "seed": 1, "metric": "test_mse", "accuracy": 4.0},  # an older report
    ]
    for job, row in enumerate(rows):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "report.json").write_text(json.dumps({"summary": [row]}))
    cells = aggregate.aggregate(aggregate.collect(tmp_path))
    assert cells[("coreset", "test_mse", "", "a", 0.5)]["values"] == [2.0, 4.0]


# ---------------------------------------------------------------------- chance on small training sets
def test_the_chance_row_is_the_share_the_top_fractions_take() -> None:
    n, fractions = 12, [0.05, 0.1, 0.2]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[:3] = True
    dm = SimpleNamespace(flipped_ids=torch.arange(3), noise_kind=None, label_noise=None)
    state = SimpleNamespace(
        scored=SimpleNamespace(datamodule=dm, column=torch.arange(n, dtype=torch.float64)), num_train=n, num_scored=n,
        params=SimpleNamespace(top_fractions=fractions),
    )
    det = cleaning._detection(state, {0, 1, 2}, flipped, torch.arange(n, dtype=torch.float64))  # type: ignore[arg-type]
    assert det["top_counts"] == {"found_in_top_5pct": 1, "found_in_top_10pct": 1, "found_in_top_20pct": 2}
    assert det["chance"] == pytest.approx({"found_in_top_5pct": 1 / 12, "found_in_top_10pct": 1 / 12, "found_in_top_20pct": 2 / 12})
    # the counts are the metric's own: one flipped label at the very top is found once per sample taken
    for f in fractions:
        key = f"found_in_top_{100 * f:g}pct"
        assert fraction_found(torch.arange(n), torch.ones(n, dtype=torch.bool), f) == det["top_counts"][key] / n
        # the mean recall of a random ranking over every position of the flipped labels is the chance
        recall = sum(fraction_found(torch.roll(torch.arange(n), s), flipped, f) for s in range(n)) / n
        assert recall == pytest.approx(det["chance"][key])


def test_the_printed_table_names_what_the_top_fractions_take(capsys) -> None:  # type: ignore[no-untyped-def]
    row = {"auroc": 0.9, "found_in_top_5pct": 0.5, "found_in_top_10pct": 0.5}
    report = {
        "target": "val", "num_scored": 12, "num_train_samples": 12, "fit_seconds": 1.0, "score_seconds": 1.0, "most_harmful": [],
        "detection": {"num_flipped": 2, "num_flipped_scored": 2, "noise_kind": None, "estimator": row, "loss": row,
                      "chance": {"found_in_top_5pct": 1 / 12, "found_in_top_10pct": 1 / 12},
                      "top_counts": {"found_in_top_5pct": 1, "found_in_top_10pct": 1}},
        "removal": {"count": 1, "requested_count": 1, "seeds": [0], "conditions": {}}, "files": {},
    }
    cleaning._print(report, "diffin", "test_acc")
    out = capsys.readouterr().out
    assert "8.3%" in out and "top_5pct 1, top_10pct 1" in out


# ---------------------------------------------------------------------- random baselines
def test_random_baselines_do_not_coincide_with_small_user_seeds() -> None:
    n, count = 400, 40
    user_draws = [torch.randperm(n, generator=torch.Generator().manual_seed(t))[:count] for t in range(64)]
    for seed in (0, 1):
        for retrain_seed in (0, 1, 2):
            removed = cleaning.random_removal(n, count, seed, retrain_seed)
            assert torch.equal(removed, cleaning.random_removal(n, count, seed, retrain_seed))  # deterministic per seed
            assert all(int(torch.isin(removed, draw).sum()) < count // 2 for draw in user_draws), (seed, retrain_seed)
        (chosen,) = deletion_sets(torch.arange(n), torch.zeros(n), [count], ["random"], seed=seed)
        assert all(int(torch.isin(chosen["ids"], draw).sum()) < count // 2 for draw in user_draws), seed
    # the documented formula
    expected = int.from_bytes(hashlib.sha256(f"{BASELINE_SALT}/cleaning random removal/0/1".encode()).digest()[:8], "little") >> 1
    assert baseline_seed("cleaning random removal", 0, 1) == expected
    assert torch.equal(cleaning.random_removal(n, count, 0, 1), torch.randperm(n, generator=torch.Generator().manual_seed(expected))[:count])


# ---------------------------------------------------------------------- the ids behind the numbers
def test_cleaning_report_lists_the_removed_ids_of_every_condition_and_seed(tmp_path: Path) -> None:
    report = run(compose_cfg(*SMALL_DATA, "recipe.seeds=[0,1]", "recipe.remove_count=10", f"output_dir={tmp_path}"))
    removal, flipped = report["removal"], set(_flipped(tmp_path))
    scores = InfluenceScores.load(tmp_path / "scores.pt")
    lowest = scores.ids[torch.argsort(scores.values, stable=True)[:10]].tolist()
    conditions = removal["conditions"]
    assert conditions["no_removal"]["removed_ids"] == [[], []]
    assert conditions["estimator"]["removed_ids"] == [lowest, lowest]
    assert conditions["random"]["removed_ids"] == [cleaning.random_removal(50, 10, 0, s).tolist() for s in (0, 1)]
    for cond in conditions.values():
        assert len(cond["removed_ids"]) == len(removal["seeds"])
        assert cond["flipped_removed"]["values"] == [sum(i in flipped for i in ids) for ids in cond["removed_ids"]]
    # a 5% top of 50 samples takes round(2.5) = 2 of them: chance 4%, not 5%
    assert report["detection"]["chance"]["found_in_top_5pct"] == pytest.approx(2 / 50)
    assert json.loads((tmp_path / "report.json").read_text())["removal"]["conditions"]["random"]["removed_ids"] == conditions["random"]["removed_ids"]
    text = (tmp_path / "report.json").read_text()
    assert '"removed_ids": [\n' in text and json.dumps(lowest) in text  # one line per list of ids, not one line per id


def _flipped(out: Path) -> list[int]:
    cfg = OmegaConf.load(out / "config.yaml")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    return dm.flipped_ids.tolist()


def test_deletion_and_coreset_reports_list_their_sets_and_kept_ids(tmp_path: Path) -> None:
    report = run(compose_cfg(*SMALL_DATA, "recipe=deletion", "recipe.sizes=[3,7]", f"output_dir={tmp_path / 'del'}"))
    scores = InfluenceScores.load(tmp_path / "del" / "scores.pt")
    by_id = dict(zip(scores.ids.tolist(), scores.values.tolist(), strict=True))
    order = scores.ids[torch.argsort(scores.values, stable=True)].tolist()
    for row in report["sets"]:
        assert len(row["ids"]) == len(set(row["ids"])) == row["size"]
        assert row["predicted"] == pytest.approx(sum(by_id[i] for i in row["ids"]))
        if row["kind"] == "harmful":
            assert row["ids"] == order[: row["size"]]
        if row["kind"] == "random":
            (drawn,) = deletion_sets(scores.ids, scores.values, [row["size"]], ["random"], seed=0)
            assert row["ids"] == drawn["ids"].tolist()

    report = run(compose_cfg(*SMALL_DATA, "recipe=coreset", "recipe.seeds=[0]", "recipe.fraction=0.3", f"output_dir={tmp_path / 'core'}"))
    scores = InfluenceScores.load(tmp_path / "core" / "scores.pt")
    assert report["kept_ids"] == sorted(scores.ids[torch.argsort(scores.values, descending=True, stable=True)[:15]].tolist())
    assert report["num_kept"] == len(report["kept_ids"]) == 15 and sum(report["kept_per_class"].values()) == 15


# ---------------------------------------------------------------------- rank zero
def test_rank_zero_is_read_from_lightning_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from lightning_influence import app, distributed
    from lightning_influence.recipes import common, coreset, deletion, outputs

    assert distributed.is_global_zero()
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert not distributed.is_global_zero()
    for module in (app, common, cleaning, coreset, deletion, outputs):
        assert module.is_global_zero is distributed.is_global_zero, module.__name__
    # recipes.common re-exports nothing of recipes.outputs / recipes.trainers any more
    assert not {"JOB_MARKER", "claim_output_dir", "end_run", "fail_run", "make_trainer", "output_dir", "user_callbacks"} & set(vars(common))
