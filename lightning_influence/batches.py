"""Batch structure: the samples of a batch, whatever container holds them.

A batch is any nesting of tensors in dicts (any ``Mapping``), lists, tuples, named tuples and
dataclasses (frozen ones included), with other leaves (strings, numbers, ``None``) carried along.
Its *sample dimension* is the leading dimension of its tensors: every tensor whose first
dimension equals the batch size holds one row per sample, and so does every list or tuple of that
many plain values (the strings or numbers that ``default_collate`` gathers per sample); any other
leaf is shared by all samples.
Everything in the package that slices, moves or sizes a batch goes through this module, so one
container type that works in one place works everywhere.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor


BatchRemoval = Literal["reaverage", "drop"]
"""What removing ``z`` from a micro-batch of ``b`` means: ``"reaverage"``, the mean loss over the other
``b - 1`` (``dG = -(grad l_z - mean) / (n (b - 1))``); ``"drop"``, ``z``'s term dropped with the
batch's ``1 / b`` kept (``dG = -grad l_z / (n b)``, SGD-influence's counterfactual)."""


def check_batch_removal(value: object) -> None:
    """Refuse a ``batch_removal`` other than the two :data:`BatchRemoval` values, saying what each means."""
    if value not in ("reaverage", "drop"):
        raise ValueError(
            "batch_removal must be 'reaverage' (the batch mean over the samples left, as retraining without the sample "
            "computes it) or 'drop' (the sample's term dropped, the batch keeps its 1/b: SGD-influence's and classic "
            f"TracIn's counterfactual), got {value!r}"
        )


def map_tensors(fn: Callable[[Tensor], Any], batch: Any) -> Any:
    """``batch`` with every tensor replaced by ``fn(tensor)``; containers keep their type.

    Dataclasses are rebuilt with :func:`dataclasses.replace` (fields with ``init=False`` are left to
    the class), named tuples with their constructor, mappings as ``type(batch)(pairs)``.
    """
    return _map(batch, fn, None)


def _map(batch: Any, on_tensor: Callable[[Tensor], Any], on_values: Callable[[Any], Any] | None) -> Any:
    """:func:`map_tensors`; with ``on_values``, also every plain list/tuple of non-container
    values (strings, numbers: what ``default_collate`` makes of per-sample non-tensor fields)."""
    if isinstance(batch, Tensor):
        return on_tensor(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: _map(getattr(batch, f.name), on_tensor, on_values) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, Mapping):
        pairs = {k: _map(v, on_tensor, on_values) for k, v in batch.items()}
        if hasattr(batch, "default_factory"):
            return type(batch)(batch.default_factory, pairs)  # type: ignore[call-arg]
        try:
            return type(batch)(pairs)
        except TypeError as err:
            raise TypeError(
                f"cannot rebuild a batch of type {type(batch).__name__} from a dict of its items ({err}): give the "
                "mapping class a constructor that takes one, or collate batches into a dict or a dataclass"
            ) from err
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map(v, on_tensor, on_values) for v in batch))
    if isinstance(batch, (list, tuple)):
        if on_values is not None and batch and all(isinstance(v, _VALUES) for v in batch):
            return on_values(batch)
        return type(batch)(_map(v, on_tensor, on_values) for v in batch)
    return batch


_VALUES = (str, bytes, int, float, complex, bool, type(None))


def tensors(batch: Any) -> Iterator[Tensor]:
    """Every tensor of ``batch``, in the order :func:`map_tensors` visits them (without rebuilding
    any container: a dataclass's ``__init__`` does not run)."""
    if isinstance(batch, Tensor):
        yield batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            if f.init:
                yield from tensors(getattr(batch, f.name))
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from tensors(value)


def batch_size(batch: Any, what: str = "batch") -> int:
    """Number of samples of a batch: the leading dimension of its first tensor with one."""
    for leaf in tensors(batch):
        if leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError(
        f"cannot tell the size of a {what} of type {type(batch).__name__}: it holds no tensor with a batch dimension "
        "(batches are tensors nested in dicts, lists, tuples, named tuples or dataclasses)"
    )


def samples_in(batch: Any, sample_ids: Callable[[Any], Tensor] | None = None, what: str = "batch") -> int:
    """Number of samples of a batch: the length of its ids where ``sample_ids`` (the module's
    :meth:`~lightning_influence.mixin.InfluenceMixin.sample_ids`) reads them, else :func:`batch_size`.
    A batch whose first tensor is not per sample (flat tokens with offsets for ``nn.EmbeddingBag``,
    sequence-first ``[T, B]`` data) is counted right through its ids."""
    if sample_ids is not None:
        try:
            ids = sample_ids(batch)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError):  # a batch without ids (a validation loader)
            ids = None
        # trusted where another tensor of the batch has that leading dimension (else the default sample_ids may
        # have read per-token labels of a batch without ids)
        if isinstance(ids, Tensor) and ids.dim() >= 1 and any(t is not ids and t.dim() > 0 and t.shape[0] == ids.shape[0] for t in tensors(batch)):
            return int(ids.shape[0])
    return batch_size(batch, what)


def select_samples(batch: Any, index: Tensor | Sequence[int] | slice, size: int | None = None) -> Any:
    """The sub-batch of the samples at positions ``index`` (integer positions or a slice), in that
    order. Per-sample data is every tensor whose leading dimension is the batch size ``size`` (by
    default :func:`batch_size`) and every list/tuple of ``size`` plain values (strings, numbers);
    anything else is shared by all samples and kept whole."""
    size = batch_size(batch) if size is None else size
    if isinstance(index, slice):

        def take_rows(t: Tensor) -> Tensor:
            return t[index]

        def rows() -> Sequence[int]:
            return range(size)[index]
    else:
        positions = torch.as_tensor(index, dtype=torch.long).reshape(-1)

        def take_rows(t: Tensor) -> Tensor:
            return t.index_select(0, positions.to(t.device))

        def rows() -> Sequence[int]:  # only for lists of values: no host-device copy otherwise
            return positions.tolist()

    def on_tensor(t: Tensor) -> Tensor:
        return take_rows(t) if t.dim() > 0 and t.shape[0] == size else t

    def on_values(values: Any) -> Any:
        return type(values)(values[i] for i in rows()) if len(values) == size else values

    return _map(batch, on_tensor, on_values)


def batch_chunks(batch: Any, chunk_size: int | None) -> list[tuple[Any, int]]:
    """``batch`` split along its sample dimension into consecutive chunks of at most
    ``chunk_size`` samples, as ``[(chunk, samples)]`` (see :func:`select_samples` for what is
    per-sample). ``None`` (or a batch that fits) gives the batch itself. For per-sample losses that
    do not depend on the other samples of their batch (in evaluation mode: dropout off,
    normalisation statistics frozen) the chunks' losses are the batch's; memory per pass is
    bounded by the chunk."""
    size = batch_size(batch)
    if chunk_size is None or size <= chunk_size:
        return [(batch, size)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [
        (select_samples(batch, slice(start, start + chunk_size), size), min(chunk_size, size - start))
        for start in range(0, size, chunk_size)
    ]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor detached and moved to ``device``."""
    return map_tensors(lambda t: t.detach().to(device), batch)


# ------------------------------------------------------------------ storing batches without pickle
def pack(batch: Any) -> tuple[Any, list[Tensor]]:
    """``batch`` as ``(layout, tensors)``: the tensors in visiting order and a layout made of
    dicts, lists, strings and numbers only, so that both load with ``torch.load(weights_only=True)``.
    Containers other than ``dict``, ``list`` and ``tuple`` (dataclasses, named tuples, other
    mappings) are recorded by their qualified class name; :func:`unpack` rebuilds them."""
    found: list[Tensor] = []

    def layout(node: Any) -> Any:
        if isinstance(node, Tensor):
            found.append(node)
            return {"tensor": len(found) - 1}
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            fields = {f.name: layout(getattr(node, f.name)) for f in dataclasses.fields(node) if f.init}
            return {"dataclass": _qualified_name(type(node)), "fields": fields}
        if isinstance(node, Mapping):
            kind = None if type(node) is dict else _qualified_name(type(node))
            for k in node:
                if not isinstance(k, (str, int)):
                    raise TypeError(f"a batch with a {type(k).__name__} key ({k!r}) cannot be stored: use str or int keys")
            return {"mapping": kind, "items": [[k, layout(v)] for k, v in node.items()]}
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return {"namedtuple": _qualified_name(type(node)), "items": [layout(v) for v in node]}
        if isinstance(node, (list, tuple)):
            return {type(node).__name__ if type(node) in (list, tuple) else "list": [layout(v) for v in node]}
        if isinstance(node, (str, int, float, bool)) or node is None:
            return {"value": node}
        raise TypeError(
            f"a batch holding a {type(node).__name__} cannot be stored safely (storage='disk', checkpoint_every "
            "or a Lightning checkpoint of the callback): batches must be tensors, strings and numbers nested in "
            "dicts, lists, tuples, named tuples or dataclasses. Convert the value in the collate function"
        )

    return layout(batch), found


def unpack(layout: Any, tensors: Sequence[Tensor]) -> Any:
    """The batch that :func:`pack` gave ``(layout, tensors)`` for. Container classes are looked up
    among modules already imported (never imported on the way: a stored file cannot make code
    run) and must be dataclasses, named tuples or mappings."""
    if "tensor" in layout:
        return tensors[layout["tensor"]]
    if "value" in layout:
        return layout["value"]
    if "list" in layout:
        return [unpack(v, tensors) for v in layout["list"]]
    if "tuple" in layout:
        return tuple(unpack(v, tensors) for v in layout["tuple"])
    if "dataclass" in layout:
        cls = _resolve(layout["dataclass"], lambda c: dataclasses.is_dataclass(c))
        return cls(**{k: unpack(v, tensors) for k, v in layout["fields"].items()})
    if "namedtuple" in layout:
        cls = _resolve(layout["namedtuple"], lambda c: issubclass(c, tuple) and hasattr(c, "_fields"))
        return cls(*(unpack(v, tensors) for v in layout["items"]))
    if "mapping" in layout:
        pairs = [(k, unpack(v, tensors)) for k, v in layout["items"]]
        if layout["mapping"] is None:
            return dict(pairs)
        cls = _resolve(layout["mapping"], lambda c: issubclass(c, Mapping))
        if hasattr(cls, "default_factory"):
            return cls(None, pairs)
        return cls(pairs)
    raise ValueError(f"not a stored batch layout: {sorted(layout)}")


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str, valid: Callable[[type], bool]) -> type:
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type) or not valid(found):
        raise ValueError(
            f"cannot rebuild a stored batch of class {name}: "
            + ("its module is not imported" if module is None else "no such container class")
            + ". Import the module that defines the batch class before loading (stored files never import code)"
        )
    return found
