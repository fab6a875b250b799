"""Score files on unusual paths and crafted files, and the constructor's input checks: special files
are left alone, links are written through, long names work, every failed load is a ScoreFileError."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from lightning_influence import InfluenceScores
from lightning_influence.scores import FORMAT_NAME, ScoreFileError, _checksum, atomic_write_bytes, check_writable


def _scores() -> InfluenceScores:
    return InfluenceScores(torch.tensor([4, 2, 9]), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))


def test_a_fifo_is_refused_and_left_as_it_is_by_every_writer(tmp_path):
    """save and to_csv used to replace a FIFO (as root: /dev/null too) with a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for write, owner in ((_scores().save, "InfluenceScores.save"), (_scores().to_csv, "InfluenceScores.to_csv")):
        with pytest.raises(ValueError, match=rf"{owner}: path '{fifo}' exists and is a FIFO \(named pipe\), not a regular file: "
                           r"writing would replace it .*; pass the path of a regular file"):
            write(fifo)
    with pytest.raises(ValueError, match=r"DiffIn: save_path '.*pipe' exists and is a FIFO"):
        check_writable(fifo, "DiffIn")
    with pytest.raises(FileExistsError, match=rf"cannot write the file '{fifo}': it exists and is a FIFO"):
        atomic_write_bytes(fifo, b"x")
    link = tmp_path / "link"
    link.symlink_to(fifo)  # a link to a FIFO is refused as the FIFO, naming where it resolves to
    with pytest.raises(ValueError, match=rf"exists and is a FIFO \(named pipe\), not a regular file \(the symbolic link resolves to '{fifo}'\)"):
        _scores().save(link)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe"]  # no temporary file left
    with pytest.raises(ScoreFileError, match=r"pipe is a FIFO \(named pipe\), not a regular file"):
        InfluenceScores.load(fifo)  # reading it would block


def test_a_symbolic_link_is_written_through_to_its_target(tmp_path):
    """The link stays a link; its target (in another folder) gets the new content, atomically."""
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "real" / "scores.pt"
    InfluenceScores(torch.arange(2), torch.zeros(2)).save(target)
    link = tmp_path / "links" / "scores.pt"
    link.symlink_to(target)
    assert _scores().save(link) == link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert torch.equal(InfluenceScores.load(target).ids, _scores().ids)
    _scores().to_csv(tmp_path / "links" / "s.csv")
    (tmp_path / "links" / "c.csv").symlink_to(tmp_path / "real" / "new.csv")  # a dangling link: its target is made
    _scores().to_csv(tmp_path / "links" / "c.csv")
    assert (tmp_path / "real" / "new.csv").read_text().startswith("sample_id,score")
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.csv", "scores.pt"]


def test_a_long_file_name_that_the_file_system_accepts_is_written(tmp_path):
    """The temporary and probe files were named '.<name>.XXXXXXXX.probe': over 255 bytes for a 243-character name."""
    path = tmp_path / ("x" * 240 + ".pt")
    _scores().save(path)
    assert torch.equal(InfluenceScores.load(path).values, _scores().values)
    _scores().to_csv(tmp_path / ("é" * 125 + ".csv"))  # 254 bytes: multi-byte characters are cut whole
    assert sorted(len(p.name.encode()) for p in tmp_path.iterdir()) == [243, 254]


def test_a_failed_write_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "s.pt"
    InfluenceScores(torch.arange(2), torch.zeros(2)).save(path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=rf"writing the file '{path}' failed \(No space left on device; disk full, or over a file size limit\?\)") as raised:
        _scores().save(path)
    assert raised.value.errno == 28
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def _crafted(path, values, metadata="{}", checksum=True):
    ids = torch.tensor([4, 2, 9])
    payload = {"format": FORMAT_NAME, "version": 1, "ids": ids, "values": values, "metadata": metadata}
    if checksum:
        payload["checksum"] = _checksum(1, ids, values, metadata)
    torch.save(payload, path)
    return path


def test_every_failure_to_load_a_crafted_file_is_a_score_file_error_naming_it(tmp_path, monkeypatch):
    """Deeply nested metadata (with a valid checksum) raised RecursionError; a 'meta' tensor NotImplementedError."""
    values = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    deep = _crafted(tmp_path / "deep.pt", values, '{"a":' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ScoreFileError, match=rf"{deep} has unreadable metadata: its JSON is nested too deeply"):
        InfluenceScores.load(deep)
    meta = _crafted(tmp_path / "meta.pt", torch.empty(3, dtype=torch.float64, device="meta"), checksum=False)
    with pytest.raises(ScoreFileError, match=rf"{meta} has ids on the 'cpu' device and values on the 'meta' device"):
        InfluenceScores.load(meta)
    fine = _crafted(tmp_path / "fine.pt", values)
    assert len(InfluenceScores.load(fine)) == 3

    def broken(*args, **kwargs):
        raise KeyError("anything")

    monkeypatch.setattr(InfluenceScores, "__post_init__", broken)  # any other failure: a ScoreFileError naming the file
    with pytest.raises(ScoreFileError, match=rf"{fine} is not a readable score file \(crafted or corrupted\?\): KeyError"):
        InfluenceScores.load(fine)


def test_ids_beyond_int64_are_refused_as_an_overflow():
    for ids in (torch.tensor([3, 2**63], dtype=torch.uint64), np.array([2**63 + 5], dtype=np.uint64)):
        with pytest.raises(ValueError, match=r"sample ids overflow int64: a uint64 id is >= 2\*\*63"):
            InfluenceScores(ids, [1.0] * len(ids))  # used to say "must be >= 0 ... got -9223372036854775808"
    with pytest.raises(ValueError, match=r"ids hold an integer outside the int64 range .*below 2\*\*63"):
        InfluenceScores([2**64 - 1], [1.0])
    assert InfluenceScores(torch.tensor([2**63 - 1], dtype=torch.uint64), [1.0]).ids.tolist() == [2**63 - 1]
    scores = _scores()
    with pytest.raises(ValueError, match=r"ids hold an integer outside the int64 range .*no sample has such an id"):
        scores.values_for([2, 2**63])  # used to raise a raw "Overflow when unpacking long long"
    with pytest.raises(ValueError, match=r"ids overflow int64"):
        scores.values_for(torch.tensor([2**63], dtype=torch.uint64))
    with pytest.raises(TypeError, match=r"1-D sequence of integer sample ids, got list"):
        scores.values_for(["a"])


def test_ids_of_more_than_one_dimension_are_refused_not_flattened():
    with pytest.raises(ValueError, match=r"sample ids must be a vector \[N\] \(or a single id\), got a tensor of shape \(2, 2\): pass ids.reshape\(-1\)"):
        InfluenceScores(torch.tensor([[1, 2], [3, 4]]), torch.zeros(4))
    assert InfluenceScores(5, [1.0]).ids.tolist() == [5]  # a single id is still one sample


def test_the_reserved_version_key_is_refused_with_another_value():
    with pytest.raises(ValueError, match=r"metadata key 'version' is reserved .*reserved keys: 'version'\), got 'version': 7\. "
                       r"Store your value under another key, e.g. 'model_version'"):
        InfluenceScores([1], [1.0], {"version": 7})  # used to be overwritten silently
    for wrong in ("1", True, 1.0):
        with pytest.raises(ValueError, match="is reserved"):
            InfluenceScores([1], [1.0], {"version": wrong})
    scores = _scores()
    copied = InfluenceScores(scores.ids, scores.values, scores.metadata)  # metadata of other scores: the same version
    assert copied.metadata == scores.metadata


def test_the_constructor_copies_the_callers_tensors_and_keeps_values_float64():
    """A later in-place change of the caller's ids could create duplicate ids unnoticed."""
    ids, values = torch.arange(3), torch.zeros(3, dtype=torch.float64)
    array = np.arange(3, dtype=np.int64)
    scores, from_numpy = InfluenceScores(ids, values), InfluenceScores(array, [0.0, 0.0, 0.0])
    ids[2], values[0], array[2] = 0, 9.0, 0
    assert scores.ids.tolist() == [0, 1, 2] and scores.values[0].item() == 0.0 and from_numpy.ids.tolist() == [0, 1, 2]
    assert InfluenceScores([1], torch.tensor([0.1], dtype=torch.float32)).values.dtype == torch.float64
