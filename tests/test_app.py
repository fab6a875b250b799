"""The Hydra main job: ``python -m lightning_influence`` runs ``recipe=cleaning`` by default;
an in-process run of :func:`lightning_influence.app.run` and runs of the command line: the run
folder's log holds the run's output, a misconfigured trainer or model is refused before any
training, and the model's classes follow the data's."""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from lightning_influence import InfluenceScores
from lightning_influence.app import run, run_log
from lightning_influence.config import ConfigError, check_top_level

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


def command_line(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_influence <overrides>`` run from ``tmp_path``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_influence", *overrides],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_line(tmp_path: Path) -> None:
    """The README main job (tiny settings): scores, report and plots in the Hydra run dir, and a log
    file there that holds the run (its summary, the recipe's tables, where the outputs went) instead
    of the empty file Hydra's job logging used to leave."""
    run_dir = tmp_path / "run"
    proc = command_line(tmp_path, "trainer.max_epochs=1", "recipe.seeds=[0]", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "most harmful" in proc.stdout and "ROC-AUC" in proc.stdout
    for name in ("scores.pt", "scores.csv", "report.json", ".hydra/config.yaml", "score_histogram.png", "detection_curve.png", "most_harmful.png"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"] == "cleaning" and 0.0 <= report["detection"]["estimator"]["auroc"] <= 1.0

    assert f"outputs in {run_dir}" in proc.stdout and "recipe=cleaning estimator=diffin" in proc.stdout
    log = (run_dir / "lightning-influence.log").read_text()
    for line in ("recipe=cleaning estimator=diffin", "overrides: trainer.max_epochs=1 recipe.seeds=[0]", "(most harmful)", "ROC-AUC",
                 "no_removal", "DiffIn (replay, target=val): scored 1200 samples", f"Outputs in {run_dir}: scores.pt, scores.csv"):
        assert line in log, line
    top = report["most_harmful"][0]
    assert f"{top['id']:>6}  {top['score']:>11.3e}" in log, "the table rows, as printed"
    assert log.count("(most harmful)") == proc.stdout.count("(most harmful)") == 1, "each line once"
    assert "[lightning_influence.run][INFO]" not in proc.stdout + proc.stderr, "the copies go to the log file only"


def test_command_line_refuses_a_bad_trainer_value_before_training(tmp_path: Path) -> None:
    """trainer.max_epochs=abc used to pass the trial fit and end in a bare AssertionError inside
    Lightning's fit loop; now it stops before any training with the key, the value, what is
    expected and the fix, on the console and in the run's log. The console shows the message
    alone (the traceback, which pointed at the library's checks, went to the log only), with
    status 1."""
    run_dir = tmp_path / "run"
    proc = command_line(tmp_path, "trainer.max_epochs=abc", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1
    message = ("trainer.max_epochs='abc' (a string) is not accepted by lightning.pytorch.Trainer: its argument max_epochs takes an "
               "integer or null. Set trainer.max_epochs to such a value (e.g. trainer.max_epochs=1)")
    assert proc.stderr.startswith("lightning-influence: the config is refused, nothing was run: " + message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "lightning-influence.log"], "nothing trained, nothing written"
    log = (run_dir / "lightning-influence.log").read_text()
    assert "the run failed: ConfigError: " + message in log and "Traceback" in log


def test_command_line_prints_what_the_trial_step_refused_in_one_line(tmp_path: Path) -> None:
    """A metric the model does not log is found by the one-step trial run before the scoring fit:
    one line on the console (it printed a Hydra traceback), the traceback in the run's log."""
    run_dir = tmp_path / "run"
    proc = command_line(tmp_path, "recipe.metric=nope", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "lightning-influence: the one-step trial run refused the model or data, nothing was scored: recipe.metric='nope' is not logged"
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "the run failed: SetupRefused: recipe.metric='nope'" in (run_dir / "lightning-influence.log").read_text()


def test_command_line_refuses_a_key_added_with_plus_before_training(tmp_path: Path) -> None:
    """Hydra refuses recipe.remove_fractoin=0.5 and suggests +recipe.remove_fractoin=0.5; that form used
    to run the whole recipe with the key ignored. Now it stops before any training, naming the key
    the user meant."""
    run_dir = tmp_path / "run"
    proc = command_line(tmp_path, "+recipe.remove_fractoin=0.5", f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    assert "recipe.remove_fractoin is not a key of recipe (CleaningConfig)" in proc.stderr, proc.stderr[-3000:]
    assert "did you mean recipe.remove_fraction" in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "lightning-influence.log"], "nothing trained, nothing written"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", r"trainer.max_epochs='abc' .*takes an integer or null"),
        ("+trainer.max_epoch=2", r"trainer.max_epoch is not an argument .*did you mean max_epochs"),
        ("model.num_classes=5", r"model.num_classes=5 contradicts the data: their num_classes is 10"),
        ("+recipe.remove_fractoin=0.5", r"recipe.remove_fractoin is not a key of recipe \(CleaningConfig\).*did you mean recipe.remove_fraction"),
        ("+estimator.mode=online", r"estimator.mode is not a key of estimator .*did you mean estimator.options.mode\?"),
        ("seed=-1", r"seed=-1 is out of range: a seed must be an integer in \[0, 4294967295\] .*e.g. seed=0"),
        ("seed=4294967296", r"seed=4294967296 is out of range"),
        ("+sed=3", r"unknown top-level key 'sed' \(no recipe reads it\): did you mean seed\?"),
        ("data.seed=-1", r"data.seed=-1 is out of range: a seed must be an integer in \[0, 4294967295\]"),
    ],
)
def test_run_checks_the_config_before_anything_is_set_up(override: str, message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        run(compose_cfg(override, f"output_dir={out}", "recipe.plots=false"))
    assert not out.exists(), "refused before the output folder, the data or any training"


def test_model_classes_follow_the_data_in_a_run(tmp_path: Path) -> None:
    """12 synthetic classes (and 16 features): the model's head follows data.num_classes. Before, the
    model kept its own 10 classes, and cross-entropy failed on labels 10 and 11 mid-fit."""
    overrides = ("data=synthetic", "data.num_classes=12", "data.num_features=16", "data.num_samples=800", "data.val_size=100",
                 "data.test_size=100", "data.batch_size=64", "model=logreg", "trainer.max_epochs=1", "recipe.seeds=[0]", "recipe.plots=false")
    report = run(compose_cfg(*overrides, f"output_dir={tmp_path}"))
    assert report["num_scored"] == 600
    written = (tmp_path / "config.yaml").read_text()
    assert "  in_features: 16\n  num_classes: 12\n" in written, written


def test_run_log_copies_output_and_warnings_to_the_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a file handler on the root logger (Hydra's job log), printed lines and warnings are
    copied to it once each; the console output is unchanged; without one nothing is copied."""
    path = tmp_path / "job.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with run_log() as log, warnings.catch_warnings():
            warnings.simplefilter("always")
            print("first line\n\nsecond line", flush=True)
            warnings.warn("mind the gap", UserWarning, stacklevel=1)
            log.info("for the file only")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    lines = path.read_text().splitlines()
    assert lines == [
        "[lightning_influence.run][INFO] - first line",
        "[lightning_influence.run][INFO] - second line",
        "[lightning_influence.run][WARNING] - UserWarning: mind the gap",
        "[lightning_influence.run][INFO] - for the file only",
    ]
    assert capsys.readouterr().out == "first line\n\nsecond line\n"
    with run_log():
        print("no log file")
    assert path.read_text().splitlines() == lines and capsys.readouterr().out == "no log file\n"


def test_an_unknown_top_level_key_far_from_any_known_one_is_warned_about_not_refused() -> None:
    """A user's own app may keep notes at the top level: warned (no recipe reads them), not refused;
    a key close to a known one (``+sed=3``) is refused (see the test above)."""
    with pytest.warns(UserWarning, match=r"top-level key 'notes' is not read by the recipes and has no effect"):
        check_top_level(compose_cfg("+notes=first try"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_top_level(compose_cfg())


def _uncreatable_folders(tmp_path: Path) -> list[Path]:
    """Output folders that cannot be created, also for root: below a regular file, and below /proc."""
    (tmp_path / "a_file").write_text("x")
    folders = [tmp_path / "a_file" / "out"]
    if Path("/proc/self").is_dir():
        folders.append(Path("/proc/lightning-influence-test/out"))
    return folders


def test_an_output_folder_that_cannot_be_created_is_refused_before_the_start_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """output_dir=/proc/x used to print the start line, then a bare FileNotFoundError from mkdir."""
    for folder in _uncreatable_folders(tmp_path):
        with pytest.raises(ValueError, match=rf"the output folder {folder} could not be created \((NotADirectoryError|FileNotFoundError|"
                           r"PermissionError|OSError): .+\): the recipe writes scores.pt, report.json, ... into it. Choose an output "
                           r"folder that can be created and written \(output_dir=... or hydra.run.dir=...\)"):
            run(compose_cfg("recipe=coreset", "estimator=random", "trainer.max_epochs=1", "recipe.seeds=[0]", f"output_dir={folder}"))
        assert "lightning-influence:" not in capsys.readouterr().out, "refused before the start line"


def test_command_line_refuses_an_output_folder_under_proc(tmp_path: Path) -> None:
    folder = _uncreatable_folders(tmp_path)[-1]
    proc = command_line(tmp_path, f"output_dir={folder}", "trainer.max_epochs=1")
    assert proc.returncode != 0 and "lightning-influence:" not in proc.stdout
    assert f"ValueError: the output folder {folder} could not be created (" in proc.stderr, proc.stderr[-3000:]
    assert "Choose an output folder that can be created and written" in proc.stderr


def test_a_failed_run_marks_its_folder_and_names_the_earlier_runs_outputs(tmp_path: Path) -> None:
    """A run into a folder that holds a finished run's outputs fails at runtime: its job marker says
    it failed (with the error), a warning names the earlier outputs as not this run's, and they
    are left as they were; a finished run's report carries the run id its marker records."""
    from lightning_influence.recipes.outputs import JOB_MARKER

    quick = ("recipe=coreset", "estimator=random", "trainer.max_epochs=1", "recipe.seeds=[0]", "recipe.plots=false", f"output_dir={tmp_path}")
    report = run(compose_cfg(*quick))
    marker = json.loads((tmp_path / JOB_MARKER).read_text())
    assert marker["status"] == "finished" and report["run"]["id"] == marker["run_id"]
    assert json.loads((tmp_path / "report.json").read_text())["run"]["id"] == marker["run_id"]
    earlier = (tmp_path / "report.json").read_bytes()
    with pytest.warns(UserWarning, match=rf"the run failed; {tmp_path} holds outputs of an earlier run, not of this one: config.yaml, "
                      r"report.json, scores.csv, scores.pt. They are left as they were and its job marker"):
        with pytest.raises(ValueError, match="recipe.metric='nope' is not logged"):
            run(compose_cfg(*quick, "recipe.metric=nope"))
    failed = json.loads((tmp_path / JOB_MARKER).read_text())
    assert failed["status"] == "failed" and failed["run_id"] != marker["run_id"] and "recipe.metric='nope'" in failed["error"]
    assert (tmp_path / "report.json").read_bytes() == earlier
    again = run(compose_cfg(*quick))
    assert again["run"]["id"] == json.loads((tmp_path / JOB_MARKER).read_text())["run_id"] != failed["run_id"]
