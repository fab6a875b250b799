"""The examples run as a user runs them (a fresh interpreter, from the repository root) and
print what their docstrings promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_quickstart_finds_flipped_labels() -> None:
    out = run_example("quickstart.py")
    assert "most harmful" in out and "most helpful" in out
    found = int(out.split("flipped labels are among")[0].split()[-4])
    assert found >= 15  # of 60 flipped; chance is 3


def test_query_target_gives_one_column_per_query() -> None:
    out = run_example("query_target.py")
    assert "score matrix: (1200, 4)" in out and out.count("most harmful:") == 4


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_has_a_usage_docstring(name: str) -> None:
    text = (ROOT / "examples" / name).read_text()
    assert text.startswith('"""') and "python examples/" in text.split('"""')[1]


def test_harmful_digits_draws_the_grids(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = run_example("harmful_digits.py", "--out", str(tmp_path / "grid.png"))
    assert (tmp_path / "grid_harmful.png").stat().st_size > 10_000 and (tmp_path / "grid_helpful.png").exists()
    harmful = int(out.split("of the 15 most harmful")[0].split()[-1])
    helpful = int(out.split("of the 15 most helpful")[0].split()[-1])
    assert harmful >= 8 and helpful <= 2  # 5% of the labels are flipped


@pytest.mark.slow
def test_ddp_example_scores_every_sample_on_rank_zero(tmp_path: Path) -> None:
    out = run_example("ddp.py", "--out", str(tmp_path / "scores.pt"))
    assert "world size 2: scored 1200 samples" in out and out.count("world size") == 1  # rank zero prints
    found = int(out.split("of the 60 flipped labels")[0].split()[-1])
    assert found >= 20  # chance: 3
    assert (tmp_path / "scores.pt").exists()
