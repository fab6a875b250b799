"""The Hydra main job: ``python -m lightning_influence`` runs ``recipe=cleaning`` by default;
an in-process run of :func:`lightning_influence.app.run` and one run of the command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from lightning_influence import InfluenceScores
from lightning_influence.app import run

CONF = "lightning_influence.conf"


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_run_is_the_cleaning_recipe_with_diffin() -> None:
    cfg = compose_cfg()
    assert cfg.recipe.name == "cleaning" and cfg.estimator.name == "diffin"
    assert cfg.estimator.options.target.value == "val" and cfg.estimator.options.mode == "replay"
    assert cfg.data.label_noise == 0.1 and cfg.data.noise_kind == "uniform"


def test_run_outside_hydra_needs_an_output_dir() -> None:
    with pytest.raises(ValueError, match="output_dir"):
        run(compose_cfg("trainer.max_epochs=1", "recipe.plots=false"))


def test_main_job_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_cfg("trainer.max_epochs=2", f"output_dir={tmp_path}", "recipe.top_k=5", "recipe.seeds=[0]", "recipe.plots=false")
    report = run(cfg)
    n_train = 1797 - cfg.data.val_size - cfg.data.test_size

    scores = InfluenceScores.load(tmp_path / "scores.pt")
    assert len(scores) == n_train and sorted(scores.ids.tolist()) == list(range(n_train))
    assert scores.values.shape == (n_train,) and torch.isfinite(scores.values).all()
    assert scores.metadata["estimator"] == "diffin" and scores.metadata["target"] == "val"

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    det = on_disk["detection"]
    assert det["num_flipped"] == round(0.1 * n_train)
    assert det["estimator"]["auroc"] > 0.6, "the harmful ranking should find flipped labels better than chance"
    assert on_disk["num_scored"] == n_train

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
    assert "most harmful" in out and "ROC-AUC" in out and "no_removal" in out


def test_command_line(tmp_path: Path) -> None:
    """The README main job (tiny settings): scores, report and plots in the Hydra run dir."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_influence", "trainer.max_epochs=1", "recipe.seeds=[0]", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "most harmful" in proc.stdout and "ROC-AUC" in proc.stdout
    for name in ("scores.pt", "scores.csv", "report.json", ".hydra/config.yaml", "score_histogram.png", "detection_curve.png", "most_harmful.png"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"] == "cleaning" and 0.0 <= report["detection"]["estimator"]["auroc"] <= 1.0
