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


def _swap(a, b):
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)


def test_spilled_files_swapped_or_replaced_during_fit_are_refused(tmp_path):
    """Two valid step files swapped used to be read back as each other's steps: scores 26% off, no error."""
    trajectory = Trajectory(storage="disk", spill_dir=tmp_path / "spill")
    for step in range(3):
        trajectory.append(_record(step))
    files = sorted(trajectory._dir.glob("step-*.pt"))
    _swap(files[1], files[2])
    with pytest.raises(SpilledTrajectoryError, match=r"in .*diffin-trajectory-.* \(inside spill_dir=.*\) was removed or changed during fit "
                       r"\(reading step 1 back from step-000000001\.pt failed: ValueError: the file holds step 2, not step 1: files swapped"):
        trajectory.export()
    _swap(files[1], files[2])
    assert [p["step"] for p in trajectory.export()] == [0, 1, 2]
    trajectory.close()

    grid = Trajectory(storage="disk", spill_dir=tmp_path / "spill", checkpoint_every=2)
    for step in range(2):
        grid.append(_record(step))  # step 1 is written without parameters
    files = sorted(grid._dir.glob("step-*.pt"))
    torch.save({**torch.load(files[0], weights_only=True), "step": 1}, files[1])  # step 1, now with parameters
    with pytest.raises(SpilledTrajectoryError, match=r"the file holds the parameters, but step 1 was written without them"):
        list(grid.newest_first(lambda record: (record.grad, record.theta + 1, {})))
    grid.close()


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_records_restored_under_another_checkpoint_grid_are_rebuilt_from_what_they_hold(tmp_path, storage):
    """Records exported from a checkpoint_every=4 trajectory and restored into a checkpoint_every=1 one:
    disk storage took step 3 for a checkpoint (from the new grid) and failed the sweep ("no stored
    parameters to recompute from: the window starts between checkpoints"); memory storage worked."""
    before = Trajectory(storage="memory", checkpoint_every=4)
    for step in range(4):
        before.append(_record(step))
    after = Trajectory(storage=storage, spill_dir=tmp_path / "spill", checkpoint_every=1)
    after.restore(before.export())
    after.append(_record(4))
    assert [after.keeps_theta(step) for step in range(5)] == [True, False, False, False, True]
    rebuilt = []

    def recompute(record):
        rebuilt.append(record.step)
        return record.grad, record.theta + 1, {}

    thetas = {record.step: record.theta.tolist() for record in after.newest_first(recompute)}
    assert rebuilt == [0, 1, 2, 3] and thetas  # step 3 too: its own gradient (dropped between checkpoints) == {step: [float(step if step < 4 else 0)] * 5 for step in range(5)}
    after.close()
    before.close()


def test_a_replay_resumed_with_another_checkpoint_every_on_disk_gives_the_uninterrupted_scores(tmp_path):
    """The resume of the QA report: checkpoint_every=8 -> 1 under storage='disk' (as it works in memory)."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import digits_problem, quiet_trainer
    from lightning_influence import DiffIn
    from lightning_influence.data import FixedBatches
    from lightning_influence.models import Classifier

    warnings.filterwarnings("ignore")
    problem = digits_problem(n=96, batch_size=16, epochs=1, val_size=60)

    def fit(root, every, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        model = Classifier(hidden=(8,), lr=3e-3, optimizer="adamw").double()
        callback = DiffIn(target="val", target_loader=problem.val, storage="disk", spill_dir=root / "spill", checkpoint_every=every)
        extra = [checkpoint] if checkpoint is not None else []
        trainer = quiet_trainer(callbacks=[callback, *extra], max_epochs=2, enable_checkpointing=checkpoint is not None, default_root_dir=root)
        trainer.fit(model, train_dataloaders=FixedBatches(problem.train.batches), ckpt_path=ckpt_path)
        return callback.scores

    straight = fit(tmp_path / "a", 8)
    fit(tmp_path / "b", 8, checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=5))
    first = sorted((tmp_path / "ckpt").glob("*.ckpt"))[0]
    assert "step=5" in first.name
    resumed = fit(tmp_path / "c", 1, ckpt_path=first)
    torch.testing.assert_close(resumed.ids, straight.ids)
    # not bit-equal: the steps between the old grid's checkpoints are rebuilt, where the uninterrupted run stored them
    torch.testing.assert_close(resumed.values, straight.values, rtol=0, atol=1e-7 * float(straight.values.abs().max()))
