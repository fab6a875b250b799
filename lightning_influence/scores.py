"""The score store: influence values per training sample, with metadata, safe files and CSV export.

Sign and units (every estimator in the library): a score is the predicted change of the
target loss when the sample is removed from training. Positive: the sample helps (removing
it raises the loss). Negative: the sample hurts (a cleaning candidate).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import operator
import os
import pickle
import re
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_influence.distributed import Collective

FORMAT_NAME = "lightning-influence/scores"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "sha256"
SIGN_CONVENTION = "target-loss change when the sample is removed; positive helps, negative hurts"

MetadataValue = str | int | float | bool | None

RESERVED_METADATA: dict[str, Any] = {"version": FORMAT_VERSION}
"""Metadata keys that :class:`InfluenceScores` sets itself, with their values: metadata that gives
one of them another value is refused (the same value, as copied from other scores, is accepted)."""


class ScoreFileError(ValueError):
    """A score file is missing, truncated, corrupted or of an unknown format."""


def _finite_metadata(value: Any, key: str, replaced: list[str]) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by its string form (``"nan"``,
    ``"inf"``, ``"-inf"``: strict JSON has no such numbers); ``key`` paths are noted in ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        replaced.append(key)
        return str(value)
    if isinstance(value, Mapping):
        return {k: _finite_metadata(v, f"{key}.{k}", replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_metadata(v, f"{key}[{i}]", replaced) for i, v in enumerate(value)]
    return value


def _refuse_json_constant(name: str) -> Any:
    raise ValueError(f"the metadata holds {name}, which JSON does not allow and score files never contain")


def _finite_json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the metadata holds the out-of-range number {text}")
    return value


def _normalised_tensors(ids: Any, values: Any) -> tuple[Tensor, Tensor]:
    """``(ids, values)`` as an :class:`InfluenceScores` holds them (CPU, dense, int64 ``[N]`` and
    float64 ``[N]`` or ``[N, Q]``), or ``ValueError`` saying what is wrong. The constructor and
    :meth:`InfluenceScores.save` both go through here, so a file is never written that
    :meth:`InfluenceScores.load` would refuse."""
    tensors = []
    for name, given in (("ids", ids), ("values", values)):
        try:
            tensor = torch.as_tensor(given)
        except (TypeError, ValueError, RuntimeError) as err:
            if "Overflow" in str(err):
                raise ValueError(
                    f"{name} hold an integer outside the int64 range ({err}): "
                    + (
                        "sample ids are positions in the training dataset, stored as int64 (below 2**63)"
                        if name == "ids"
                        else "pass the values as floats (influence scores are float64)"
                    )
                ) from None
            raise ValueError(f"{name} must be a tensor (or a sequence of numbers), got {type(given).__name__}: {err}") from None
        if tensor.layout != torch.strided:
            raise ValueError(f"{name} must be a dense tensor, got layout {tensor.layout}: pass {name}.to_dense()")
        tensors.append(tensor)
    ids, values = tensors
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"sample ids must be integers, got a {ids.dtype} tensor")
    if values.is_complex():
        raise ValueError(
            f"values are complex ({values.dtype}); influence scores are real numbers: pass values.real if the imaginary "
            "part is meant to be dropped"
        )
    if values.dtype == torch.bool:
        raise ValueError("values are booleans; influence scores are real numbers (float64)")
    if ids.dim() > 1:
        raise ValueError(
            f"sample ids must be a vector [N] (or a single id), got a tensor of shape {tuple(ids.shape)}: pass "
            "ids.reshape(-1) (with values reshaped to match) if the ids are meant to be flattened"
        )
    if ids.device.type == "meta" or values.device.type == "meta":
        raise ValueError("ids and values must hold data: got a tensor on the 'meta' device, which has none")
    if ids.dtype == torch.uint64 and ids.numel() and bool((ids.view(torch.int64) < 0).any()):
        raise ValueError(
            "sample ids overflow int64: a uint64 id is >= 2**63, which InfluenceScores (int64 ids, as torch indexes "
            "datasets) cannot hold; sample ids are positions in the training dataset"
        )
    # Copies (copy=True): later in-place changes of the caller's tensors (or NumPy arrays) do not reach the scores.
    ids = ids.detach().to("cpu", torch.long, copy=True).reshape(-1)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"sample ids must be >= 0 (positions in the training dataset), got {int(ids.min())}")
    values = values.detach().to("cpu", torch.float64, copy=True)
    if values.dim() not in (1, 2) or values.shape[0] != ids.shape[0]:
        raise ValueError(f"values must have shape [N] or [N, Q] with N = len(ids) = {ids.shape[0]}, got {tuple(values.shape)}")
    unique, counts = ids.unique(return_counts=True)
    if unique.numel() != ids.numel():
        repeated = unique[counts > 1].tolist()
        shown = ", ".join(map(str, repeated[:5])) + (", ..." if len(repeated) > 5 else "")
        raise ValueError(
            f"sample ids in InfluenceScores must be unique, but {len(repeated)} id(s) occur more than once ({shown}): "
            "keep one score per sample"
        )
    return ids, values


def _check_metadata_mapping(metadata: Any) -> None:
    """The metadata check of the constructor and :meth:`InfluenceScores.save` (one check, so that
    what the constructor accepts is what a file can hold): a mapping whose keys are strings at
    every level, nested mappings (also inside lists) included. JSON, and so the score file, has
    string keys only; other keys would come back from :meth:`InfluenceScores.load` as strings (an
    ``int`` key ``0`` as ``"0"``), or, mixed with string keys, could not be written at all."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict with string keys, got {type(metadata).__name__}")
    _check_metadata_keys(metadata, "metadata")
    for key, value in RESERVED_METADATA.items():
        given = metadata.get(key, value)
        if isinstance(given, bool) or not isinstance(given, type(value)) or given != value:
            raise ValueError(
                f"metadata key {key!r} is reserved (InfluenceScores sets it: the score-file format version, "
                f"{value}; reserved keys: {', '.join(map(repr, RESERVED_METADATA))}), got {key!r}: {metadata[key]!r}. "
                f"Store your value under another key, e.g. 'model_{key}'"
            )


def _json_metadata(value: Any, path: str, open_containers: tuple[int, ...] = ()) -> Any:
    """``value`` as :meth:`InfluenceScores.load` will give it back from the file's JSON, or
    ``ValueError`` naming the ``path`` of what JSON cannot hold: mappings become dicts, tuples
    lists, NumPy scalars and 0-d arrays or tensors Python numbers (``.item()``); strings, numbers,
    booleans and ``None`` stay. Keys are checked first (:func:`_check_metadata_keys`)."""
    if value is None:
        return None
    for plain in (bool, str, int, float):  # subclasses too (np.float64, np.str_, IntEnum): as JSON gives them back
        if isinstance(value, plain):  # str.__str__: a (str, Enum) member's value, as json writes it (str() gives 'K.A')
            return str.__str__(value) if plain is str else plain(value)
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in open_containers:
            raise ValueError(f"metadata must be JSON-serialisable: {path} refers back to a container that holds it (a circular reference)")
        inner = (*open_containers, id(value))
        if isinstance(value, Mapping):
            return {k: _json_metadata(v, f"{path}[{k!r}]", inner) for k, v in value.items()}
        return [_json_metadata(v, f"{path}[{i}]", inner) for i, v in enumerate(value)]
    kind = type(value).__name__
    if isinstance(value, Tensor) or type(value).__module__ == "numpy":
        shape = tuple(getattr(value, "shape", ()))
        if shape != ():
            raise ValueError(
                f"metadata must be JSON-serialisable: {path} is a {type(value).__module__.split('.')[0]} {kind} of shape "
                f"{list(shape)}, which a score file (JSON) cannot hold: store value.tolist() there instead (or a summary number)"
            )
        item = value.item() if hasattr(value, "item") else value
        if isinstance(item, complex) or not isinstance(item, (str, bool, int, float)):
            raise ValueError(
                f"metadata must be JSON-serialisable: {path} is a {kind} holding {item!r}, which JSON cannot hold: store a "
                "real number, a string, a bool or None (e.g. str(value))"
            )
        return item  # a NumPy scalar (np.int64, np.float32, np.bool_, np.str_) or a 0-d array or tensor
    raise ValueError(
        f"metadata must be JSON-serialisable: {path} is a {kind} ({str(value)[:60]!r}), which a score file (JSON) cannot "
        "hold: store a number, a string, a bool, None, or lists and dicts of them (e.g. str(value))"
    )


def _check_metadata_keys(value: Any, path: str, open_containers: tuple[int, ...] = ()) -> None:
    if isinstance(value, (Mapping, list, tuple)) and id(value) in open_containers:
        raise ValueError(f"metadata must be JSON-serialisable: {path} refers back to a container that holds it (a circular reference)")
    open_containers = (*open_containers, id(value))
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            shown = ", ".join(f"{k!r} ({type(k).__name__})" for k in bad[:4]) + (", ..." if len(bad) > 4 else "")
            raise ValueError(
                f"metadata keys must be strings, at every level (score files store the metadata as JSON, whose keys "
                f"are strings): {path} has the non-string key(s) {shown}. Convert them, e.g. "
                "{str(key): value for key, value in ...items()}"
            )
        for key, item in value.items():
            _check_metadata_keys(item, f"{path}[{key!r}]", open_containers)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_metadata_keys(item, f"{path}[{index}]", open_containers)


def _integer_index(value: Any) -> int | None:
    """``value`` as an ``int`` if it is integer-like (a Python or NumPy integer, a 0-d integer tensor or
    array: anything with ``__index__``), else ``None``; booleans (Python, NumPy or tensor) are not counts
    or column indices."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if isinstance(value, Tensor) and (value.dim() != 0 or value.is_floating_point() or value.is_complex()):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _ranking(ids: Tensor, col: Tensor, descending: bool) -> Tensor:
    """Positions of ``col`` in rank order: ascending (or descending) score, NaN last, ties in
    ascending sample-id order (whatever order the samples are stored in)."""
    by_id = torch.argsort(ids, stable=True)
    keyed = col[by_id]
    # ascending order puts NaN last; -NaN is NaN, so negating keeps NaN last for the descending order
    return by_id[torch.argsort(-keyed if descending else keyed, stable=True)]


def _quantiles(values: Tensor, qs: list[float]) -> list[float]:
    """Linear-interpolation quantiles of the NaN-free 1-D ``values`` (as ``torch.quantile``), with
    infinite values interpolated without ``inf - inf``: a quantile between a finite value and an
    infinite one is that infinity (the interpolation runs towards it), one between two equal
    infinities is that infinity; only one strictly between ``-inf`` and ``+inf`` is NaN (undefined)."""
    result = torch.quantile(values, torch.tensor(qs, dtype=torch.float64)).tolist()
    if bool(torch.isfinite(values).all()):
        return result
    ordered = values.sort().values
    last = ordered.numel() - 1
    for k, q in enumerate(qs):
        position = q * last
        lo, hi = math.floor(position), math.ceil(position)
        a, b = float(ordered[lo]), float(ordered[hi])
        if lo == hi or a == b:
            result[k] = a
        elif math.isinf(a) and math.isinf(b):
            result[k] = math.nan  # between -inf and +inf
        elif math.isinf(a) or math.isinf(b):
            result[k] = a if math.isinf(a) else b
    return result


def _spread(col: Tensor) -> dict[str, float | int]:
    """:meth:`InfluenceScores.summary` of one column, NaN scores left out and counted."""
    nan = torch.isnan(col)
    kept = col[~nan]
    out: dict[str, float | int] = {"count": int(kept.numel()), "nan_count": int(nan.sum())}
    if kept.numel() == 0:
        keys = ("mean", "std", "min", "q25", "median", "q75", "max", "harmful_fraction")
        return {**out, **dict.fromkeys(keys, math.nan)}
    q = _quantiles(kept, [0.25, 0.5, 0.75])
    return {
        **out,
        "mean": float(kept.mean()),
        "std": float(kept.std()) if kept.numel() > 1 else 0.0,
        "min": float(kept.min()),
        "q25": q[0],
        "median": q[1],
        "q75": q[2],
        "max": float(kept.max()),
        "harmful_fraction": float((kept < 0).double().mean()),
    }


@dataclass
class InfluenceScores:
    """Influence scores of training samples.

    ``ids``: ``LongTensor[N]`` sample ids, unique. ``values``: float64 ``Tensor[N]`` (one target)
    or ``Tensor[N, Q]`` (one column per query). ``metadata``: JSON-serialisable facts (estimator,
    mode, target, steps seen, ...), with string keys at every level (nested dicts included: JSON's
    keys are strings, so other keys are refused rather than turned into strings by a save and load),
    held as :meth:`load` gives them back: tuples become lists, NumPy scalars and 0-d arrays or
    tensors Python numbers, and anything else JSON cannot hold is refused, naming its key; ``version`` is always added
    (a reserved key: metadata that gives it another value is refused), and ``sign_convention`` (the
    library's, :data:`SIGN_CONVENTION`) unless the metadata states another: the rankings that
    are not removal effects (coreset and cleaning baselines) say what a high value means.

    The constructor copies ``ids`` and ``values`` (a later in-place change of the caller's tensors
    does not reach the scores); ``ids`` must be a vector (or one id), of values below ``2**63``.
    """

    ids: Tensor
    values: Tensor
    metadata: dict[str, MetadataValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids, self.values = _normalised_tensors(self.ids, self.values)
        _check_metadata_mapping(self.metadata)
        # Rankings that are not removal effects (coreset and cleaning baselines) state their own convention.
        metadata = {"sign_convention": SIGN_CONVENTION, **_json_metadata(self.metadata, "metadata"), "version": FORMAT_VERSION}
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:  # a last guard: _json_metadata leaves only JSON's types
            raise ValueError(f"metadata must be JSON-serialisable: {err}") from err
        try:
            json.dumps(metadata, allow_nan=False)
        except ValueError:
            replaced: list[str] = []
            metadata = {k: _finite_metadata(v, k, replaced) for k, v in metadata.items()}
            warnings.warn(
                f"InfluenceScores metadata {replaced[:4]} {'is' if len(replaced) == 1 else 'are'} NaN or infinite: kept "
                "as the string 'nan', 'inf' or '-inf' (JSON, and so the score file, has no such numbers)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.metadata = metadata

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def num_queries(self) -> int | None:
        """Number of query columns, or ``None`` for a single target."""
        return int(self.values.shape[1]) if self.values.dim() == 2 else None

    def _column(self, query: int | None) -> Tensor:
        if self.values.dim() == 1:
            if query is not None:
                raise ValueError("these scores have a single target; call without query=")
            return self.values
        count = self.values.shape[1]
        if query is None:
            raise ValueError(f"these scores have {count} query columns: pass query=<column index>")
        index = _integer_index(query)
        if index is None:
            raise TypeError(f"query is one column index, an int in [0, {count}), got {query!r} ({type(query).__name__})")
        if not 0 <= index < count:
            raise IndexError(f"query={index} is out of range: these scores have {count} query columns, 0..{count - 1}")
        return self.values[:, index]

    def __getitem__(self, sample_id: int) -> Tensor:
        """Score(s) of one sample id (an integer)."""
        index = _integer_index(sample_id)
        if index is None:
            raise TypeError(f"sample ids are integers, got {sample_id!r}")
        sample_id = index
        hit = (self.ids == sample_id).nonzero()
        if hit.numel() == 0:
            raise KeyError(
                f"no score for sample id {sample_id}: {len(self.ids)} samples are scored (scores.ids). A sample gets a "
                "score only if a training batch held it (limit_train_batches, max_steps or an early stop can end a fit "
                "before every sample was drawn)"
            )
        return self.values[int(hit[0, 0])]

    def values_for(self, ids: Tensor | Sequence[int], query: int | None = None) -> Tensor:
        """The scores of ``ids`` in their order (one target column: ``query`` for a matrix), e.g.
        to line them up with a ground truth computed for those ids; ``KeyError`` naming the
        first id without a score."""
        try:
            given = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            if "Overflow" in str(err):
                raise ValueError(
                    f"ids hold an integer outside the int64 range ({err}): sample ids are int64 (below 2**63), so no "
                    "sample has such an id"
                ) from None
            raise TypeError(f"ids must be a 1-D sequence of integer sample ids, got {type(ids).__name__}: {err}") from None
        if given.dtype == torch.uint64 and given.numel() and bool((given.view(torch.int64) < 0).any()):
            raise ValueError("ids overflow int64: a uint64 id is >= 2**63; sample ids are int64 (below 2**63), so no sample has such an id")
        if given.numel() and (given.is_floating_point() or given.is_complex() or given.dtype == torch.bool) or given.ndim > 1:
            raise TypeError(
                f"ids must be a 1-D sequence of integer sample ids, got a {given.dtype} tensor of shape {tuple(given.shape)}"
                + (" (a boolean mask? pass scores.ids[mask])" if given.dtype == torch.bool else "")
            )
        wanted = given.to(torch.long).reshape(-1)
        column = self._column(query)
        order = self.ids.argsort()
        sorted_ids = self.ids[order]
        where = torch.searchsorted(sorted_ids, wanted).clamp(max=max(len(sorted_ids) - 1, 0))
        found = sorted_ids[where] == wanted if len(sorted_ids) else torch.zeros_like(wanted, dtype=torch.bool)
        if not bool(found.all()):
            self[int(wanted[~found][0])]  # raises the KeyError that explains a missing score
        return column[order[where]]

    def to_dict(self, query: int | None = None) -> dict[int, float]:
        """``{sample_id: score}`` for one target column."""
        return dict(zip(self.ids.tolist(), self._column(query).tolist(), strict=True))

    def most_harmful(self, k: int, query: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` lowest scores: ``(ids, values)``, most harmful first (NaN scores last; all
        samples if ``k`` exceeds their number). Equal scores are ranked by ascending sample id,
        whatever order the samples are stored in."""
        return self._ranked(k, query, helpful=False)

    def most_helpful(self, k: int, query: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` highest scores: ``(ids, values)``, most helpful first (NaN scores last; equal
        scores by ascending sample id, as in :meth:`most_harmful`)."""
        return self._ranked(k, query, helpful=True)

    def _ranked(self, k: int, query: int | None, helpful: bool) -> tuple[Tensor, Tensor]:
        count = _integer_index(k)
        if count is None or count < 0:
            raise ValueError(f"k must be a non-negative number of samples, got {k!r}")
        col = self._column(query)
        order = _ranking(self.ids, col, descending=helpful)[:count]
        return self.ids[order], col[order]

    # ------------------------------------------------------------------ summaries
    def summary(self, query: int | None = None) -> dict[str, float | int]:
        """Spread of one target column: mean, std (sample standard deviation; 0 for a single
        score), min, quartiles, max (target-loss units) and the fraction of harmful (negative)
        samples. NaN scores are left out of every statistic and counted: ``count`` is the number
        of scores the statistics are over, ``nan_count`` the number of NaN scores left out. With
        no score to summarise every statistic is NaN. Quartiles next to an infinite score are
        that infinity (``[0, 1, inf]``: q75 is ``inf``), never NaN from ``inf - inf``; only a
        quartile strictly between ``-inf`` and ``+inf`` is NaN. Cheap; what the callback logs."""
        return _spread(self._column(query))

    def per_class(self, labels: Mapping[int, Any] | Tensor, query: int | None = None) -> dict[Any, dict[str, float | int]]:
        """:meth:`summary` per class (NaN scores left out and counted in ``nan_count``, per class).
        ``labels``: ``{sample_id: label}`` or a tensor indexed by id."""
        col = self._column(query)
        if isinstance(labels, Tensor):
            if self.ids.numel() and int(self.ids.max()) >= labels.shape[0]:
                raise ValueError(f"labels has {labels.shape[0]} entries but sample ids go up to {int(self.ids.max())}")
            per_id = labels[self.ids].tolist()
        else:
            missing = [int(i) for i in self.ids.tolist() if int(i) not in labels]
            if missing:
                raise KeyError(f"{len(missing)} sample id(s) have no label, e.g. {missing[0]}")
            per_id = [labels[int(i)] for i in self.ids.tolist()]
        groups: dict[Any, list[int]] = {}
        for k, label in enumerate(per_id):
            groups.setdefault(label, []).append(k)
        return {
            label: _spread(col[rows])
            for label, rows in sorted(groups.items(), key=lambda kv: str(kv[0]))
        }

    def join(self, dataset: Any, ids: Tensor | None = None, query: int | None = None) -> list[tuple[int, float, Any]]:
        """``(sample_id, score, dataset[sample_id])`` for ``ids`` (default: every scored sample, in
        score order from most harmful, as :meth:`most_harmful`). Needs ids that index ``dataset`` (as
        with ``IndexedDataset``)."""
        col = self._column(query)
        if ids is None:
            ids = self.ids[_ranking(self.ids, col, descending=False)]
        rows = []
        for i in torch.as_tensor(ids).reshape(-1).tolist():
            rows.append((int(i), float(self[i] if query is None else self[i][int(query)]), dataset[int(i)]))
        return rows

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` indexed by ``sample_id`` with a ``score`` column (or ``query_<q>``
        columns). Needs pandas (an optional dependency)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("InfluenceScores.to_pandas needs pandas: pip install pandas") from err
        values = self.values.reshape(len(self), -1).numpy()
        cols = ["score"] if self.values.dim() == 1 else [f"query_{q}" for q in range(self.values.shape[1])]
        frame = pd.DataFrame(values, columns=cols, index=pd.Index(self.ids.numpy(), name="sample_id"))
        frame.attrs.update(self.metadata)
        return frame

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file in the same folder, then rename). Loads with :meth:`load`.

        The file carries a sha256 checksum of its ids, values and metadata, which :meth:`load`
        verifies (as well as the CRC-32 of every member of the zip archive).

        ``ids``, ``values`` and ``metadata`` are checked (and the tensors normalised) as the
        constructor does, also when they were replaced after construction: what :meth:`load` would
        refuse raises ``ValueError`` here, and nothing is written. So does a ``path`` that cannot be
        written (a folder, a path under a file, a folder without write permission)."""
        check_writable(path, "InfluenceScores.save", what="path")
        try:
            ids, values = _normalised_tensors(self.ids, self.values)
            _check_metadata_mapping(self.metadata)
            held = _json_metadata(self.metadata, "metadata")
        except ValueError as err:  # fields replaced after construction
            raise ValueError(f"cannot save these scores: {err}") from None
        try:
            metadata = json.dumps(held, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:  # metadata changed after construction
            raise ValueError(f"metadata must be JSON-serialisable without NaN or infinite numbers: {err}") from err
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "ids": ids.clone(),
            "values": values.clone(),
            "metadata": metadata,
            "checksum": _checksum(FORMAT_VERSION, ids, values, metadata),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InfluenceScores:
        """Read a file written by :meth:`save` without unpickling arbitrary objects.

        Raises :class:`ScoreFileError` for a missing, truncated, corrupted or foreign file: the
        CRC-32 of every zip member is checked before anything is unpickled, and the content
        checksum (files written before checksums were added have none and load without it)."""
        path = Path(path)
        kind = _special_file_kind(path)
        if kind is not None:  # reading a FIFO would block; a device is not a score file
            raise ScoreFileError(f"{path} is {kind}, not a regular file: pass the path of a score file written by InfluenceScores.save")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ScoreFileError(f"no score file at {path}") from None
        except OSError as err:
            raise ScoreFileError(f"cannot read the score file {path}: {err}") from None
        verify_zip(data, str(path))
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            message = _plain(str(err))
            if "Weights only load failed" not in message and "Unsupported global" not in message:
                raise ScoreFileError(f"{path} is not a readable score file (truncated or corrupted?): {message}") from None
            raise ScoreFileError(_pickled_object_message(str(path), message)) from None
        except Exception as err:  # torch raises many types for damaged zip/pickle data
            raise ScoreFileError(f"{path} is not a readable score file (truncated or corrupted?): {_plain(str(err))}") from None
        try:
            return cls._from_payload(payload, str(path))
        except ScoreFileError:
            raise
        except Exception as err:  # a last guard: every failure to load names the file
            raise ScoreFileError(
                f"{path} is not a readable score file (crafted or corrupted?): {type(err).__name__}: {_plain(str(err))[:300]}"
            ) from None

    @classmethod
    def _from_payload(cls, payload: Any, origin: str) -> InfluenceScores:
        if not isinstance(payload, Mapping) or payload.get("format") != FORMAT_NAME:
            raise ScoreFileError(f"{origin} is not a lightning-influence score file")
        version = payload.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ScoreFileError(f"{origin} has score-file version {version!r}; this library reads versions 1..{FORMAT_VERSION}")
        ids, values, meta = payload.get("ids"), payload.get("values"), payload.get("metadata")
        if not isinstance(ids, Tensor) or not isinstance(values, Tensor) or not isinstance(meta, str):
            raise ScoreFileError(f"{origin} is missing ids, values or metadata")
        if ids.layout != torch.strided or values.layout != torch.strided:
            raise ScoreFileError(
                f"{origin} has ids of layout {ids.layout} and values of layout {values.layout}; score files hold dense "
                "(torch.strided) tensors"
            )
        if ids.dtype != torch.long or values.dtype != torch.float64:
            raise ScoreFileError(f"{origin} has ids of dtype {ids.dtype} and values of dtype {values.dtype}; expected int64 and float64")
        if ids.dim() != 1:
            raise ScoreFileError(f"{origin} has ids of shape {tuple(ids.shape)}; expected a vector [N]")
        if ids.device.type != "cpu" or values.device.type != "cpu":
            raise ScoreFileError(
                f"{origin} has ids on the {ids.device.type!r} device and values on the {values.device.type!r} device; score "
                "files hold CPU tensors with their data (a 'meta' tensor holds none): re-create it with InfluenceScores.save"
            )
        if "checksum" in payload:
            stored = payload["checksum"]
            if not isinstance(stored, str) or stored != _checksum(version, ids, values, meta):
                raise ScoreFileError(
                    f"{origin} is corrupted: its ids, values or metadata do not match the checksum stored when it was "
                    "written (a damaged copy, or edited since); re-create it from the run"
                )
        try:
            metadata = json.loads(meta, parse_constant=_refuse_json_constant, parse_float=_finite_json_float)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise ScoreFileError(f"{origin} has unreadable metadata: {err}") from None
        except RecursionError:
            raise ScoreFileError(
                f"{origin} has unreadable metadata: its JSON is nested too deeply to read (InfluenceScores.save never "
                "writes such metadata: a crafted or corrupted file)"
            ) from None
        if not isinstance(metadata, dict):
            raise ScoreFileError(f"{origin} has metadata that is not a mapping")
        try:
            return cls(ids, values, metadata)
        except ValueError as err:
            raise ScoreFileError(f"{origin} is inconsistent: {err}") from None

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``sample_id,score`` (or ``sample_id,query_0,...``) rows, atomically (the tensors
        checked as :meth:`save` checks them; a ``path`` that cannot be written is refused as there)."""
        check_writable(path, "InfluenceScores.to_csv", what="path")
        try:
            ids, values = _normalised_tensors(self.ids, self.values)
        except ValueError as err:  # fields replaced after construction
            raise ValueError(f"cannot write these scores: {err}") from None
        out = io.StringIO()
        writer = csv.writer(out)
        cols = ["score"] if values.dim() == 1 else [f"query_{q}" for q in range(values.shape[1])]
        writer.writerow(["sample_id", *cols])
        rows = values.reshape(len(ids), len(cols)).tolist()
        for i, row in zip(ids.tolist(), rows, strict=True):
            writer.writerow([i, *(repr(v) for v in row)])
        return atomic_write_bytes(path, out.getvalue().encode())


def _pickled_object_message(origin: str, torch_message: str = "") -> str:
    """What a file that holds a pickled Python object instead of a score file is, and the fix."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    name = found.group(1) if found else ""
    what = f"a pickled Python object (of {name})" if name else "a pickled Python object"
    how = (
        "written with torch.save(scores, path), which pickles the object" if name.endswith("InfluenceScores")
        else "written with torch.save(...) or pickle"
    )
    return (
        f"{origin} holds {what}, not a score file ({how}, not with InfluenceScores.save). Score files are read without "
        "unpickling Python objects (unpickling can run arbitrary code), so it is not loaded. Write score files with "
        "scores.save(path) and read them with InfluenceScores.load(path)"
    )


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _plain(message: str) -> str:
    """``message`` without ANSI escape sequences (torch bolds parts of its messages)."""
    return _ANSI_ESCAPE.sub("", message)


def _checksum(version: int, ids: Tensor, values: Tensor, metadata: str) -> str:
    """``"sha256:<hex>"`` over the format, version, shapes, little-endian bytes of ``ids`` (int64)
    and ``values`` (float64), and the metadata JSON text."""
    header = json.dumps(
        {"format": FORMAT_NAME, "version": version, "ids": list(ids.shape), "values": list(values.shape)}, sort_keys=True
    )
    digest = hashlib.sha256(header.encode())
    digest.update(len(metadata.encode()).to_bytes(8, "little"))
    digest.update(metadata.encode())
    for tensor, dtype in ((ids, "<i8"), (values, "<f8")):
        digest.update(tensor.contiguous().numpy().astype(dtype, copy=False).reshape(-1))
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def verify_zip(data: bytes, origin: str, kind: str = "score file", error: type[ValueError] = ScoreFileError) -> None:
    """Refuse ``data`` (raise ``error``) unless it is a zip archive (as ``torch.save`` writes)
    whose members are stored uncompressed and all match their CRC-32: torch's own reader does not
    check CRCs, so a flipped bit in a tensor would load as a changed value. ``kind`` names the
    file in messages (a score file, a parameter checkpoint, ...)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except Exception as err:  # BadZipFile, and struct/Unicode/OS errors for damaged directories
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle's PROTO opcode
            if error is ScoreFileError:
                raise error(_pickled_object_message(origin) + " (it looks like a pickle, not the zip archive of a score file)") from None
            raise error(f"{origin} is a pickle, not the zip archive torch.save writes for a {kind}") from None
        raise error(f"{origin} is not a readable {kind} (truncated or corrupted?): {_plain(str(err))}") from None
    if not members:
        raise error(f"{origin} is not a readable {kind} (truncated or corrupted?): an empty archive")
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED:
            raise error(f"{origin} is not a {kind} written by this library: member {info.filename!r} is compressed")
        try:
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass
        except Exception as err:  # zipfile.BadZipFile("Bad CRC-32 ..."), EOFError for a short member
            raise error(f"{origin} is corrupted: zip member {info.filename!r} is damaged ({err})") from None


def _special_file_kind(path: Path) -> str | None:
    """What ``path`` is if it exists (symbolic links followed) and is neither a regular file nor a
    folder (``"a FIFO (named pipe)"``, ``"a character device"``, ...), else ``None``."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing (or a dangling link, or unreadable): not a special file we know of
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _write_target(path: Path) -> Path:
    """The file an atomic write of ``path`` replaces: ``path`` itself, or, for a symbolic link, the
    file the link resolves to (the link stays a link; its target gets the new content)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _temporary_prefix(name: str) -> str:
    """A prefix for the temporary (and probe) files of a write of ``name`` that keeps them within
    the 255-byte name limit of common file systems whatever the length of ``name``: ``.<name>.``
    for a short name, else ``.<start of name>~<hash>.``."""
    if len(name.encode()) <= 64:
        return f".{name}."
    start = name.encode()[:40].decode(errors="ignore")
    return f".{start}~{hashlib.sha256(name.encode()).hexdigest()[:12]}."


def _file_path_problem(path: Path) -> tuple[Path, str | None]:
    """``(nearest existing ancestor, why path cannot be a file there)``: ``"is a folder, not a
    file"``, ``"lies under <ancestor>, which is a file, not a folder"``, ``"is a FIFO (named pipe),
    not a regular file ..."`` (any existing non-regular file), or ``None``. A symbolic link is judged
    by the file it resolves to (see :func:`atomic_write_bytes`)."""
    target = _write_target(path)
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if target.is_dir():
        return ancestor, "is a folder, not a file"
    if not ancestor.is_dir():
        return ancestor, f"lies under {str(ancestor)!r}, which is a file, not a folder"
    kind = _special_file_kind(target)
    if kind is not None:
        via = f" (the symbolic link resolves to {str(target)!r})" if target != path else ""
        return ancestor, (
            f"exists and is {kind}, not a regular file{via}: writing would replace it with a regular file, so it is "
            "left alone"
        )
    return ancestor, None


def check_writable(path: str | os.PathLike[str], owner: str, what: str = "save_path") -> None:
    """Refuse, before any work is spent, a file path that :func:`atomic_write_bytes` could not
    write: a folder, a path under a regular file, an existing file that is not a regular file (a
    FIFO, a device, a socket), or a folder this process cannot create files in (probed with a
    temporary file that is removed at once; missing folders are not created). A symbolic link is
    checked as the file it resolves to, which the write replaces. ``owner`` and ``what`` (the
    argument's name) start the ``ValueError``'s message."""
    path = Path(path)
    advice = "pass a file path in a folder this process can write to"
    ancestor, problem = _file_path_problem(path)
    if problem is not None:
        example = f" (e.g. {str(path / 'scores.pt')!r})" if path.is_dir() else ""
        if "not a regular file" in problem:
            advice = "pass the path of a regular file (or of one that does not exist yet)"
        raise ValueError(f"{owner}: {what} {str(path)!r} {problem}; {advice}{example}")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temporary_prefix(_write_target(path).name), suffix=".probe", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{owner}: {what} {str(path)!r} cannot be written: creating a file in {str(ancestor)!r} failed "
            f"({type(err).__name__}: {err.strerror or err}); {advice}"
        ) from err


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A ``path`` that is a folder (``IsADirectoryError``), lies under a file (``NotADirectoryError``)
    or exists as something other than a regular file (a FIFO, a device, a socket:
    ``FileExistsError``; it is left as it is) is refused with a message naming it, not the
    temporary file. A symbolic link is written through: its resolved target is replaced
    atomically (the temporary file in the target's folder) and the link stays a link. A write that
    fails (a full disk, a file size limit) raises ``OSError`` naming ``path`` and leaves the
    previous file, if any, as it was. Temporary file names stay short whatever the length of
    ``path``'s name. Returns ``path``."""
    path = Path(path)
    _, problem = _file_path_problem(path)
    if problem is not None:
        target = _write_target(path)
        error = IsADirectoryError if target.is_dir() else FileExistsError if "not a regular file" in problem else NotADirectoryError
        fix = (
            "pass the path of a regular file (or of one that does not exist yet)" if error is FileExistsError
            else "pass the path of a file in a folder"
        )
        raise error(f"cannot write the file {str(path)!r}: it {problem}; {fix}")
    target = _write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target.name), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            via = f" (through the symbolic link to {str(target)!r})" if target != path else ""
            message = (
                f"writing the file {str(path)!r}{via} failed ({err.strerror or err}; disk full, or over a file size "
                "limit?): the previous file there, if any, is left as it was; free space or write elsewhere"
            )
            raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
        raise
    return path


class ScoreAccumulator:
    """Per-sample float64 sums indexed by sample id, growing as larger ids appear.

    The sums live on the device of the values added (where it has float64; else on the CPU), so
    that adding reads nothing back from it; ids and ``seen`` stay on the host. :meth:`result`,
    :meth:`reduced` and :meth:`state_dict` return CPU tensors.

    Cross-rank reduction (for distributed runs, :meth:`reduced`): sum of ``totals``, logical or of
    ``seen``.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.totals = torch.zeros(capacity, dtype=torch.float64)  # [N] or, for query targets, [N, Q]
        self.seen = torch.zeros(capacity, dtype=torch.bool)

    def _grow(self, size: int, columns: tuple[int, ...] = ()) -> None:
        if columns and self.totals.shape[1:] != columns:
            if self.totals.dim() > 1 or self.totals.abs().sum() > 0:
                raise ValueError(f"score columns changed from {tuple(self.totals.shape[1:])} to {columns}")
            self.totals = torch.zeros((self.totals.shape[0], *columns), dtype=torch.float64)
        if size <= self.seen.numel():
            return
        size = max(size, 2 * self.seen.numel())
        extra = size - self.seen.numel()
        pad = torch.zeros((extra, *self.totals.shape[1:]), dtype=torch.float64, device=self.totals.device)
        self.totals = torch.cat([self.totals, pad])
        self.seen = torch.cat([self.seen, torch.zeros(extra, dtype=torch.bool)])

    def mark_seen(self, ids: Tensor) -> None:
        ids = ids.cpu()
        self._grow(int(ids.max()) + 1)
        self.seen[ids] = True

    def add(self, ids: Tensor, values: Tensor) -> None:
        """Add ``values`` (``[b]`` or ``[b, Q]``, any device) to the sums of ``ids`` (host ``[b]``)."""
        ids = ids.cpu()
        self._grow(int(ids.max()) + 1, tuple(values.shape[1:]))
        device = values.device if values.device.type in ("cpu", "cuda") else torch.device("cpu")
        if self.totals.device != device:
            self.totals = self.totals.to(device)
        values = values.detach().to(torch.float64) if values.device == device else values.detach().to(device, torch.float64)
        self.totals.index_add_(0, ids.to(device, non_blocking=True), values)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(ids, values)`` of every sample seen in training (CPU)."""
        ids = self.seen.nonzero().reshape(-1)
        return ids, self.totals.cpu()[ids].clone()

    def reduced(self, collective: Collective) -> ScoreAccumulator:
        """The accumulator summed over the ranks of ``collective`` (a collective call: every rank
        must make it); ``self`` is left as it is. Single process: ``self``."""
        if not collective.distributed:
            return self
        local_columns = int(self.totals.shape[1]) if self.totals.dim() > 1 else 0
        rows, columns = (int(v) for v in collective.max(torch.tensor([self.seen.numel(), local_columns])).tolist())
        if local_columns and local_columns != columns:
            raise ValueError(f"score columns differ between ranks: {local_columns} here, {columns} elsewhere")
        totals = torch.zeros((rows, columns) if columns else (rows,), dtype=torch.float64)
        totals[: self.totals.shape[0]] = self.totals if self.totals.dim() == totals.dim() else self.totals.unsqueeze(1)
        seen = torch.zeros(rows, dtype=torch.int32)
        seen[: self.seen.numel()] = self.seen.int()
        out = ScoreAccumulator()
        out.totals, out.seen = collective.sum(totals), collective.sum(seen) > 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.cpu().clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals, self.seen = state["totals"].clone(), state["seen"].clone()
