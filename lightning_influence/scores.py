"""The score store: influence values per training sample, with metadata, safe files and CSV export.

Sign and units (every estimator in the library): a score is the predicted change of the
target loss when the sample is removed from training. Positive: the sample helps (removing
it raises the loss). Negative: the sample hurts (a cleaning candidate).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import operator
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT_NAME = "lightning-influence/scores"
FORMAT_VERSION = 1
SIGN_CONVENTION = "target-loss change when the sample is removed; positive helps, negative hurts"

MetadataValue = str | int | float | bool | None


class ScoreFileError(ValueError):
    """A score file is missing, truncated, corrupted or of an unknown format."""


@dataclass
class InfluenceScores:
    """Influence scores of training samples.

    ``ids``: ``LongTensor[N]`` sample ids, unique. ``values``: float64 ``Tensor[N]`` (one target)
    or ``Tensor[N, Q]`` (one column per query). ``metadata``: JSON-serialisable facts (estimator,
    mode, target, steps seen, ...); ``sign_convention`` and ``version`` are always added.
    """

    ids: Tensor
    values: Tensor
    metadata: dict[str, MetadataValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = torch.as_tensor(self.ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"sample ids must be integers, got a {ids.dtype} tensor")
        self.ids = ids.detach().to("cpu", torch.long).reshape(-1)
        self.values = torch.as_tensor(self.values).detach().to("cpu", torch.float64)
        if self.values.dim() not in (1, 2) or self.values.shape[0] != self.ids.shape[0]:
            raise ValueError(
                f"values must have shape [N] or [N, Q] with N = len(ids) = {self.ids.shape[0]}, got {tuple(self.values.shape)}"
            )
        if self.ids.numel() != self.ids.unique().numel():
            raise ValueError("sample ids in InfluenceScores must be unique")
        bad = [k for k in self.metadata if not isinstance(k, str)]
        if bad:
            raise ValueError(f"metadata keys must be strings (they are saved as JSON), got {bad[:4]}")
        self.metadata = {**self.metadata, "sign_convention": SIGN_CONVENTION, "version": FORMAT_VERSION}
        try:
            json.dumps(self.metadata)
        except TypeError as err:
            raise ValueError(f"metadata must be JSON-serialisable: {err}") from err

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
        if query is None:
            raise ValueError(f"these scores have {self.values.shape[1]} query columns: pass query=<column index>")
        return self.values[:, query]

    def __getitem__(self, sample_id: int) -> Tensor:
        """Score(s) of one sample id (an integer)."""
        try:
            sample_id = operator.index(sample_id)
        except TypeError:
            raise TypeError(f"sample ids are integers, got {sample_id!r}") from None
        hit = (self.ids == sample_id).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"no score for sample id {sample_id}")
        return self.values[int(hit[0, 0])]

    def to_dict(self, query: int | None = None) -> dict[int, float]:
        """``{sample_id: score}`` for one target column."""
        return dict(zip(self.ids.tolist(), self._column(query).tolist(), strict=True))

    def most_harmful(self, k: int, query: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` lowest scores: ``(ids, values)``, most harmful first (NaN scores last; all
        samples if ``k`` exceeds their number)."""
        return self._ranked(k, query, helpful=False)

    def most_helpful(self, k: int, query: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` highest scores: ``(ids, values)``, most helpful first (NaN scores last)."""
        return self._ranked(k, query, helpful=True)

    def _ranked(self, k: int, query: int | None, helpful: bool) -> tuple[Tensor, Tensor]:
        try:
            count = -1 if isinstance(k, bool) else operator.index(k)
        except TypeError:
            count = -1
        if count < 0:
            raise ValueError(f"k must be a non-negative number of samples, got {k!r}")
        col = self._column(query)
        # ascending order puts NaN last; negating ranks the highest first and keeps ties in id order
        order = torch.argsort(-col if helpful else col, stable=True)[:count]
        return self.ids[order], col[order]

    # ------------------------------------------------------------------ summaries
    def summary(self, query: int | None = None) -> dict[str, float | int]:
        """Spread of one target column: count, mean, std, min, quartiles, max (target-loss units)
        and the fraction of harmful (negative) samples. Cheap; what the callback logs."""
        col = self._column(query)
        if col.numel() == 0:
            return {"count": 0}
        q = torch.quantile(col, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        return {
            "count": int(col.numel()),
            "mean": float(col.mean()),
            "std": float(col.std()) if col.numel() > 1 else 0.0,
            "min": float(col.min()),
            "q25": q[0],
            "median": q[1],
            "q75": q[2],
            "max": float(col.max()),
            "harmful_fraction": float((col < 0).double().mean()),
        }

    def per_class(self, labels: Mapping[int, Any] | Tensor, query: int | None = None) -> dict[Any, dict[str, float | int]]:
        """:meth:`summary` per class. ``labels``: ``{sample_id: label}`` or a tensor indexed by id."""
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
            label: InfluenceScores(self.ids[rows], col[rows]).summary()
            for label, rows in sorted(groups.items(), key=lambda kv: str(kv[0]))
        }

    def join(self, dataset: Any, ids: Tensor | None = None, query: int | None = None) -> list[tuple[int, float, Any]]:
        """``(sample_id, score, dataset[sample_id])`` for ``ids`` (default: every scored sample, in
        score order from most harmful). Needs ids that index ``dataset`` (as with ``IndexedDataset``)."""
        col = self._column(query)
        if ids is None:
            order = torch.argsort(col, stable=True)
            ids = self.ids[order]
        rows = []
        for i in torch.as_tensor(ids).reshape(-1).tolist():
            rows.append((int(i), float(self[i] if query is None else self[i][query]), dataset[int(i)]))
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
        """Write atomically (temporary file in the same folder, then rename). Loads with :meth:`load`."""
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "ids": self.ids.clone(),
            "values": self.values.clone(),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InfluenceScores:
        """Read a file written by :meth:`save` without unpickling arbitrary objects."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ScoreFileError(f"no score file at {path}") from None
        except Exception as err:  # torch raises many types for damaged zip/pickle data
            raise ScoreFileError(f"{path} is not a readable score file (truncated or corrupted?): {err}") from None
        return cls._from_payload(payload, str(path))

    @classmethod
    def _from_payload(cls, payload: Any, origin: str) -> InfluenceScores:
        if not isinstance(payload, Mapping) or payload.get("format") != FORMAT_NAME:
            raise ScoreFileError(f"{origin} is not a lightning-influence score file")
        version = payload.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ScoreFileError(f"{origin} has score-file version {version!r}; this library reads versions 1..{FORMAT_VERSION}")
        ids, values, meta = payload.get("ids"), payload.get("values"), payload.get("metadata")
        if not isinstance(ids, Tensor) or not isinstance(values, Tensor) or not isinstance(meta, str):
            raise ScoreFileError(f"{origin} is missing ids, values or metadata")
        if ids.dtype != torch.long or values.dtype != torch.float64:
            raise ScoreFileError(f"{origin} has ids of dtype {ids.dtype} and values of dtype {values.dtype}; expected int64 and float64")
        try:
            metadata = json.loads(meta)
        except json.JSONDecodeError as err:
            raise ScoreFileError(f"{origin} has unreadable metadata: {err}") from None
        if not isinstance(metadata, dict):
            raise ScoreFileError(f"{origin} has metadata that is not a mapping")
        try:
            return cls(ids, values, metadata)
        except ValueError as err:
            raise ScoreFileError(f"{origin} is inconsistent: {err}") from None

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``sample_id,score`` (or ``sample_id,query_0,...``) rows, atomically."""
        out = io.StringIO()
        writer = csv.writer(out)
        cols = ["score"] if self.values.dim() == 1 else [f"query_{q}" for q in range(self.values.shape[1])]
        writer.writerow(["sample_id", *cols])
        rows = self.values.reshape(len(self), len(cols)).tolist()
        for i, row in zip(self.ids.tolist(), rows, strict=True):
            writer.writerow([i, *(repr(v) for v in row)])
        return atomic_write_bytes(path, out.getvalue().encode())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path

