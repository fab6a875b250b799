"""Device values read on the host without stalling the device.

Reading a CUDA tensor's value (``bool``, ``int``, ``.tolist()``, ``.cpu()``) waits for every
kernel queued before it: in a training loop, for the step still running. :class:`HostCopy`
starts the copies instead (non-blocking, into pinned memory, with an event behind them) and
hands the values over when asked, typically one training step later, when they have long
arrived and waiting for the event costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class HostCopy:
    """Host (CPU) copies of ``tensors``, started now and complete once :meth:`wait` returns.

    On CUDA the copies are non-blocking into pinned memory, followed by an event that
    :meth:`wait` synchronises with (only the copies' own stream position, not the work queued
    after them). Other accelerators copy at once (blocking). CPU tensors are copied too: the
    copies are the caller's own, whatever the device.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        cuda = any(t.is_cuda for t in tensors)
        self._values: list[Tensor] = []
        for t in tensors:
            t = t.detach()
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._values.append(host.copy_(t, non_blocking=t.is_cuda))
        self._event: torch.cuda.Event | None = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> list[Tensor]:
        """The host copies, in the order given (waits for the copies only if they are still running)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._values
