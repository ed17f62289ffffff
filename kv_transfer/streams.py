"""Ordering transfer work after the compute that produced the KV, without stalling compute.

On CUDA, packing (sender) and scattering (receiver) run on a side stream. The sender records an
event on the compute stream when layers are ready and makes the side stream wait on it, so the
pack reads finished KV while the compute stream runs on to the next layer. NCCL operations
issued while the side stream is current are ordered after it. On CPU everything is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class TransferStream:
    """The side stream transfer work runs on for one device (none on CPU)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def wait_for_compute(self) -> None:
        """Order later transfer work after everything queued so far on the current stream."""
        if self._stream is None:
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self._stream.wait_event(ready)

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Make the side stream current (CUDA) for the enclosed work."""
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            yield

    def synchronize(self) -> None:
        """Block the host until the side stream's queued work is done."""
        if self._stream is not None:
            self._stream.synchronize()
