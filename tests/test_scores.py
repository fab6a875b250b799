"""The score store: ordering helpers, safe and atomic files, clear errors for damaged files."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import warnings
import zipfile

import numpy as np
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
    with pytest.raises(ValueError, match=r"metadata keys must be strings.*metadata has the non-string key\(s\) 1 \(int\)"):
        InfluenceScores(torch.tensor([0, 1]), torch.zeros(2), {1: "a", "b": 2})
    empty = InfluenceScores(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3))
    assert empty.to_csv(tmp_path / "empty.csv").read_text().splitlines() == ["sample_id,query_0,query_1,query_2"]


def test_nan_scores_rank_last_both_ways():
    s = InfluenceScores(torch.tensor([0, 1, 2, 3]), torch.tensor([float("nan"), -1.0, 1.0, 1.0]))
    assert s.most_helpful(3)[0].tolist() == [2, 3, 1]  # ties keep id order
    assert s.most_harmful(3)[0].tolist() == [1, 2, 3]


def test_metadata_keys_must_be_strings_at_every_level_in_the_constructor_and_in_save(tmp_path):
    """One check for both: what the constructor accepts, save() writes and load() gives back unchanged
    (JSON keys are strings: an int key would come back as a string, mixed keys could not be written)."""
    nested = "metadata keys must be strings, at every level .*JSON.*"
    with pytest.raises(ValueError, match=nested + r"metadata\['per_class'\] has the non-string key\(s\) 0 \(int\)"):
        InfluenceScores([0, 1], [0.1, -0.2], {"per_class": {0: 1.5, "all": 2.0}})
    with pytest.raises(ValueError, match=nested + r"metadata\['runs'\]\[1\] has the non-string key\(s\) \(1, 2\) \(tuple\)"):
        InfluenceScores([0], [0.0], {"runs": [{"a": 1}, {(1, 2): 3}]})
    with pytest.raises(ValueError, match=r"metadata keys must be strings.* has the non-string key\(s\) 1 \(int\)"):
        InfluenceScores([0], [0.0], {1: "a", "b": 2})
    scores = InfluenceScores([0, 1], [0.1, -0.2], {"per_class": {"0": 1.5, "all": 2.0}, "runs": [{"a": 1}]})
    assert InfluenceScores.load(scores.save(tmp_path / "ok.pt")).metadata == scores.metadata  # string keys round-trip
    scores.metadata["per_class"][0] = 1.0  # changed after construction: save() refuses it with the same message
    with pytest.raises(ValueError, match=r"cannot save these scores: metadata keys must be strings, at every level .*\['per_class'\] has the non-string key\(s\) 0 \(int\)"):
        scores.save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_integer_like_numpy_and_tensor_scalars_are_accepted_wherever_an_int_is():
    s = _scores(q=2)
    for query in (1, np.int64(1), np.int32(1), torch.tensor(1), np.array(1)):
        assert s.most_harmful(np.int64(1), query=query)[0].tolist() == [11]
        assert s.to_dict(query=query)[11] == s.to_dict(query=1)[11]
        assert s.summary(query=query) == s.summary(query=1)
    with pytest.raises(IndexError, match="query=2 is out of range"):
        s.most_helpful(1, query=np.int64(2))
    for bad in (True, np.True_, torch.tensor(True), 1.0, np.float64(1.0), torch.tensor([1])):
        with pytest.raises(TypeError, match="query is one column index"):
            s.summary(query=bad)
        with pytest.raises(ValueError, match="k must be a non-negative number of samples"):
            s.most_harmful(bad, query=0)
    single = _scores()
    assert single[np.int64(11)].item() == single[11].item() == 1.5
    with pytest.raises(TypeError, match="sample ids are integers, got True"):
        single[True]  # type: ignore[index]


def test_query_matrix_needs_a_column():
    s = _scores(q=2)
    assert s.num_queries == 2
    assert s.most_harmful(1, query=1)[0].tolist() == [11]
    with pytest.raises(ValueError, match="query="):
        s.most_harmful(1)
    assert s.most_harmful(1, query=torch.tensor(1))[0].tolist() == [11]
    for bad in (2, -1):
        with pytest.raises(IndexError, match=r"out of range: these scores have 2 query columns, 0\.\.1"):
            s.to_dict(query=bad)
    for bad in (True, 1.0, [0, 1]):
        with pytest.raises(TypeError, match="query is one column index"):
            s.summary(query=bad)


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
    # A flip in zip padding leaves the content intact; any other change must have been refused.
    original = _scores()
    assert torch.equal(loaded.ids, original.ids) and torch.equal(loaded.values, original.values)
    assert loaded.metadata == original.metadata


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
    import importlib.util

    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pip install pandas"):
            scores.to_pandas()
        return
    frame = scores.to_pandas()
    assert list(frame.columns) == ["query_0", "query_1"] and frame.loc[0, "query_1"] == 4.0


# ---------------------------------------------------------------------- corruption and strictness
def _member_data_offset(blob: bytes, member: str) -> tuple[int, int]:
    """(offset, size) of a stored zip member's bytes inside the file ``blob``."""
    info = zipfile.ZipFile(io.BytesIO(blob)).getinfo(member)
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _values_member(blob: bytes, values: torch.Tensor) -> str:
    archive = zipfile.ZipFile(io.BytesIO(blob))
    raw = values.numpy().astype("<f8").tobytes()
    (name,) = [n for n in archive.namelist() if archive.read(n) == raw]
    return name


def _legacy_payload(scores: InfluenceScores) -> dict:
    """What ``save`` wrote before files carried a checksum."""
    return {
        "format": "lightning-influence/scores",
        "version": 1,
        "ids": scores.ids.clone(),
        "values": scores.values.clone(),
        "metadata": json.dumps(scores.metadata, sort_keys=True),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["checksummed", "legacy"])
def test_a_flipped_byte_inside_the_stored_values_is_refused(tmp_path, legacy):
    s = InfluenceScores(torch.arange(4), torch.tensor([1e-3, -2e-3, 3e-3, 4e-4], dtype=torch.float64), {"estimator": "test"})
    path = tmp_path / "scores.pt"
    if legacy:
        torch.save(_legacy_payload(s), path)
    else:
        s.save(path)
    blob = path.read_bytes()
    start, size = _member_data_offset(blob, _values_member(blob, s.values))
    assert size == 32
    damaged = bytearray(blob)
    damaged[start + 7] ^= 0x40  # the exponent of values[0]: 0.001 would read as ~1.8e305
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.raises(ScoreFileError, match=r"damaged\.pt is corrupted: zip member .*data/\d+.* is damaged \(Bad CRC-32"):
        InfluenceScores.load(tmp_path / "damaged.pt")
    assert torch.equal(InfluenceScores.load(path).values, s.values)  # the intact file still loads


def test_every_single_bit_flip_of_a_saved_file_is_refused_or_harmless(tmp_path):
    s = _scores(q=2)
    blob = s.save(tmp_path / "scores.pt").read_bytes()
    members = [_member_data_offset(blob, name) for name in zipfile.ZipFile(io.BytesIO(blob)).namelist()]
    inside_members = {o for start, size in members for o in range(start, start + size)}
    path = tmp_path / "flip.pt"
    loaded = set()
    for offset in range(len(blob)):
        damaged = bytearray(blob)
        damaged[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(damaged))
        try:
            again = InfluenceScores.load(path)
        except ScoreFileError:
            continue
        loaded.add(offset)  # a flip in the alignment padding of torch's zip headers changes nothing
        assert torch.equal(again.ids, s.ids) and torch.equal(again.values, s.values) and again.metadata == s.metadata
    assert not loaded & inside_members  # every flip in the pickle, the ids or the values is refused


def test_a_file_whose_content_does_not_match_its_checksum_is_refused(tmp_path):
    s = _scores()
    path = s.save(tmp_path / "scores.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["checksum"].startswith("sha256:")
    edits = {
        "values": {**payload, "values": payload["values"] * 2},
        "ids": {**payload, "ids": payload["ids"] + 100},
        "metadata": {**payload, "metadata": payload["metadata"].replace('"steps_seen": 4', '"steps_seen": 5')},
        "checksum": {**payload, "checksum": "sha256:" + "0" * 64},
        "checksum type": {**payload, "checksum": 7},
    }
    for what, edited in edits.items():
        torch.save(edited, tmp_path / "edited.pt")  # a well-formed zip: its CRCs match the edited content
        with pytest.raises(ScoreFileError, match=r"edited\.pt is corrupted: its ids, values or metadata do not match the checksum"):
            InfluenceScores.load(tmp_path / "edited.pt")
        assert what


def test_files_written_before_checksums_still_load(tmp_path):
    s = _scores(q=2)
    torch.save(_legacy_payload(s), tmp_path / "old.pt")
    loaded = InfluenceScores.load(tmp_path / "old.pt")
    assert torch.equal(loaded.ids, s.ids) and torch.equal(loaded.values, s.values) and loaded.metadata == s.metadata
    loaded.save(tmp_path / "new.pt")  # saving again adds the checksum
    assert "checksum" in torch.load(tmp_path / "new.pt", weights_only=True)


def test_sparse_tensors_are_refused_with_a_clear_error(tmp_path):
    base = _legacy_payload(_scores())
    for key in ("values", "ids"):
        torch.save({**base, key: base[key].to_sparse()}, tmp_path / f"sparse_{key}.pt")
        with pytest.raises(ScoreFileError, match=rf"sparse_{key}\.pt has ids of layout .* score files hold dense"):
            InfluenceScores.load(tmp_path / f"sparse_{key}.pt")
    with pytest.raises(ValueError, match="values must be a dense tensor, got layout torch.sparse_coo: pass values.to_dense()"):
        InfluenceScores(torch.arange(3), torch.zeros(3, dtype=torch.float64).to_sparse())
    with pytest.raises(ValueError, match="ids must be a dense tensor"):
        InfluenceScores(torch.arange(3).to_sparse(), torch.zeros(3))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"version": True}, r"has score-file version True; this library reads versions 1\.\.1"),
        ({"version": 1.0}, r"has score-file version 1\.0"),
        ({"metadata": '{"x": NaN}'}, "has unreadable metadata: the metadata holds NaN, which JSON does not allow"),
        ({"metadata": '{"x": [1, -Infinity]}'}, "the metadata holds -Infinity"),
        ({"metadata": '{"x": 1e999}'}, "the metadata holds the out-of-range number 1e999"),
        ({"ids": torch.tensor([-5, 0, 1, 2])}, r"is inconsistent: sample ids must be >= 0 .* got -5"),
        ({"ids": torch.arange(4).reshape(4, 1)}, r"has ids of shape \(4, 1\); expected a vector \[N\]"),
    ],
    ids=["version-bool", "version-float", "meta-nan", "meta-inf", "meta-overflow", "negative-ids", "ids-2d"],
)
def test_wrong_but_well_formed_files_are_refused(tmp_path, edit, message):
    torch.save({**_legacy_payload(_scores()), **edit}, tmp_path / "wrong.pt")
    with pytest.raises(ScoreFileError, match=message):
        InfluenceScores.load(tmp_path / "wrong.pt")


def test_nan_scores_still_save_and_load(tmp_path):
    s = InfluenceScores(torch.tensor([0, 1]), torch.tensor([float("nan"), 1.0], dtype=torch.float64))
    loaded = InfluenceScores.load(s.save(tmp_path / "nan.pt"))
    assert loaded.values[0].isnan() and loaded.values[1] == 1.0


def test_metadata_is_held_as_load_gives_it_back(tmp_path):
    """Tuples came back from load() as lists (so loaded.metadata != scores.metadata) and NumPy
    scalars were refused with Python's bare "Object of type int64 is not JSON serializable": the
    constructor now holds what JSON (and so load()) gives back, checked against json itself."""
    given = {
        "shape": (2, 3),
        "nested": {"pair": (1, (np.int64(2), torch.tensor(3)))},
        "count": np.int64(7),
        "rate": np.float32(0.5),
        "flag": np.bool_(True),
        "name": np.str_("cg"),
        "mean": np.array(1.25),
        "loss": torch.tensor(0.125, dtype=torch.float64),
        "done": torch.tensor(False),
    }
    scores = InfluenceScores([0, 1], [0.1, -0.2], given)
    as_json = json.loads(json.dumps(given, default=lambda v: v.item()))  # an independent round trip through JSON
    assert {k: v for k, v in scores.metadata.items() if k in given} == as_json
    assert [type(scores.metadata[k]) for k in ("count", "rate", "flag", "name", "mean", "loss", "done")] == [int, float, bool, str, float, float, bool]
    loaded = InfluenceScores.load(scores.save(tmp_path / "meta.pt"))
    assert loaded.metadata == scores.metadata
    scores.metadata["late"] = (np.int64(1), 2)  # changed after construction: save() writes it as load() will give it
    assert InfluenceScores.load(scores.save(tmp_path / "late.pt")).metadata["late"] == [1, 2]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.arange(3), r"metadata\['stats'\]\['v'\] is a torch Tensor of shape \[3\], which a score file \(JSON\) cannot hold: store value.tolist\(\)"),
        (np.zeros((2, 2)), r"metadata\['stats'\]\['v'\] is a numpy ndarray of shape \[2, 2\].*value.tolist\(\)"),
        (torch.tensor(1 + 2j), r"metadata\['stats'\]\['v'\] is a Tensor holding \(1\+2j\), which JSON cannot hold: store a real number"),
        ({1, 2}, r"metadata\['stats'\]\['v'\] is a set \('\{1, 2\}'\), which a score file \(JSON\) cannot hold.*str\(value\)"),
    ],
)
def test_metadata_json_cannot_hold_is_refused_naming_its_key(value, message, tmp_path):
    with pytest.raises(ValueError, match=r"metadata must be JSON-serialisable: " + message):
        InfluenceScores([0], [0.0], {"stats": {"v": value}})
    scores = InfluenceScores([0], [0.0], {"stats": {"v": 1}})
    scores.metadata["stats"]["v"] = value  # changed after construction: save() refuses it with the same message
    with pytest.raises(ValueError, match=r"cannot save these scores: metadata must be JSON-serialisable: " + message):
        scores.save(tmp_path / "bad.pt")


def test_circular_metadata_is_refused_not_a_recursion_error():
    looped: dict = {"x": 1}
    looped["self"] = looped
    with pytest.raises(ValueError, match=r"metadata\['d'\]\['self'\] refers back to a container that holds it \(a circular reference\)"):
        InfluenceScores([0], [0.0], {"d": looped})
    shared = [1, 2]
    assert InfluenceScores([0], [0.0], {"a": shared, "b": shared}).metadata["b"] == [1, 2]  # shared, not circular: fine


def test_non_finite_metadata_is_kept_as_text_so_the_file_is_strict_json(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"metadata \['residual', 'growth\[1\]'\] are NaN or infinite"):
        s = InfluenceScores(torch.arange(2), torch.zeros(2), {"residual": float("nan"), "growth": [1.0, float("inf")]})
    assert s.metadata["residual"] == "nan" and s.metadata["growth"] == [1.0, "inf"]
    assert float(s.metadata["growth"][1]) == float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = InfluenceScores.load(s.save(tmp_path / "meta.pt"))
        assert loaded.metadata == s.metadata
        InfluenceScores(torch.arange(2), torch.zeros(2), {"kinks": (1, 2), "lr": 0.1})  # finite metadata: no warning
    s.metadata["late"] = float("nan")  # changed after construction: refused, not written as non-JSON
    with pytest.raises(ValueError, match="without NaN or infinite numbers"):
        s.save(tmp_path / "late.pt")
    assert not (tmp_path / "late.pt").exists()


def test_negative_ids_are_refused_in_memory_too():
    with pytest.raises(ValueError, match=r"sample ids must be >= 0 \(positions in the training dataset\), got -1"):
        InfluenceScores(torch.tensor([-1, 0]), torch.zeros(2))


# ---------------------------------------------------------------- fields replaced after construction
def test_save_normalises_values_replaced_after_construction_so_the_file_loads(tmp_path):
    s = _scores()
    s.values = s.values.float()  # a plain attribute assignment: the constructor does not see it
    path = s.save(tmp_path / "f32.pt")
    loaded = InfluenceScores.load(path)
    assert loaded.values.dtype == torch.float64
    torch.testing.assert_close(loaded.values, _scores().values.float().double(), rtol=0, atol=0)
    s.ids = s.ids.int()
    assert InfluenceScores.load(s.save(tmp_path / "i32.pt")).ids.dtype == torch.long
    # the CSV export goes through the same normalisation
    s.values = s.values.tolist()
    assert s.to_csv(tmp_path / "list.csv").read_text().splitlines()[0] == "sample_id,score"


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ("ids", torch.tensor([0, 0, 1, 2]), "unique, but 1 id"),
        ("ids", torch.tensor([0.0, 1.0, 2.0, 3.0]), "must be integers"),
        ("ids", torch.tensor([-1, 1, 2, 3]), ">= 0"),
        ("values", torch.zeros(5, dtype=torch.float64), "N = len\\(ids\\) = 4"),
        ("values", torch.zeros(4, dtype=torch.complex128), "complex"),
        ("metadata", ["not", "a", "mapping"], "metadata must be a dict"),
        ("metadata", {1: "int key"}, "keys must be strings"),
    ],
)
def test_save_refuses_what_load_would_refuse_and_writes_nothing(tmp_path, field, bad, match):
    s = _scores()
    setattr(s, field, bad)
    with pytest.raises(ValueError, match=match):
        s.save(tmp_path / "bad.pt")
    assert os.listdir(tmp_path) == []  # no file, no temporary left behind
    if field != "metadata":
        with pytest.raises(ValueError, match=match):
            s.to_csv(tmp_path / "bad.csv")
        assert os.listdir(tmp_path) == []


def test_complex_and_boolean_values_are_refused_not_cast():
    with pytest.raises(ValueError, match=r"complex.*values\.real"):
        InfluenceScores(torch.arange(2), torch.tensor([1 + 2j, 3 + 0j]))
    with pytest.raises(ValueError, match="booleans"):
        InfluenceScores(torch.arange(2), torch.tensor([True, False]))


# ---------------------------------------------------------------- NaN in summaries
def test_summary_leaves_nan_scores_out_and_counts_them():
    values = torch.tensor([1.0, float("nan"), 3.0, -1.0], dtype=torch.float64)
    s = InfluenceScores(torch.arange(4), values).summary()
    finite = values[~values.isnan()]
    assert s["count"] == 3 and s["nan_count"] == 1
    assert s["mean"] == pytest.approx(finite.mean().item()) and s["std"] == pytest.approx(finite.std().item())
    assert (s["min"], s["median"], s["max"]) == (-1.0, 1.0, 3.0)
    assert s["harmful_fraction"] == pytest.approx(1 / 3)
    # no NaN result next to finite ones: with no score left every statistic is NaN, count 0
    alone = InfluenceScores(torch.arange(1), torch.tensor([float("nan")])).summary()
    assert alone["count"] == 0 and alone["nan_count"] == 1
    stats = [v for k, v in alone.items() if k not in ("count", "nan_count")]
    assert len(stats) == 8 and all(v != v for v in stats)
    clean = InfluenceScores(torch.arange(3), torch.tensor([1.0, 2.0, -3.0])).summary()
    assert clean["nan_count"] == 0 and clean["count"] == 3 and set(s) == set(clean) == set(alone)


def test_per_class_leaves_nan_scores_out_per_class():
    values = torch.tensor([1.0, float("nan"), 3.0, -1.0, float("nan")], dtype=torch.float64)
    per = InfluenceScores(torch.arange(5), values).per_class({0: "a", 1: "a", 2: "b", 3: "b", 4: "c"})
    assert (per["a"]["count"], per["a"]["nan_count"], per["a"]["mean"], per["a"]["std"]) == (1, 1, 1.0, 0.0)
    assert (per["b"]["count"], per["b"]["nan_count"], per["b"]["mean"]) == (2, 0, 1.0)
    assert per["c"]["count"] == 0 and per["c"]["nan_count"] == 1 and per["c"]["mean"] != per["c"]["mean"]
    assert per["c"]["std"] != per["c"]["std"]  # NaN like every statistic of the class, not 0.0


# ---------------------------------------------------------------- ties
def test_equal_scores_rank_by_sample_id_whatever_the_storage_order():
    s = InfluenceScores(torch.tensor([3, 1, 2, 0, 4]), torch.tensor([0.0, 0.0, float("nan"), 0.0, -1.0]))
    assert s.most_harmful(5)[0].tolist() == [4, 0, 1, 3, 2]  # lowest first, ties by id, NaN last
    assert s.most_helpful(5)[0].tolist() == [0, 1, 3, 4, 2]  # highest first, ties by id, NaN last
    assert [row[0] for row in s.join(list(range(5)))] == [4, 0, 1, 3, 2]
    q = InfluenceScores(torch.tensor([9, 5, 7]), torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 2.0]]))
    assert q.most_helpful(3, query=0)[0].tolist() == [5, 9, 7] and q.most_harmful(3, query=1)[0].tolist() == [5, 7, 9]


# ---------------------------------------------------------------- quantiles with infinite scores
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 1.0, float("inf")], (0.5, 1.0, float("inf"))),
        ([0.0, 1.0, 2.0, float("inf")], (0.75, 1.5, float("inf"))),
        ([float("-inf"), 1.0, 2.0], (float("-inf"), 1.0, 1.5)),
        ([float("-inf"), float("-inf"), 0.0, float("inf"), float("inf")], (float("-inf"), 0.0, float("inf"))),
        ([1.0, float("inf"), float("inf")], (float("inf"), float("inf"), float("inf"))),
    ],
)
def test_quartiles_next_to_infinite_scores_are_that_infinity_not_nan(values, expected):
    """torch.quantile interpolates inf - inf into NaN ([0, 1, inf]: q75 NaN, while [0, 1, 2, inf]
    gave inf): a quartile between a finite and an infinite score is that infinity."""
    s = InfluenceScores(torch.arange(len(values)), torch.tensor(values, dtype=torch.float64)).summary()
    assert (s["q25"], s["median"], s["q75"]) == expected


def test_quartiles_of_finite_scores_are_torch_quantile_exactly():
    values = torch.randn(101, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = InfluenceScores(torch.arange(101), values).summary()
    assert [s["q25"], s["median"], s["q75"]] == torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    both = InfluenceScores(torch.arange(2), torch.tensor([float("-inf"), float("inf")])).summary()
    assert both["median"] != both["median"] and both["min"] == float("-inf")  # strictly between -inf and +inf: undefined


# ---------------------------------------------------------------- pickled objects, unwritable paths
def test_a_pickled_scores_object_is_named_and_the_fix_given_without_ansi_codes(tmp_path):
    torch.save(_scores(), tmp_path / "obj.pt")
    with pytest.raises(ScoreFileError) as info:
        InfluenceScores.load(tmp_path / "obj.pt")
    message = str(info.value)
    assert "holds a pickled Python object (of lightning_influence.scores.InfluenceScores), not a score file" in message
    assert "torch.save(scores, path)" in message
    assert "without unpickling Python objects" in message and "scores.save(path)" in message
    assert "\x1b" not in message and "weights_only" not in message and "truncated or corrupted" not in message
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(_scores()))
    with pytest.raises(ScoreFileError, match=r"holds a pickled Python object, not a score file .*looks like a pickle"):
        InfluenceScores.load(tmp_path / "plain.pkl")


@pytest.mark.parametrize("where", ["folder", "cwd"])
def test_saving_onto_a_folder_names_the_path_not_a_temporary_file(tmp_path, monkeypatch, where):
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    path = "adir" if where == "folder" else "."
    for write, owner in ((_scores().save, "InfluenceScores.save"), (_scores().to_csv, "InfluenceScores.to_csv")):
        with pytest.raises(ValueError, match=rf"{owner}: path '{path}' is a folder, not a file; pass a file path"):
            write(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"] and not any((tmp_path / "adir").iterdir())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"path 'afile/scores.pt' lies under 'afile', which is a file"):
        _scores().save("afile/scores.pt")


def test_atomic_writes_onto_a_folder_name_the_path(tmp_path):
    from lightning_influence.scores import atomic_write_bytes

    with pytest.raises(IsADirectoryError, match=rf"cannot write the file '{tmp_path}': it is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"lies under '.*/f', which is a file, not a folder"):
        atomic_write_bytes(tmp_path / "f" / "g" / "h.json", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_values_for_lines_scores_up_with_ids_and_metrics_refuse_unaligned_scores():
    """A metric pairs its arguments by position; an InfluenceScores passed to it used to fail with
    an unrelated KeyError or shape error. values_for gives the scores in a given id order."""
    from lightning_influence.evaluation import spearman

    scores = InfluenceScores(torch.tensor([7, 3, 9, 1]), torch.tensor([0.7, 0.3, 0.9, 0.1], dtype=torch.float64))
    torch.testing.assert_close(scores.values_for([1, 9, 3]), torch.tensor([0.1, 0.9, 0.3], dtype=torch.float64))
    with pytest.raises(KeyError, match="no score for sample id 4"):
        scores.values_for(torch.tensor([1, 4]))
    for wrong in (torch.tensor([0.9, 5.7]), torch.tensor([True, False, True, False]), [[1, 3]]):
        with pytest.raises(TypeError, match="1-D sequence of integer sample ids"):
            scores.values_for(wrong)  # used to truncate floats and read a mask as ids 1 and 0
    assert scores.values_for([]).shape == (0,)
    matrix = InfluenceScores(torch.tensor([5, 2]), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(matrix.values_for([2, 5], query=1), torch.tensor([4.0, 2.0], dtype=torch.float64))
    with pytest.raises(TypeError, match=r"scores.values_for\(ids\)"):
        spearman(scores, [1.0, 2.0, 3.0, 4.0])
    assert spearman(scores.values_for([1, 3, 7, 9]), [1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.0)


def test_a_string_enum_in_the_metadata_is_held_as_its_value(tmp_path):
    """json writes a (str, Enum) member as its value; str() gives 'Kind.VAL': held as load() returns it."""
    import enum

    class Kind(str, enum.Enum):
        VAL = "val"

    scores = InfluenceScores(torch.arange(2), torch.zeros(2), {"target": Kind.VAL})
    assert scores.metadata["target"] == "val" and type(scores.metadata["target"]) is str
    scores.save(tmp_path / "s.pt")
    assert InfluenceScores.load(tmp_path / "s.pt").metadata == scores.metadata
