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
