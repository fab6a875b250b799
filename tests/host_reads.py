"""An audit of device-to-host reads made by library code, usable on a CPU-only machine.

On an accelerator, reading a tensor's value on the host (``bool``, ``int``, ``float``, ``.item()``,
``.tolist()``, ``.cpu()``, ``torch.equal``, data-dependent shapes such as ``unique`` or boolean
indexing) waits for the device to finish all the work queued before it. On the CPU every tensor
is on the host, so the audit tracks *provenance* instead: a tensor counts as a host tensor when
library code created it on the CPU (a factory call without a device or with ``device="cpu"``, or
a copy to the CPU) or computed it from host tensors only (a factory given a ``torch.device``
object makes a tensor on the compute device); anything else (parameters, gradients, batches, and whatever
is computed from them) counts as a device tensor, as it would be on a GPU. A read of a device
tensor's value from a frame in ``lightning_influence`` is recorded with its call site.
"""

from __future__ import annotations

import collections
import os
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "numpy", "nonzero",
         "unique", "unique_consecutive", "masked_select", "argwhere", "equal"}
"""Calls that read a value (or a value-dependent shape) on the host."""

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "randperm", "randn", "rand",
             "randint", "eye", "zeros_like", "ones_like", "empty_like", "full_like"}
"""Calls that make a tensor (on the CPU unless a device is given, or ``*_like`` a device tensor)."""

_HOST = "_audit_host"


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


def _mark(out: Any, host: bool) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _HOST, host)
            except (AttributeError, RuntimeError):
                pass


def _library_site() -> str | None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "lightning_influence" in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
        if "/torch/" not in frame.filename:
            return None
    return None


class HostReadAudit(TorchFunctionMode):
    """Active during a run; :attr:`counting` switches the recording of reads on and off (the
    provenance is tracked throughout). :attr:`sites` counts reads by ``"call file:line"``."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device_inputs = [t for t in tensors if not _is_host(t)]
        target = kwargs.get("device")
        if name in ("to", "cpu"):
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    target = a
            target = "cpu" if name == "cpu" else target
        to_host = name in ("to", "cpu") and target is not None and torch.device(target).type == "cpu"
        read = name in READS or (to_host and not kwargs.get("non_blocking", False))
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            read = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and not _is_host(i) for i in index)
        if self.counting and read and device_inputs:
            site = _library_site()
            if site is not None:
                self.sites[f"{name} {site}"] += 1
        out = func(*args, **kwargs)
        if name.endswith("_") and not name.startswith("__") and tensors:
            return out  # in place: the result is the first argument, provenance unchanged
        if name == "copy_":
            return out
        if to_host:
            if not any(out is t for t in tensors):  # a copy (on a GPU, always; on the CPU, unless already there)
                _mark(out, True)
        elif name in FACTORIES and not (name.endswith("_like") and device_inputs):
            # Host intent is written as no device or the string "cpu"; a torch.device object is the compute
            # device of some tensor (a parameter's, a batch's): a device tensor, as it would be on a GPU.
            _mark(out, target is None or (isinstance(target, str) and torch.device(target).type == "cpu"))
        elif tensors:
            _mark(out, not device_inputs)
        return out


def as_device(value: Any) -> None:
    """Mark every tensor in ``value`` (a batch, a list of parameters) as a device tensor."""
    _mark(value, False)
