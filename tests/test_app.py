"""The Hydra main job: config composition and instantiation of every group, an in-process run
of :func:`lightning_influence.app.run`, and one run of ``python -m lightning_influence``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_influence import DiffIn, InfluenceScores
from lightning_influence.app import run
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import Classifier

CONF = "lightning_influence.conf"
MODELS = sorted(p.name.removesuffix(".yaml") for p in (files(CONF) / "model").iterdir() if p.name.endswith(".yaml"))


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_configs_ship_in_the_package() -> None:
    assert {"mlp", "logreg"} <= set(MODELS)
    for group in ("data", "trainer", "influence"):
        assert any(p.name.endswith(".yaml") for p in (files(CONF) / group).iterdir()), group


@pytest.mark.parametrize("model", MODELS)
def test_every_group_instantiates(model: str, tmp_path: Path) -> None:
    cfg = compose_cfg(f"model={model}")
    assert cfg.data.label_noise == 0.1 and cfg.influence.target == "val" and cfg.influence.mode == "replay"
    net = instantiate(cfg.model)
    assert isinstance(net, Classifier)
    hidden = list(cfg.model.hidden)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == len(hidden) + 1
    data = instantiate(cfg.data)
    assert isinstance(data, DigitsDataModule) and data.seed == cfg.seed
    callback = instantiate(cfg.influence, save_path=str(tmp_path / "s.pt"))
    assert isinstance(callback, DiffIn) and callback.target == "val" and callback.mode == "replay"
    trainer = instantiate(cfg.trainer, callbacks=[callback], default_root_dir=str(tmp_path))
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs
    assert callback in trainer.callbacks


def test_overrides_reach_the_objects() -> None:
    cfg = compose_cfg("model=logreg", "influence.mode=online", "influence.window=16", "data.label_noise=0.2")
    assert isinstance(instantiate(cfg.model), Classifier) and list(cfg.model.hidden) == []
    callback = instantiate(cfg.influence)
    assert callback.mode == "online" and callback.window == 16
    assert instantiate(cfg.data).label_noise == 0.2


def test_run_outside_hydra_needs_an_output_dir() -> None:
    with pytest.raises(ValueError, match="output_dir"):
        run(compose_cfg("trainer.max_epochs=1"))


def test_main_job_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_cfg("trainer.max_epochs=2", f"output_dir={tmp_path}", "top_k=5")
    report = run(cfg)
    n_train = 1797 - cfg.data.val_size - cfg.data.test_size

    scores = InfluenceScores.load(tmp_path / "scores.pt")
    assert len(scores) == n_train and sorted(scores.ids.tolist()) == list(range(n_train))
    assert scores.values.shape == (n_train,) and torch.isfinite(scores.values).all()
    assert scores.metadata["estimator"] == "diffin" and scores.metadata["target"] == "val"

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    det = on_disk["mislabel_detection"]
    assert det["num_flipped"] == round(0.1 * n_train)
    assert 0.0 <= det["auroc"] <= 1.0
    assert det["auroc"] > 0.6, "the harmful ranking should find flipped labels better than chance"
    assert on_disk["num_scored"] == n_train and on_disk["steps"] == 2 * -(-n_train // cfg.data.batch_size)

    harmful, helpful = on_disk["most_harmful"], on_disk["most_helpful"]
    assert len(harmful) == len(helpful) == 5
    assert [r["score"] for r in harmful] == sorted(r["score"] for r in harmful)
    assert [r["score"] for r in helpful] == sorted((r["score"] for r in helpful), reverse=True)
    assert harmful[0]["score"] == pytest.approx(float(scores.values.min()))
    assert helpful[0]["score"] == pytest.approx(float(scores.values.max()))
    assert all(isinstance(r["label"], int) and isinstance(r["flipped"], bool) for r in harmful + helpful)

    with open(tmp_path / "scores.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sample_id", "score"] and len(rows) == n_train + 1

    out = capsys.readouterr().out
    assert "most harmful" in out and "most helpful" in out and "ROC-AUC" in out


def test_command_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_influence", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "10 most harmful training samples" in proc.stdout and "10 most helpful training samples" in proc.stdout
    for name in ("scores.pt", "scores.csv", "report.json", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert 0.0 <= json.loads((run_dir / "report.json").read_text())["mislabel_detection"]["auroc"] <= 1.0
