"""KVReceiver: the decode end of a pair, landing each transfer's KV in the request's blocks.

receive() handles one transfer, start to end, in pair_seq order:
    1. receive the header; compare it with the descriptor. On a mismatch, send a PROTOCOL_ERROR
       ack (best effort), abort the channel, raise KVTransferProtocolError.
    2. receive the layer groups through a small window of staging buffers, scattering each into
       the request's blocks with one indexed copy as soon as it lands.
    3. send the OK ack (the sender's finish() returns on it) and return a TransferResult whose
       duration_s counts from the header's arrival.
Every wait is bounded by the transfer's deadline; on any failure the channel is aborted and a
KVTransferError raised. The timeout counts from the call, so it must cover the prefill's own
queueing and compute when receive() is armed before the prefill starts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_transfer.channel import ChannelState, PairChannel, PendingOp
from kv_transfer.descriptors import (
    block_ids_tensor,
    layer_groups,
    transfer_result,
    validate_descriptor,
)
from kv_transfer.errors import (
    KVTransferConnectionError,
    KVTransferError,
    KVTransferProtocolError,
)
from kv_transfer.packing import packed_shape, unpack_blocks
from kv_transfer.streams import TransferStream
from kv_transfer.wire import empty_header, encode_ack, header_mismatches
from protos.pdserve.v1 import worker_pb2

REJECT_ACK_TIMEOUT_S = 0.5  # how long a refusal waits to reach the sender before the abort


class KVReceiver:
    """Receives KV over one PairChannel (decode side); pair_seq counts from 0 per channel."""

    def __init__(self, channel: PairChannel, max_inflight_messages: int = 4) -> None:
        if max_inflight_messages < 1:
            raise ValueError(f"max_inflight_messages must be >= 1, got {max_inflight_messages}")
        self._channel = channel
        self._window = max_inflight_messages  # staging buffers posted at once
        self._lock = threading.Lock()
        self._next_seq = 0
        self._stream: TransferStream | None = None

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def receive(
        self,
        desc: worker_pb2.TransferDescriptor,
        kv_cache: torch.Tensor,
        block_ids: Sequence[int],
        timeout_s: float,
        heads: tuple[int, int] | None = None,
    ) -> worker_pb2.TransferResult:
        """Receive transfer `desc` (its layers, and KV `heads`: None = every head of this rank,
        model coordinates) into blocks `block_ids` of `kv_cache` within `timeout_s`."""
        if self._channel.state is not ChannelState.READY:
            raise KVTransferConnectionError(
                f"pair {self._channel.pair_key} is {self._channel.state.value}; rebuild it "
                "under a new generation key")
        held = self._channel.spec.shard
        heads = heads or held.heads
        validate_descriptor(desc, self._channel.spec, self._channel.pair_key, heads)
        self._channel.spec.check_cache(kv_cache)
        ids = block_ids_tensor(block_ids, desc, kv_cache)
        into = _CacheShard(kv_cache, ids, held.layers[0],
                           slice(heads[0] - held.heads[0], heads[1] - held.heads[0]))
        with self._lock:
            self._take_seq(desc)
            deadline = time.monotonic() + timeout_s
            stream = self._stream_for(kv_cache.device)
            with stream.use():
                self._receive_header(desc, heads, deadline)
                header_at = time.monotonic()
                num_bytes = self._receive_groups(desc, into, deadline)
                stream.synchronize()  # the blocks are in place before we say so
                self._send_ack(desc, worker_pb2.TRANSFER_STATUS_OK, num_bytes, deadline)
        return transfer_result(desc, worker_pb2.TRANSFER_STATUS_OK, num_bytes=num_bytes,
                               duration_s=time.monotonic() - header_at)

    def _take_seq(self, desc: worker_pb2.TransferDescriptor) -> None:
        if desc.pair_seq != self._next_seq:
            raise ValueError(f"pair {self._channel.pair_key}: transfer pair_seq {desc.pair_seq} "
                             f"is out of order; expected {self._next_seq}")
        self._next_seq += 1

    def _stream_for(self, device: torch.device) -> TransferStream:
        if self._stream is None:
            self._stream = TransferStream(device)
        elif self._stream.device != device:
            raise ValueError(f"this receiver fills a cache on {self._stream.device}, "
                             f"got one on {device}")
        return self._stream

    def _receive_header(self, desc: worker_pb2.TransferDescriptor, heads: tuple[int, int],
                        deadline: float) -> None:
        header = empty_header().to(self._channel.device)
        self._channel.wait(self._channel.recv(header), _remaining(deadline))
        problems = header_mismatches(header.cpu(), desc, heads)
        if problems:
            self._reject(desc, problems, deadline)

    def _receive_groups(
        self,
        desc: worker_pb2.TransferDescriptor,
        into: _CacheShard,
        deadline: float,
    ) -> int:
        """Receive every layer group and scatter it; returns the payload bytes."""
        pending = deque(layer_groups(desc))
        posted: deque[tuple[slice, torch.Tensor, PendingOp]] = deque()
        num_bytes = 0
        kv_cache = into.kv_cache
        while pending or posted:
            while pending and len(posted) < self._window:
                posted.append(self._post_group(into, *pending.popleft()))
            layers, staging, op = posted.popleft()
            self._channel.wait(op, _remaining(deadline))
            unpack_blocks(kv_cache, into.block_ids, layers, staging.to(kv_cache.device),
                          heads=into.heads)
            num_bytes += staging.numel() * staging.element_size()
        return num_bytes

    def _post_group(self, into: _CacheShard, start: int,
                    end: int) -> tuple[slice, torch.Tensor, PendingOp]:
        layers = slice(start - into.layer_offset, end - into.layer_offset)  # stage-local
        shape = packed_shape(into.kv_cache, into.block_ids.numel(), layers, into.heads)
        staging = torch.empty(shape, dtype=into.kv_cache.dtype, device=self._channel.device)
        return layers, staging, self._channel.recv(staging)

    def _send_ack(
        self, desc: worker_pb2.TransferDescriptor, status: int, num_bytes: int, deadline: float
    ) -> None:
        ack = encode_ack(desc, status, num_bytes).to(self._channel.device)
        self._channel.wait(self._channel.send(ack), _remaining(deadline))

    def _reject(
        self, desc: worker_pb2.TransferDescriptor, problems: list[str], deadline: float
    ) -> None:
        message = (f"pair {self._channel.pair_key} seq {desc.pair_seq}: the header does not "
                   f"match the descriptor of request {desc.request_id!r}: " + "; ".join(problems))
        try:
            refusal = encode_ack(desc, worker_pb2.TRANSFER_STATUS_PROTOCOL_ERROR, 0)
            op = self._channel.send(refusal.to(self._channel.device))
            self._channel.wait(op, min(_remaining(deadline), REJECT_ACK_TIMEOUT_S))
        except KVTransferError:
            pass  # best effort: the abort below fails the sender anyway
        self._channel.abort(message)
        raise KVTransferProtocolError(message)


@dataclass(frozen=True, slots=True)
class _CacheShard:
    """Where one transfer's shard lands in this rank's cache."""

    kv_cache: torch.Tensor
    block_ids: torch.Tensor
    layer_offset: int  # this rank's first layer (model coordinates)
    heads: slice  # the shard's heads in this rank's cache


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()
