"""Batch containers: dataclasses, named tuples, mappings and per-sample string lists are sliced,
moved and stored alike, and a real fit scores them exactly like tuple batches."""

from __future__ import annotations

import io
from collections import OrderedDict, UserDict, defaultdict, namedtuple
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from conftest import quiet_trainer
from lightning_influence import DiffIn
from lightning_influence.batches import batch_chunks, batch_size, map_tensors, pack, select_samples, tensors, unpack
from lightning_influence.data import FixedBatches
from lightning_influence.models import Classifier

Pair = namedtuple("Pair", ["x", "y", "index"])


@dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    names: list[str] = field(default_factory=list)


@dataclass
class Derived:
    x: torch.Tensor
    index: torch.Tensor
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.count = int(self.x.shape[0])


def _frozen(n: int = 5) -> Frozen:
    return Frozen(torch.arange(2.0 * n).reshape(n, 2), torch.arange(n), torch.arange(10, 10 + n), [f"s{i}" for i in range(n)])


def test_containers_keep_their_type_and_frozen_dataclasses_are_rebuilt():
    batch = {"a": _frozen(), "b": Pair(torch.ones(5), torch.zeros(5), torch.arange(5)), "c": OrderedDict(t=torch.ones(5, 3))}
    doubled = map_tensors(lambda t: t * 2, batch)
    assert isinstance(doubled["a"], Frozen) and isinstance(doubled["b"], Pair) and isinstance(doubled["c"], OrderedDict)
    assert torch.equal(doubled["a"].x, batch["a"].x * 2) and doubled["a"].names == batch["a"].names
    assert batch_size(doubled) == 5
    derived = map_tensors(lambda t: t[:3], Derived(torch.ones(5, 2), torch.arange(5)))
    assert derived.count == 3  # init=False fields are recomputed by the class
    counts = map_tensors(lambda t: t[:2], defaultdict(int, x=torch.ones(4)))
    assert isinstance(counts, defaultdict) and counts["missing"] == 0


class _Encoding(UserDict):
    """Like a tokenizer's batch encoding: a mapping built from a dict."""


class _Strict(Mapping):
    def __init__(self, x, y):  # type: ignore[no-untyped-def]
        self._items = {"x": x, "y": y}

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        return self._items[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)

    def __len__(self) -> int:
        return 2


def test_mapping_classes_are_rebuilt_from_a_dict_or_refused_clearly():
    encoding = select_samples(_Encoding(ids=torch.arange(4), mask=torch.ones(4, 2)), torch.tensor([1, 3]))
    assert isinstance(encoding, _Encoding) and encoding["ids"].tolist() == [1, 3]
    with pytest.raises(TypeError, match="cannot rebuild a batch of type _Strict from a dict of its items"):
        map_tensors(lambda t: t, _Strict(torch.ones(2), torch.zeros(2)))


def test_sizing_a_batch_does_not_rebuild_it():
    """batch_size runs on every pass of a sweep: it must not run a dataclass's __init__ (user code)."""
    built = []

    @dataclass
    class Counted:
        x: torch.Tensor

        def __post_init__(self) -> None:
            built.append(1)

    batch = Counted(torch.ones(3, 2))
    assert batch_size({"b": batch}) == 3 and list(tensors(batch)) == [batch.x] and len(built) == 1


def test_per_sample_string_lists_are_sliced_with_the_tensors():
    batch = _frozen(5)
    picked = select_samples(batch, torch.tensor([4, 1]))
    assert picked.names == ["s4", "s1"] and picked.index.tolist() == [14, 11]
    chunks = batch_chunks(batch, 2)
    assert [c for _, c in chunks] == [2, 2, 1]
    assert [chunk.names for chunk, _ in chunks] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    shared = {"x": torch.ones(5, 1), "classes": ["a", "b"]}  # not one per sample: kept whole
    assert select_samples(shared, torch.tensor([0]))["classes"] == ["a", "b"]


def test_a_batch_without_tensors_names_its_type():
    with pytest.raises(ValueError, match="size of a batch of type list"):
        batch_size(["a", "b"])


def test_packed_batches_load_without_unpickling_and_rebuild_their_classes():
    batch = {"d": _frozen(), "p": Pair(torch.ones(3), torch.zeros(3), torch.arange(3)), "o": OrderedDict(k=[1, 2.5, None])}
    layout, tensors = pack(batch)
    buffer = io.BytesIO()
    torch.save({"layout": layout, "tensors": tensors}, buffer)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)
    rebuilt = unpack(stored["layout"], stored["tensors"])
    assert isinstance(rebuilt["d"], Frozen) and isinstance(rebuilt["p"], Pair) and isinstance(rebuilt["o"], OrderedDict)
    assert torch.equal(rebuilt["d"].x, batch["d"].x) and rebuilt["d"].names == batch["d"].names
    assert rebuilt["o"]["k"] == [1, 2.5, None]


def test_stored_batches_never_import_code_and_refuse_unknown_leaves():
    layout, tensors = pack(_frozen())
    layout["dataclass"] = "some_module_not_imported:Frozen"
    with pytest.raises(ValueError, match="module is not imported"):
        unpack(layout, tensors)
    layout["dataclass"] = "os:system"
    with pytest.raises(ValueError, match="no such container class"):
        unpack(layout, tensors)
    with pytest.raises(TypeError, match="cannot be stored safely"):
        pack({"x": torch.ones(2), "when": object()})


# ------------------------------------------------------------------ a real fit with dataclass batches
@dataclass
class Sample:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    names: list[str]


class _DataclassClassifier(Classifier):
    def per_sample_loss(self, batch):
        if isinstance(batch, Sample):
            assert len(batch.names) == batch.x.shape[0]  # per-sample strings travel with their rows
            return F.cross_entropy(self(batch.x), batch.y, reduction="none")
        return super().per_sample_loss(batch)

    def sample_ids(self, batch):
        return batch.index if isinstance(batch, Sample) else super().sample_ids(batch)

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()


def _as_dataclasses(batches):
    return [Sample(x, y, i, [f"n{int(k)}" for k in i]) for x, y, i in batches]


@pytest.mark.parametrize(
    "options", [{}, {"storage": "disk"}, {"checkpoint_every": 4}, {"mode": "online", "window": 8}, {"chunk_size": 5}], ids=str
)
def test_dataclass_batches_are_scored_like_tuple_batches(small_digits, tmp_path, options):
    train, val = list(small_digits.train), list(small_digits.val)
    scores = []
    for loader, target in ((train, val), (_as_dataclasses(train), _as_dataclasses(val))):
        loader, target = FixedBatches(loader), FixedBatches(target)
        torch.manual_seed(0)
        model = _DataclassClassifier(hidden=(16,), lr=0.1).double()
        cb = DiffIn(target="val", target_loader=target, spill_dir=tmp_path, **options)
        quiet_trainer(callbacks=[cb]).fit(model, train_dataloaders=loader)
        scores.append(cb.scores)
    assert torch.equal(scores[0].ids, scores[1].ids)
    torch.testing.assert_close(scores[1].values, scores[0].values, rtol=1e-12, atol=1e-15)


def test_the_default_sample_ids_say_what_they_read_when_it_is_not_integer_ids():
    """A list of two training loaders gives a list batch whose last element is a whole batch, and
    string ids (file names) are not positions: the default ``sample_ids`` says which element it read
    and the fix (it raised torch's "only one element tensors can be converted to Python scalars" /
    "too many dimensions 'str'")."""
    module = Classifier(hidden=(4,))
    x, y, i = torch.randn(3, 64), torch.tensor([0, 1, 2]), torch.arange(3)
    with pytest.raises(TypeError, match=r"reads the batch's last element as the sample ids, but it is a list .*A list of training loaders"):
        module.sample_ids([[x, y, i], [x, y, i]])
    with pytest.raises(TypeError, match=r"reads the batch's last element .* a tuple .*strings \(file names\) are not positions"):
        module.sample_ids([x, y, ("a.png", "b.png", "c.png")])
    with pytest.raises(TypeError, match=r"reads batch\['index'\] as the sample ids"):
        module.sample_ids({"x": x, "index": ["a", "b", "c"]})
    assert torch.equal(module.sample_ids([x, y, i]), i)
