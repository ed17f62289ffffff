"""The decode end of its pair channels: one `RecvLink` per prefill instance.

Descriptors arrive over the control plane (possibly out of order); the link's thread receives
transfers strictly in pair_seq order, each into the blocks reserved for its request, and reports
every outcome through `on_landed`. A failure breaks the channel: every later descriptor of this
generation fails at once, and the prefill side rebuilds the pair under a new generation.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

import torch

from kv_transfer import (
    ChannelConfig,
    ChannelState,
    KVLayoutSpec,
    KVReceiver,
    KVTransferError,
    PairChannel,
    PairRole,
    failure_result,
    pair_key,
)
from kv_transfer.rendezvous import rank_pair_key
from kv_transfer.errors import KVTransferConnectionError, KVTransferTimeoutError
from protos.pdserve.v1 import worker_pb2

LandedCallback = Callable[[str, worker_pb2.TransferResult], None]
BlocksLookup = Callable[[str], list[int] | None]


class RecvLink:
    """One generation of the channel from one prefill instance into this decode instance."""

    def __init__(self, store, prefill_id: str, decode_id: str, generation: int, device: str,
                 spec: KVLayoutSpec, kv_cache: torch.Tensor, blocks_of: BlocksLookup,
                 on_landed: LandedCallback, transfer_timeout_s: float,
                 connect_timeout_s: float = 60.0, bind_host: str | None = None,
                 rank: int = 0) -> None:
        self.key = rank_pair_key(pair_key(prefill_id, decode_id, generation), rank)
        cfg = ChannelConfig(self.key, PairRole.DECODE, decode_id, device, connect_timeout_s,
                            bind_host)
        self.channel = PairChannel.connect(store, cfg, spec)
        self.receiver = KVReceiver(self.channel)
        self._kv_cache = kv_cache
        self._blocks_of = blocks_of
        self._on_landed = on_landed
        self._timeout_s = transfer_timeout_s
        self._heap: list[tuple[int, bytes]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.num_inflight = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"kv-recv-{self.key}")
        self._thread.start()

    def expect(self, desc: worker_pb2.TransferDescriptor) -> None:
        """Receive this transfer in its turn; on a closed link it fails at once."""
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, (desc.pair_seq, desc.SerializeToString()))
                self.num_inflight += 1
                self._cond.notify()
                return
        self._on_landed(desc.request_id, self._closed_result(desc))

    def close(self) -> None:
        """Stop receiving (a new generation replaces this one, or the worker stops): what is
        still expected fails, so that its reservation is freed and its request can move."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.channel.close()

    def _closed_result(self, desc: worker_pb2.TransferDescriptor) -> worker_pb2.TransferResult:
        return failure_result(desc, KVTransferConnectionError(f"pair {self.key} closed"))

    def _next(self) -> worker_pb2.TransferDescriptor | None:
        """The descriptor with the next pair_seq; waits for it up to the transfer timeout."""
        want = self.receiver.next_seq
        deadline = time.monotonic() + self._timeout_s
        with self._cond:
            while not self._closed:
                if self._heap and self._heap[0][0] <= want:
                    return worker_pb2.TransferDescriptor.FromString(heapq.heappop(self._heap)[1])
                if self._heap and time.monotonic() > deadline:  # a gap that never fills
                    self.channel.abort(f"descriptor {want} never arrived")
                    return worker_pb2.TransferDescriptor.FromString(heapq.heappop(self._heap)[1])
                self._cond.wait(timeout=0.5 if self._heap else None)
        return None

    def _run(self) -> None:
        while (desc := self._next()) is not None:
            result = self._receive(desc)
            with self._cond:
                self.num_inflight -= 1
            self._on_landed(desc.request_id, result)
        with self._cond:  # closed: nothing is pushed any more (see expect)
            left = [worker_pb2.TransferDescriptor.FromString(d) for _, d in self._heap]
            self._heap.clear()
            self.num_inflight = 0
        for desc in left:
            self._on_landed(desc.request_id, self._closed_result(desc))

    def _receive(self, desc: worker_pb2.TransferDescriptor) -> worker_pb2.TransferResult:
        started = time.monotonic()
        blocks = self._blocks_of(desc.request_id)
        try:
            if self.channel.state is not ChannelState.READY:
                raise KVTransferConnectionError(f"pair {self.key} is {self.channel.state.value}")
            if blocks is None:
                self.channel.abort(f"no reservation for request {desc.request_id!r}")
                raise KVTransferConnectionError(f"no blocks reserved for {desc.request_id!r}")
            return self.receiver.receive(desc, self._kv_cache, blocks, self._timeout_s)
        except (KVTransferError, ValueError) as exc:
            err = exc if isinstance(exc, KVTransferError) else KVTransferConnectionError(str(exc))
            if self.channel.state is ChannelState.READY:
                self.channel.abort(str(err))
            return failure_result(desc, err, time.monotonic() - started)


__all__ = ["RecvLink", "KVTransferTimeoutError"]
