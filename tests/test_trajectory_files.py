"""The files of ``storage="disk"``: a write that fails is told apart from a folder removed during fit."""

from __future__ import annotations

import pytest
import torch

from lightning_influence.trajectory import SpilledTrajectoryError, StepRecord, Trajectory


def _record(step: int) -> StepRecord:
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    return StepRecord(
        step=step,
        batches=((x, torch.zeros(4, dtype=torch.long), torch.arange(4)),),
        ids=(torch.arange(4),),
        normalizer=1,
        hyper=torch.ones(1, 2, dtype=torch.float64),
        theta=torch.zeros(5, dtype=torch.float64),
        grad=torch.ones(5, dtype=torch.float64),
    )


def test_a_full_disk_is_reported_as_a_failed_write_not_as_a_removed_folder(tmp_path, monkeypatch):
    """torch.save reports a full disk as ``RuntimeError: ... unexpected pos`` (not ``OSError``): the
    message used to blame a folder "removed or changed during fit" and named a full disk last."""
    trajectory = Trajectory(storage="disk", spill_dir=tmp_path / "spill")
    trajectory.append(_record(0))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the file is begun, then the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2944 vs 2848")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SpilledTrajectoryError) as raised:
        trajectory.append(_record(1))
    message = str(raised.value)
    assert message.startswith(f"writing step 1 to {trajectory._dir} (inside spill_dir=") and "failed (disk full?" in message
    assert "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 2944 vs 2848" in message
    assert "1 step(s) are there now" in message and "free space on that disk" in message and "storage='memory'" in message
    assert "removed or changed" not in message
    monkeypatch.setattr(torch, "save", real_save)
    assert len(trajectory) == 1 and trajectory.export()[0]["step"] == 0  # what was written still reads back
    trajectory.close()


def test_a_removed_folder_or_file_keeps_the_removed_during_fit_wording(tmp_path):
    import shutil

    trajectory = Trajectory(storage="disk", spill_dir=tmp_path / "spill")
    trajectory.append(_record(0))
    next(trajectory._dir.glob("step-*.pt")).write_bytes(b"not a record")  # changed under its feet
    with pytest.raises(SpilledTrajectoryError, match=r"was removed or changed during fit \(reading step 0 back from step-000000000\.pt failed: "):
        trajectory.export()
    shutil.rmtree(trajectory._dir)
    with pytest.raises(SpilledTrajectoryError, match=r"was removed or changed during fit \(writing step 1 to step-000000001\.pt failed: its folder no longer exists\)"):
        trajectory.append(_record(1))
    trajectory.close()


# ------------------------------------------------------------------ the benchmarks that read these files
def _benchmark(name: str, monkeypatch):
    """The script ``benchmarks/<name>.py`` as a module (registered for the test's duration only)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts add their folders to it
    sys.path.insert(0, str(path.parent))  # as when run as a script (benchmarks/revision.py)
    spec.loader.exec_module(module)
    return module


def test_the_memory_benchmark_counts_the_spilled_trajectory_in_its_own_subfolder(tmp_path, capsys, monkeypatch):
    """``benchmarks/memory.py``'s "trajectory on disk (peak)" column was always "-": it counted the
    files directly in spill_dir, and the trajectory writes into spill_dir/diffin-trajectory-XXXX."""
    memory = _benchmark("memory", monkeypatch)
    trajectory = Trajectory(storage="disk", spill_dir=tmp_path / "spill")
    for step in range(3):
        trajectory.append(_record(step))
    files = [p for p in (tmp_path / "spill").rglob("*") if p.is_file()]  # an independent count
    assert trajectory._dir.parent == tmp_path / "spill" and len(files) == 3
    assert memory.dir_bytes(str(tmp_path / "spill")) == (sum(p.stat().st_size for p in files), 3)
    trajectory.close()
    assert memory.dir_bytes(str(tmp_path / "spill")) == (0, 0)
    # --spill-root: a missing folder is created; a file is an argparse error, not a traceback
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as raised:
        memory.main(["--configs", "nothing", "--spill-root", str(tmp_path / "new" / "root")])
    assert raised.value.code == 2 and (tmp_path / "new" / "root").is_dir()  # refused later, for the unknown config
    with pytest.raises(SystemExit) as raised:
        memory.main(["--spill-root", str(tmp_path / "a-file")])
    assert raised.value.code == 2 and f"--spill-root {tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err


def test_the_fidelity_benchmark_refuses_fewer_than_three_subsets_before_any_training(monkeypatch, capsys):
    """``--subsets 2`` died in random_removals, after the leave-one-out retrainings, with a traceback."""
    fidelity = _benchmark("fidelity", monkeypatch)
    monkeypatch.setattr("sys.argv", ["fidelity.py", "--subsets", "2"])
    monkeypatch.setattr(fidelity, "measure", lambda *args: pytest.fail("trained before checking its arguments"))
    with pytest.raises(SystemExit) as raised:
        fidelity.main()
    assert raised.value.code == 2
    assert "--subsets must be at least 3: an LDS correlates" in capsys.readouterr().err
