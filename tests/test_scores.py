"""The score store: ordering helpers, safe and atomic files, clear errors for damaged files."""

from __future__ import annotations

import csv
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_influence import InfluenceScores, ScoreFileError
from lightning_influence.scores import SIGN_CONVENTION


def _scores(q=None):
    ids = torch.tensor([7, 3, 11, 0])
    values = torch.tensor([0.5, -2.0, 1.5, -0.1], dtype=torch.float64)
    if q:
        values = torch.stack([values * (k + 1) * (-1) ** k for k in range(q)], dim=1)
    return InfluenceScores(ids, values, {"estimator": "test", "steps_seen": 4})


def test_most_harmful_and_most_helpful_follow_the_sign_convention():
    s = _scores()
    ids, vals = s.most_harmful(2)
    assert ids.tolist() == [3, 0] and vals.tolist() == [-2.0, -0.1]
    ids, vals = s.most_helpful(2)
    assert ids.tolist() == [11, 7] and vals.tolist() == [1.5, 0.5]
    assert s[11].item() == 1.5 and s.to_dict()[3] == -2.0
    assert s.metadata["sign_convention"] == SIGN_CONVENTION
    with pytest.raises(KeyError, match="no score for sample id 5"):
        s[5]
    assert s[torch.tensor(11)].item() == 1.5
    with pytest.raises(TypeError, match="sample ids are integers, got 2.7"):
        s[2.7]  # type: ignore[index]
    assert len(s.most_helpful(10)[0]) == 4 and len(s.most_harmful(0)[0]) == 0
    with pytest.raises(ValueError, match="k must be a non-negative number of samples, got -1"):
        s.most_harmful(-1)
    assert s.most_harmful(torch.tensor(1))[0].tolist() == [3]  # integer-like counts are fine
    with pytest.raises(ValueError, match="got 1.5"):
        s.most_helpful(1.5)  # type: ignore[arg-type]


def test_ids_and_metadata_that_would_not_round_trip_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sample ids must be integers, got a torch.float32"):
        InfluenceScores(torch.tensor([0.5, 1.7]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"metadata keys must be strings .* got \[1\]"):
        InfluenceScores(torch.tensor([0, 1]), torch.zeros(2), {1: "a", "b": 2})
    empty = InfluenceScores(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3))
    assert empty.to_csv(tmp_path / "empty.csv").read_text().splitlines() == ["sample_id,query_0,query_1,query_2"]


def test_nan_scores_rank_last_both_ways():
    s = InfluenceScores(torch.tensor([0, 1, 2, 3]), torch.tensor([float("nan"), -1.0, 1.0, 1.0]))
    assert s.most_helpful(3)[0].tolist() == [2, 3, 1]  # ties keep id order
    assert s.most_harmful(3)[0].tolist() == [1, 2, 3]


def test_query_matrix_needs_a_column():
    s = _scores(q=2)
    assert s.num_queries == 2
    assert s.most_harmful(1, query=1)[0].tolist() == [11]
    with pytest.raises(ValueError, match="query="):
        s.most_harmful(1)


@pytest.mark.parametrize("q", [None, 3])
def test_save_load_round_trip_and_csv(tmp_path, q):
    s = _scores(q)
    path = s.save(tmp_path / "sub" / "scores.pt")
    loaded = InfluenceScores.load(path)
    assert torch.equal(loaded.ids, s.ids) and torch.equal(loaded.values, s.values)
    assert loaded.metadata == s.metadata
    assert [p.name for p in path.parent.iterdir()] == ["scores.pt"]  # no temporary file left behind
    rows = list(csv.reader(io.StringIO(s.to_csv(tmp_path / "s.csv").read_text())))
    assert rows[0][0] == "sample_id" and len(rows) == 5
    assert [float(v) for v in rows[1][1:]] == s.values[0].reshape(-1).tolist()


def test_invalid_scores_are_refused():
    with pytest.raises(ValueError, match="unique"):
        InfluenceScores(torch.tensor([1, 1]), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        InfluenceScores(torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(ValueError, match="JSON"):
        InfluenceScores(torch.tensor([1]), torch.zeros(1), {"bad": object()})


def test_damaged_and_foreign_files_give_a_clear_error(tmp_path):
    good = _scores().save(tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ScoreFileError, match="truncated or corrupted"):
        InfluenceScores.load(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ScoreFileError, match="not a lightning-influence score file"):
        InfluenceScores.load(tmp_path / "foreign.pt")
    torch.save({"format": "lightning-influence/scores", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ScoreFileError, match="version 99"):
        InfluenceScores.load(tmp_path / "future.pt")
    with pytest.raises(ScoreFileError, match="no score file"):
        InfluenceScores.load(tmp_path / "missing.pt")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lightning-influence-pwned",))


def test_loading_never_executes_pickled_code(tmp_path):
    torch.save({"format": "lightning-influence/scores", "version": 1, "payload": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(ScoreFileError):
        InfluenceScores.load(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/lightning-influence-pwned")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_truncated_bytes_only_raise_the_documented_error(tmp_path, data):
    good = _scores().save(tmp_path / "good.pt").read_bytes()
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2048))
    elif kind == "truncated":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        pos = data.draw(st.integers(0, len(good) - 1))
        blob = good[:pos] + bytes([good[pos] ^ 0xFF]) + good[pos + 1 :]
    path = tmp_path / "fuzz.pt"
    path.write_bytes(blob)
    try:
        loaded = InfluenceScores.load(path)
    except ScoreFileError:
        return
    # A flip in padding or metadata text can leave a valid file: it must then still be consistent.
    assert loaded.ids.numel() == loaded.values.shape[0]


def test_summary_per_class_and_join_agree_with_direct_computation():
    ids = torch.tensor([4, 0, 2, 1, 3])
    values = torch.tensor([0.5, -1.0, 2.0, -0.25, 0.0], dtype=torch.float64)
    scores = InfluenceScores(ids, values)
    s = scores.summary()
    assert s["count"] == 5 and s["min"] == -1.0 and s["max"] == 2.0 and s["median"] == 0.0
    assert s["mean"] == pytest.approx(values.mean().item()) and s["harmful_fraction"] == pytest.approx(0.4)
    labels = torch.tensor([7, 7, 9, 9, 7])  # indexed by sample id
    per = scores.per_class(labels)
    assert set(per) == {7, 9}
    assert per[7]["count"] == 3 and per[7]["min"] == -1.0 and per[9]["max"] == 2.0
    assert scores.per_class({0: "a", 1: "b", 2: "b", 3: "a", 4: "a"})["a"]["count"] == 3
    with pytest.raises(KeyError, match="no label"):
        scores.per_class({0: "a"})
    with pytest.raises(ValueError, match="sample ids go up to"):
        scores.per_class(torch.tensor([1, 2]))
    dataset = [f"item{i}" for i in range(5)]
    joined = scores.join(dataset)
    assert [r[0] for r in joined] == [0, 1, 3, 4, 2]  # most harmful first
    assert joined[0] == (0, -1.0, "item0")
    assert scores.join(dataset, ids=torch.tensor([2])) == [(2, 2.0, "item2")]


def test_to_pandas_or_a_clear_message():
    scores = InfluenceScores(torch.tensor([1, 0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            scores.to_pandas()
        return
    frame = scores.to_pandas()
    assert list(frame.columns) == ["query_0", "query_1"] and frame.loc[0, "query_1"] == 4.0
