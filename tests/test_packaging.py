"""The configs ship with the package: after a regular (non-editable) install, with no clone on
the import path, Hydra composes every recipe from ``lightning_influence.conf`` and the entry
point prints its config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMPOSE = """
import lightning_influence, pathlib, sys
from hydra import compose, initialize_config_module
site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(lightning_influence.__file__).resolve().is_relative_to(site), lightning_influence.__file__
with initialize_config_module(config_module="lightning_influence.conf", version_base=None):
    for recipe in ("cleaning", "deletion", "coreset"):
        cfg = compose(config_name="config", overrides=[f"recipe={recipe}", "estimator=tracin"])
        assert cfg.recipe.name == recipe and cfg.estimator.name == "tracin", cfg
print("composed from", pathlib.Path(lightning_influence.__file__).parent)
"""


def test_configs_work_from_a_regular_install(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    shipped = sorted(p.relative_to(site / "lightning_influence" / "conf").as_posix() for p in (site / "lightning_influence" / "conf").rglob("*.yaml"))
    in_repo = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert shipped == in_repo and "recipe/cleaning.yaml" in shipped
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    composed = subprocess.run([sys.executable, "-c", COMPOSE, str(site)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert composed.returncode == 0, composed.stderr[-3000:]
    printed = subprocess.run(
        [sys.executable, "-m", "lightning_influence", "recipe=deletion", "--cfg", "job"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "name: deletion" in printed.stdout
